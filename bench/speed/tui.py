"""The TUI's responsiveness on a 10,000-image toy cache: first frame, keypress -> pane update, peak memory.

Goals (issue 7): first frame <= 1.0 s; keypress -> pane update p95 <= 100 ms with results memoised;
peak RSS <= 300 MB above `python -c "import torch, open_clip"` measured in the same run.

Everything runs in real processes on a pseudo-terminal (100x30, TERM=xterm-256color) with Textual's
ordinary Linux driver, so terminal input parsing and writing each frame are part of every figure.

- first frame: wall time from spawning `clipterm tui CACHE --images half` (the venv's console
  script) until the bytes it wrote to the terminal contain the model tree's first layer (`L0`);
  the median of --repeats runs, after one untimed run that warms the OS file cache. One run with
  `--images auto` is reported apart: it first asks the terminal about image protocols, and a pty
  with no emulator behind it never answers, so it waits out textual-image's timeouts. A probe run
  through the same CLI entry point (`clipterm.cli.app.main`) with a subclass of the app records,
  when the app writes its first frame after mounting, whether torch was imported yet.
- keypress: a session process (the same entry point, with a probe subclass that logs every frame it
  writes, with `time.monotonic()`, which is system-wide on Linux) first visits every node of the
  tree and waits for all its workers, so each pane's result is memoised; then this script writes
  `j` / `k` bytes into the terminal, walking the whole expanded tree down and back up. A press's
  latency runs from the write until the app has written the first frame that shows the new
  selection. A press whose selection started a worker (nothing memoised) is counted and reported.
- memory: VmHWM (peak resident set) of that session process once every node was visited (torch,
  the model, the pool's text embeddings, ablation scorings and image rankings loaded), against
  VmHWM of `python -c "import torch, open_clip"`.

    python -m bench.speed.tui [--n 10000] [--repeats 5] [--passes 2] [--gap 0.15]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

from bench._common import ROOT, write_result
from tests.tui_helpers import clipterm_command  # the same command the tmux test runs

SIZE = (100, 30)  # columns, rows
ANSI = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]")


# ----------------------------------------------------------------- a process on a pseudo-terminal


class Terminal:
    """A command on a pty of a fixed size; a thread drains its output and notes when a text first shows."""

    def __init__(self, cmd: list[str], env: dict[str, str], size: tuple[int, int] = SIZE):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[1], size[0], 0, 0))
        self.started = time.monotonic()
        self.process = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT,
                                        start_new_session=True)
        os.close(slave)
        self.master = master
        self.output = bytearray()
        self.seen: dict[str, float] = {}  # text -> monotonic time it first appeared (escape sequences stripped)
        self.watch: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the child closed the terminal
                return
            if not chunk:
                return
            now = time.monotonic()
            with self._lock:
                self.output += chunk
                del self.output[:-1_000_000]
                pending = [text for text in self.watch if text not in self.seen]
                if pending:
                    plain = self.plain(200_000)
                    self.seen.update((text, now) for text in pending if text in plain)

    def plain(self, tail: int) -> str:
        """The last `tail` bytes of output without escape sequences."""
        return ANSI.sub(b"", bytes(self.output[-tail:])).decode("utf-8", "replace")

    def wait_for(self, text: str, timeout: float) -> float:
        """Seconds from spawn until `text` showed on the terminal."""
        with self._lock:
            self.watch.append(text)
            if text not in self.seen and text in self.plain(200_000):
                self.seen[text] = time.monotonic()
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            if time.monotonic() > deadline or self.process.poll() is not None:
                tail = self.plain(2000)
                raise RuntimeError(f"{text!r} never showed (exit code {self.process.poll()}); output ends: {tail!r}")
            time.sleep(0.002)
        return self.seen[text] - self.started

    def press(self, keys: bytes) -> float:
        """Type bytes into the terminal; returns the monotonic time of the write."""
        now = time.monotonic()
        os.write(self.master, keys)
        return now

    def close(self, timeout: float = 30.0) -> int:
        """Wait for the process to end (killing it after `timeout`); its exit code."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        os.close(self.master)
        return code


