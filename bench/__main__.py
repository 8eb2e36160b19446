"""List every benchmark with its kind and its last result file.

    python -m bench                 # a table: how to run it, kind, last result file and its date, what it measures
    python -m bench --kind truth    # one kind only
    python -m bench --json

A benchmark's results are the files of bench/results/ named after it (`spatial.json`, `spatial-toy-v1.json`);
the last is the one whose `when` (written by `bench._common.write_result`) is latest.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from bench._common import RESULTS, ROOT

BENCH = ROOT / "bench"
KINDS = ("speed", "scale", "truth", "tools")


@dataclass
class Benchmark:
    path: Path  # bench/<kind>/<name>.py or .sh
    kind: str
    summary: str  # the first line of its docstring (or of its opening comment)
    results: list[tuple[str, Path]]  # (when, file), oldest first

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def command(self) -> str:
        if self.path.suffix == ".sh":
            return str(self.path.relative_to(ROOT))
        return f"python -m bench.{self.kind}.{self.name}"

    def to_json(self) -> dict:
        last = self.results[-1] if self.results else None
        return {"command": self.command, "kind": self.kind, "script": str(self.path.relative_to(ROOT)),
                "summary": self.summary, "results": len(self.results),
                "last_result": str(last[1].relative_to(ROOT)) if last else None, "when": last[0] if last else None}


def summary_of(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        doc = ast.get_docstring(ast.parse(text)) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""
    comments = [line.lstrip("# ").strip() for line in text.splitlines()[1:] if line.startswith("#")]
    return comments[0] if comments else ""


def when_of(path: Path) -> str:
    """When a result was written, as YYYY-MM-DD HH:MM: its `when` field (ISO, or cache_build's YYYYmmdd-HHMMSS)."""
    try:
        stamp = str(json.loads(path.read_text(encoding="utf-8")).get("when", ""))
    except (ValueError, AttributeError):
        stamp = ""
    for pattern in ("%Y-%m-%dT%H:%M:%S", "%Y%m%d-%H%M%S"):
        try:
            return time.strftime("%Y-%m-%d %H:%M", time.strptime(stamp, pattern))
        except ValueError:
            pass
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))


def results_of(name: str) -> list[tuple[str, Path]]:
    named = re.compile(re.escape(name) + r"(-.*)?\.json")
    return sorted((when_of(p), p) for p in RESULTS.glob(f"{name}*.json") if named.fullmatch(p.name))


def benchmarks() -> list[Benchmark]:
    """Every script under bench/<kind>/, by kind then name."""
    found = []
    for kind in KINDS:
        for path in sorted((BENCH / kind).iterdir()):
            if path.suffix in (".py", ".sh") and not path.name.startswith("_"):
                found.append(Benchmark(path, kind, summary_of(path), results_of(path.stem)))
    return found


def table(rows: list[Benchmark]) -> str:
    cells = [("command", "kind", "last result", "when", "measures")]
    for bench in rows:
        last = bench.results[-1] if bench.results else None
        more = f" (+{len(bench.results) - 1})" if len(bench.results) > 1 else ""
        cells.append((bench.command, bench.kind, last[1].name + more if last else "-", last[0] if last else "-",
                      bench.summary if len(bench.summary) <= 70 else bench.summary[:69] + "…"))
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4]
                     for row in cells)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=KINDS, help="only this kind")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    rows = [bench for bench in benchmarks() if args.kind in (None, bench.kind)]
    if args.json:
        print(json.dumps({"benchmarks": [bench.to_json() for bench in rows]}, indent=2))
    else:
        print(table(rows))
        print(f"\n{len(rows)} scripts; results in {RESULTS.relative_to(ROOT)}/; (+N): N older result files")


if __name__ == "__main__":
    main()
