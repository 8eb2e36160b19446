"""Helpers for driving the TUI from tests: a tmux terminal, and fast key events for pilot tests."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

TMUX = shutil.which("tmux")


def clipterm_command() -> list[str]:
    """The installed console script next to this Python, else `python -m clipterm`."""
    script = Path(sys.executable).with_name("clipterm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "clipterm"]


class Tmux:
    """One command in a detached tmux session of a fixed size, on a private tmux server."""

    def __init__(self, command: list[str], env: dict[str, str], workdir: Path, size: tuple[int, int] = (100, 30)):
        self.socket = f"clipterm-test-{os.getpid()}-{time.monotonic_ns()}"
        self.env = {key: value for key, value in env.items() if key != "TMUX"}  # a private server, even from tmux
        self.status_file = Path(workdir) / "exit-status"
        exports = [arg for key in ("CLIPTERM_CACHE", "CLIPTERM_CONFIG", "HF_HUB_OFFLINE") if key in env
                   for arg in ("-e", f"{key}={env[key]}")]
        # A shell records the exit status: tmux 3.3 sometimes leaves an exited pane's status unread.
        # remain-on-exit keeps the pane (and the server) after the command ends, so the screen stays readable.
        shell = f"{shlex.join(command)}; echo $? > {shlex.quote(str(self.status_file))}"
        self.tmux("new-session", "-d", "-s", "tui", "-x", str(size[0]), "-y", str(size[1]), *exports,
                  shlex.join(["sh", "-c", shell]), ";", "set-option", "-t", "tui", "remain-on-exit", "on")

    def tmux(self, *args: str) -> str:
        result = subprocess.run([TMUX, "-L", self.socket, "-f", os.devnull, *args], env=self.env,
                                capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def screen(self) -> str:
        """What the terminal shows now, as plain text."""
        return self.tmux("capture-pane", "-p", "-t", "tui")

    def send(self, *keys: str) -> None:
        """Keys in tmux's names (Enter, Tab, Escape) or single characters (sent literally)."""
        for key in keys:
            self.tmux("send-keys", "-t", "tui", *(["-l", key] if len(key) == 1 else [key]))

    def wait_for(self, shown: Callable[[str], bool], what: str, timeout: float = 20.0) -> str:
        """Poll the screen until `shown(screen)` holds; fail with the last screen after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if shown(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; the screen:\n{screen}")
            time.sleep(0.1)

    def exit_status(self) -> int | None:
        """The command's exit status once it has ended, else None."""
        text = self.status_file.read_text() if self.status_file.exists() else ""
        return int(text) if text.strip() else None

    def size(self) -> tuple[int, int]:
        width, height = self.tmux("display-message", "-p", "-t", "tui", "#{pane_width} #{pane_height}").split()
        return int(width), int(height)

    def close(self) -> None:
        subprocess.run([TMUX, "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


# Characters a terminal sends for keys Textual names (what Pilot.press derives).
KEY_CHARACTERS = {"question_mark": "?", "slash": "/", "tab": "\t", "enter": "\r", "escape": "\x1b", "space": " ",
                  "backspace": "\x7f"}


def key_event(key: str) -> Any:
    """A Key event as the terminal driver makes it for `key` (a Textual key name)."""
    from textual import events

    return events.Key(key, KEY_CHARACTERS.get(key, key if len(key) == 1 else None))


async def type_fast(app, pilot, key: str) -> None:
    """Press one key and let the app handle it, without Pilot.press's wait for an idle CPU (workers keep it busy)."""
    app.post_message(key_event(key))
    await pilot.pause(0)


def screen_text(app) -> str:
    """Everything the app's screen shows now, as plain text (how App.export_screenshot renders, minus the SVG)."""
    import io

    from rich.console import Console

    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True, record=True,
                      legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()