def peak_rss_mb(pid: int | str = "self") -> float:
    """VmHWM (peak resident set size) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status")


# ----------------------------------------------------------------- the child processes (probe subclasses of the app)


def child_main(mode: str, cache: str, cache_dir: str, log: str) -> None:
    """Run `clipterm tui CACHE` through the CLI entry point, with a probe subclass of the app."""
    import asyncio

    from clipterm.cli.app import main
    from clipterm.tui import app as tui_app

    base = tui_app.ClipTermApp

    class FirstFrame(base):
        """Notes the first frame written after mounting, and whether torch was imported by then; then quits."""

        def on_mount(self) -> None:
            self._mounted_at = time.monotonic()

        def _display(self, screen, renderable) -> None:  # Textual's private "write one frame" step
            super()._display(screen, renderable)
            if renderable is not None and getattr(self, "_mounted_at", None) and not getattr(self, "_noted", False):
                self._noted = True
                Path(log).write_text(json.dumps({"frame": time.monotonic(), "mounted": self._mounted_at,
                                                 "torch": "torch" in sys.modules}))
                self.exit()

    class Session(base):
        """Visits every node until its panes are memoised, then logs each frame written with the selection it shows."""

        selections = 0  # select() calls so far: a press that moves the cursor makes one
        workers_started = 0
        ready = False

        def on_mount(self) -> None:
            self.frames: list[tuple[float, int, str, int]] = []  # (monotonic, selections, selected, workers started)
            Session.current = self
            asyncio.get_running_loop().create_task(self._warm())

        async def _warm(self) -> None:
            shape = self.reader.shape
            nodes = ["model"] + [n for layer in range(shape.layers) for n in
                                 [f"L{layer}"] + [f"L{layer}.H{h}" for h in range(shape.heads)] + [f"L{layer}.MLP"]]
            for name in nodes:
                self.jump(name)
                await asyncio.sleep(0.05)  # the cursor moves after a refresh
                await self.workers.wait_for_complete()
            self.jump("model")
            await asyncio.sleep(0.2)
            await self.workers.wait_for_complete()
            self.ready = True
            missing = [n for n in nodes if ".H" in n and self.analyses.cached("description", n) is None]
            Path(log + ".ready").write_text(json.dumps({"nodes": nodes, "undescribed": missing,
                                                       "selections": self.selections}))

        def select(self, component: str) -> None:
            self.selections += 1
            super().select(component)

        def on_worker_state_changed(self, event) -> None:  # the app's own handler runs too (Textual walks the MRO)
            from textual.worker import WorkerState

            if self.ready and event.state == WorkerState.RUNNING:
                self.workers_started += 1

        def _display(self, screen, renderable) -> None:
            super()._display(screen, renderable)
            if self.ready and renderable is not None:
                self.frames.append((time.monotonic(), self.selections, self.selected, self.workers_started))

    tui_app.ClipTermApp = FirstFrame if mode == "first-frame" else Session
    try:
        main(["tui", cache, "--cache-dir", cache_dir, "--images", "half"])
    finally:
        if mode == "session" and getattr(Session, "current", None) is not None:
            Path(log + ".frames").write_text(json.dumps(Session.current.frames))


# ----------------------------------------------------------------- the measurements


def bench_env(config_dir: str) -> dict[str, str]:
    env = dict(os.environ, TERM="xterm-256color", COLORTERM="truecolor", CLIPTERM_CONFIG=config_dir, HF_HUB_OFFLINE="1")
    env.pop("TMUX", None)
    return env


def ensure_cache(n: int, cache_dir: Path) -> tuple[str, float | None]:
    """The bench cache (built once with `clipterm cache build`, reused after); its path and build seconds."""
    name = f"bench-tui-toy{n}"
    manifest = cache_dir / name / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("complete"):
        return str(cache_dir / name), None
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "clipterm", "cache", "build", "--images", f"toy:{n}", "--name", name,
                    "--cache-dir", str(cache_dir), "--workers", "0"], check=True, cwd=ROOT)
    return str(cache_dir / name), time.perf_counter() - start


def first_frame(cache: str, cache_dir: str, env: dict[str, str], repeats: int) -> dict:
    """Spawn -> tree on screen, for the real console script; and the probe's torch check."""
    runs = []
    for k in range(repeats + 1):  # the first run only warms the OS file cache
        term = Terminal(clipterm_command() + ["tui", cache, "--cache-dir", cache_dir, "--images", "half"], env)
        seconds = term.wait_for("L0", timeout=60)
        term.press(b"q")
        code = term.close()
        if code != 0:
            raise RuntimeError(f"clipterm tui exited with {code}")
        if k:
            runs.append(seconds)
    # --images auto asks the terminal about image protocols first; a pty with no emulator behind it never answers
    term = Terminal(clipterm_command() + ["tui", cache, "--cache-dir", cache_dir, "--images", "auto"], env)
    auto_s = term.wait_for("L0", timeout=60)
    term.press(b"q")
    term.close()
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "first-frame.json")
        term = Terminal([sys.executable, "-m", __spec__.name, "--child", "first-frame", "--cache", cache,
                         "--cache-dir", cache_dir, "--log", log], env)
        shown = term.wait_for("L0", timeout=60)
        term.close()
        probe = json.loads(Path(log).read_text())
    return {"first_frame_s": statistics.median(runs), "first_frame_runs_s": runs,
            "first_frame_images_auto_unanswered_s": auto_s,
            "probe_first_frame_s": probe["frame"] - term.started, "probe_tree_on_terminal_s": shown,
            "probe_mount_to_frame_s": probe["frame"] - probe["mounted"],
            "torch_imported_at_first_frame": probe["torch"]}


