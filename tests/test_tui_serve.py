"""`clipterm tui CACHE --serve`: the TUI in a browser tab through textual-serve, served on loopback.

The browser test opens the served page in headless Chromium (driven over the DevTools protocol, `browser.py`): the
page connects its terminal on load, so the test waits for the app's first bytes, checks that the terminal received
the tree and the panes, and takes a screenshot. `CLIPTERM_SCREENSHOT=docs/tui-serve.png` keeps it for docs/tui.md."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from browser import Browser, find_chromium


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_missing_cache_fails_before_serving(cli):
    result = cli("tui", "no-such-cache", "--serve", "--port", str(free_port()))
    assert result.code != 0 and "no cache 'no-such-cache'" in result.err


def wait_for_port(port: int, server: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode}: {server.stderr.read()[-500:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port} after {timeout:.0f} s")


@pytest.fixture(scope="module")
def served(toy, tmp_path_factory):
    """`clipterm tui pets --serve` on a free loopback port, over a 12-image toy cache."""
    pytest.importorskip("textual_serve", reason="textual-serve is not installed (pip install 'clipterm[serve]')")
    from clipterm.cache.build import BuildOptions, build_cache

    root = tmp_path_factory.mktemp("served")
    build_cache(BuildOptions(images="toy:12", name="pets", cache_dir=str(root / "caches"), workers=0), loaded=toy)
    port = free_port()
    config = root / "config"
    env = {**os.environ, "XDG_CONFIG_HOME": str(config), "CLIPTERM_CACHE": str(root / "caches"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "-m", "clipterm", "tui", "pets", "--serve", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_port(port, server)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def test_headless_chromium_shows_the_tree_and_a_pane(served, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")

    async def visit() -> tuple[str, Path]:
        async with Browser(chromium, size=(1280, 760)) as browser:
            await browser.open(served + "?fontsize=14")
            # textual.js connects the terminal on load; textual-serve marks the body once the app's first bytes arrive
            await browser.wait_for(lambda: browser.evaluate("document.body.classList.contains('-first-byte')"), 90,
                                   "the app's first bytes")
            async def drawn() -> bool:
                text = browser.received()
                return "L0" in text and "Descriptions" in text
            await browser.wait_for(drawn, 90, "the tree (L0) and the pane tabs")
            await browser.evaluate("document.querySelector('.xterm-helper-textarea, textarea').focus()")
            await browser.press("ArrowDown", 6)  # the tree's root, then L0..L5
            await browser.press("Enter")  # opens L5: its heads H0..H7 and its MLP
            await browser.wait_for(lambda: asyncio.sleep(0, "H7" in browser.received()), 60, "L5's heads in the tree")
            await browser.press("ArrowDown")
            await browser.press("Enter")  # L5.H0: the Descriptions pane describes it
            await browser.wait_for(lambda: asyncio.sleep(0, "TextSpan over pool" in browser.received()), 120,
                                   "L5.H0's description")
            await asyncio.sleep(1.5)  # let xterm.js paint what arrived
            return browser.received(), await browser.screenshot(Path(os.environ.get("CLIPTERM_SCREENSHOT") or tmp_path / "tui.png"))

    text, shot = asyncio.run(visit())
    assert "Ablation" in text and "MLP" in text  # the other tabs, and L5's MLP once opened from the keyboard
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.width == 1280 and image.height > 400
    colours = image.getcolors(maxcolors=1 << 16)  # None: more colours than that, i.e. not blank
    assert colours is None or len(colours) > 8, "the screenshot is blank"
