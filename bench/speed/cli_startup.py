"""How long `clipterm --help` takes, against a bare `python -c "import typer"` measured in the same run.

Goal: under 0.5 s, and torch is never imported.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from bench._common import write_result


def timed(cmd: list[str], repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main(repeats: int = 7) -> None:
    help_s = timed([sys.executable, "-m", "clipterm", "--help"], repeats)
    baseline_s = timed([sys.executable, "-c", "import typer"], repeats)
    print(f"clipterm --help: {help_s * 1000:.0f} ms (median of {repeats}); python -c 'import typer': {baseline_s * 1000:.0f} ms; "
          f"ratio {help_s / baseline_s:.2f}x; goal < 500 ms: {'met' if help_s < 0.5 else 'MISSED'}")
    write_result("cli_startup", {"help_s": help_s, "import_typer_s": baseline_s, "ratio": help_s / baseline_s, "goal_s": 0.5})


if __name__ == "__main__":
    main()