def session(cache: str, cache_dir: str, env: dict[str, str], passes: int, gap: float) -> dict:
    """Memoise every node, then time j/k presses down and up the whole tree; peak RSS after."""
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "session")
        term = Terminal([sys.executable, "-m", __spec__.name, "--child", "session", "--cache", cache,
                         "--cache-dir", cache_dir, "--log", log], env)
        start = time.monotonic()
        while not os.path.exists(log + ".ready"):
            if term.process.poll() is not None or time.monotonic() - start > 900:
                raise RuntimeError(f"the session never got ready; output ends: {term.plain(2000)!r}")
            time.sleep(0.1)
        warm_s = time.monotonic() - start
        ready = json.loads(Path(log + ".ready").read_text())
        steps = len(ready["nodes"]) - 1  # root -> last MLP, every layer expanded by the visits
        presses = []
        for _ in range(passes):
            for key in [b"j"] * steps + [b"k"] * steps:
                presses.append(term.press(key))
                time.sleep(gap)
        time.sleep(0.5)
        rss = peak_rss_mb(term.process.pid)
        term.press(b"q")
        code = term.close()
        frames = json.loads(Path(log + ".frames").read_text())
    if code != 0 or not frames:
        raise RuntimeError(f"session exited with {code}, {len(frames)} frames logged")
    nodes = ready["nodes"]
    expected = (nodes[1:] + nodes[-2::-1]) * passes  # the selection each press moves to
    latencies, wrong = [], 0
    base = ready["selections"]  # made while warming up; the cursor then rests on the root
    for i, pressed in enumerate(presses):
        shown = next((f for f in frames if f[1] >= base + i + 1), None)
        if shown is None:
            raise RuntimeError(f"press {i} never showed a new selection")
        latencies.append(shown[0] - pressed)
        wrong += shown[1] == base + i + 1 and shown[2] != expected[i]
    latencies.sort()
    return {"presses": len(presses), "warm_s": warm_s, "undescribed_heads": ready["undescribed"],
            "keypress_p50_ms": 1e3 * statistics.median(latencies),
            "keypress_p95_ms": 1e3 * latencies[int(0.95 * (len(latencies) - 1))],
            "keypress_max_ms": 1e3 * latencies[-1], "workers_started_while_timing": frames[-1][3],
            "tui_peak_rss_mb": rss, "selections_logged": frames[-1][1] - base,
            "frames_showing_another_node": wrong}


def baseline_rss(env: dict[str, str]) -> float:
    """Peak RSS of `python -c "import torch, open_clip"`, in MB."""
    code = "import torch, open_clip; print(open('/proc/self/status').read())"
    status = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="images in the toy cache")
    parser.add_argument("--cache-dir", default=str(ROOT / "cache"), help="cache root for the bench cache")
    parser.add_argument("--repeats", type=int, default=5, help="timed first-frame runs")
    parser.add_argument("--passes", type=int, default=2, help="walks down and back up the whole tree")
    parser.add_argument("--gap", type=float, default=0.15, help="seconds between key presses")
    parser.add_argument("--child", choices=["first-frame", "session"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child, args.cache, args.cache_dir, args.log)
        return

    cache, built_s = ensure_cache(args.n, Path(args.cache_dir))
    with tempfile.TemporaryDirectory() as config:
        env = bench_env(config)
        frame = first_frame(cache, args.cache_dir, env, args.repeats)
        keys = session(cache, args.cache_dir, env, args.passes, args.gap)
        base_rss = baseline_rss(env)
    above = keys["tui_peak_rss_mb"] - base_rss
    print(f"first frame of `clipterm tui` (spawn -> tree on the terminal): {frame['first_frame_s']:.2f} s median of "
          f"{args.repeats} (goal <= 1.0 s: {'met' if frame['first_frame_s'] <= 1.0 else 'MISSED'}); "
          f"torch imported by then: {frame['torch_imported_at_first_frame']}")
    print(f"keypress -> pane update, memoised, {keys['presses']} presses on a {args.n:,}-image cache: "
          f"p50 {keys['keypress_p50_ms']:.1f} ms, p95 {keys['keypress_p95_ms']:.1f} ms, "
          f"max {keys['keypress_max_ms']:.1f} ms "
          f"(goal p95 <= 100 ms: {'met' if keys['keypress_p95_ms'] <= 100 else 'MISSED'}); "
          f"workers started while timing: {keys['workers_started_while_timing']}")
    print(f"peak RSS: TUI {keys['tui_peak_rss_mb']:.0f} MB vs `import torch, open_clip` {base_rss:.0f} MB: "
          f"{above:+.0f} MB, ratio {keys['tui_peak_rss_mb'] / base_rss:.2f}x "
          f"(goal <= +300 MB: {'met' if above <= 300 else 'MISSED'})")
    write_result("tui", {
        "n": args.n, "terminal": f"{SIZE[0]}x{SIZE[1]}", "cache_built_s": built_s, "gap_s": args.gap,
        **frame, **keys,
        "baseline_import_torch_open_clip_rss_mb": base_rss, "rss_above_baseline_mb": above,
        "rss_ratio": keys["tui_peak_rss_mb"] / base_rss,
        "goal_first_frame_s": 1.0, "goal_keypress_p95_ms": 100.0, "goal_rss_above_baseline_mb": 300.0,
    })


if __name__ == "__main__":
    main()
