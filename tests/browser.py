"""Headless Chromium driven over the DevTools protocol (CDP), through aiohttp's websocket client (textual-serve needs
aiohttp already): open a page, watch its websocket frames, read the DOM, take a screenshot. For the `--serve` test."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
KEY_CODES = {"ArrowDown": 40, "ArrowUp": 38, "ArrowRight": 39, "ArrowLeft": 37, "Enter": 13, "Tab": 9}


def find_chromium() -> str | None:
    for name in CHROMIUM:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium with a private profile; `async with Browser(path) as b: await b.open(url)`."""

    def __init__(self, executable: str, size: tuple[int, int] = (1280, 800)):
        self.executable, self.size = executable, size
        self.frames: list[bytes] = []  # websocket frames the page received, decoded
        self._next_id = 0
        self._replies: dict[int, asyncio.Future] = {}

    async def __aenter__(self) -> Browser:
        import aiohttp

        self.profile = tempfile.mkdtemp(prefix="clipterm-chromium-")
        self.process = subprocess.Popen(
            [self.executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--mute-audio",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", f"--window-size={self.size[0]},{self.size[1]}",
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "about:blank"],  # nothing but loopback
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        endpoint = self._endpoint(timeout=30)
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://{endpoint}/json/list") as reply:
            page = next(t for t in await reply.json() if t["type"] == "page")
        self.socket = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.call("Network.enable")
        await self.call("Page.enable")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._reader.cancel()
        await self.socket.close()
        await self.session.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    def _endpoint(self, timeout: float) -> str:
        """host:port of the DevTools server, from Chromium's `DevTools listening on ws://...` line on stderr."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            found = re.search(r"DevTools listening on ws://([^/]+)/", line)
            if found:
                return found.group(1)
            if not line and self.process.poll() is not None:
                break
        raise RuntimeError(f"chromium did not start its DevTools server (exit {self.process.poll()})")

    async def _read(self) -> None:
        async for message in self.socket:
            data = json.loads(message.data)
            if "id" in data and data["id"] in self._replies:
                self._replies.pop(data["id"]).set_result(data)
            elif data.get("method") == "Network.webSocketFrameReceived":
                frame = data["params"]["response"]
                payload = frame["payloadData"]
                self.frames.append(base64.b64decode(payload) if frame.get("opcode") == 2 else payload.encode())

    async def call(self, method: str, **params: Any) -> dict:
        self._next_id += 1
        reply = asyncio.get_running_loop().create_future()
        self._replies[self._next_id] = reply
        await self.socket.send_str(json.dumps({"id": self._next_id, "method": method, "params": params}))
        data = await asyncio.wait_for(reply, 60)
        if "error" in data:
            raise RuntimeError(f"{method}: {data['error']}")
        return data.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        return (await self.call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")

    async def open(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def press(self, key: str, times: int = 1) -> None:
        """Key presses into the focused element: `ArrowDown`, `ArrowUp`, `ArrowRight`, `Enter`, `Tab`."""
        code = KEY_CODES[key]
        for _ in range(times):
            for kind in ("rawKeyDown", "keyUp"):
                await self.call("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code,
                                nativeVirtualKeyCode=code)
            await asyncio.sleep(0.15)

    def received(self) -> str:
        """Everything the page's websockets received, as text with ANSI escapes removed."""
        text = b"".join(self.frames).decode("utf-8", "replace")
        return re.sub(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-B]|\x1b[=>]", "", text)

    async def wait_for(self, check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await check():
                return
            await asyncio.sleep(0.25)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    async def screenshot(self, path: Path) -> Path:
        data = (await self.call("Page.captureScreenshot", format="png"))["data"]
        path.write_bytes(base64.b64decode(data))
        return path


