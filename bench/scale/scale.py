"""clipterm's read side at scale, on synthetic caches (bench/tools/synth_cache.py) of ViT-B-16 and ViT-L-14 shapes.

For each cache, in one run: `cache info` and `cache verify`; TextSpan of one head and of a whole layer;
mean-ablation `--by head` and `--by layer`; top images of a head and of a neuron; the TUI's first frame;
the TUI's first visit of an uncached head (Descriptions, Ablation, Images, as its session core computes
them); the peak RSS of each. Every job runs in its own process (`--child JOB`): it first loads what is a
constant cost at any N (the model, the pool's text embeddings, the class prompts' embeddings), untimed,
then times the analysis itself and reports its peak RSS (`ru_maxrss`, before and after the timed part).

The physical floor of a whole-cache analysis is reading the bytes it needs: right before each job, this
script reads the same tensors' bytes (from the safetensors headers' offsets) with plain sequential reads,
and each job is reported as a multiple of its floor. Floor and job run back to back, so both see the same
page-cache state: the floor is read twice and the second read counts, so the job finds the bytes as warm as the
floor did where they fit in RAM (nothing here drops the OS caches of a shared machine; the first read is reported too).

    python -m bench.scale.scale /work/scale/b16-10k /work/scale/b16-50k ... [--pool FILE] [--heads 8] [--no-tui]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import ROOT, write_result

TEMPLATE = "a photo of a {}."  # one prompt per class: prompt encoding is a constant cost, paid before timing
DRAWS = 100  # bootstrap draws of the ablation intervals: their cost is compute (N x draws per component), not reading
GOALS = {"whole_cache_x_floor": 2.0, "tui_first_frame_s": 1.0, "first_visit_p95_ms_at_200k": 300.0,
         "rss_above_baseline_mb": 300.0}


# ----------------------------------------------------------------- the floor: plain reads of the same bytes


def tensor_ranges(path: Path) -> dict[str, tuple[int, int, list[int]]]:
    """name -> (absolute byte offset, byte length, shape) of each tensor of a safetensors file."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    base = 8 + size
    return {k: (base + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0], v["shape"])
            for k, v in header.items() if k != "__metadata__"}


def block(path: Path, tensor: str, index: tuple[int, ...] = ()) -> tuple[int, int]:
    """(offset, length) of `tensor[index]`, a contiguous block of a row-major tensor."""
    offset, length, shape = tensor_ranges(path)[tensor]
    for i, k in enumerate(index):
        length //= shape[i]
        offset += k * length
    return offset, length


def ranges_for(cache: Path, job: str, layer: int, head: int) -> list[tuple[Path, int, int]]:
    """The byte ranges a job must read, shard by shard."""
    manifest = json.loads((cache / "manifest.json").read_text())
    out = []
    for record in manifest["shards"]:
        shard = cache / record["file"]
        if job == "verify":
            out.append((shard, 0, shard.stat().st_size))
            continue
        wanted: list[tuple[str, tuple[int, ...]]] = []
        if job in ("ablate_head", "ablate_layer", "tui_visit"):
            wanted += [("head_out", ()), ("image_embeds", ()), ("labels.class", ())]
        if job == "ablate_layer":
            wanted += [("mlps", ())]
        if job == "tui_visit":  # one layer's heads and MLP for its ablation; the head for its images
            wanted = [("head_out", (layer,)), ("mlps", (layer,)), ("image_embeds", ()), ("labels.class", ())]
        if job == "images_head":
            wanted += [("head_out", (layer, head))]
        if job == "images_neuron":
            wanted += [("neurons", (layer,))]
        out += [(shard, *block(shard, name, index)) for name, index in wanted]
    if job == "verify":
        out += [(cache / name, 0, (cache / name).stat().st_size) for name in manifest["files"]]
    return out


def read_floor(ranges: list[tuple[Path, int, int]]) -> dict:
    """Seconds to read the ranges with plain sequential reads (8 MiB at a time), and the bytes read."""
    buffer = bytearray(8 << 20)
    view = memoryview(buffer)
    total, start = 0, time.perf_counter()
    for path, offset, length in ranges:
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            left = length
            while left > 0:
                got = f.readinto(view[: min(left, len(buffer))])
                if not got:
                    break
                left -= got
                total += got
    seconds = time.perf_counter() - start
    return {"floor_s": seconds, "floor_bytes": total, "floor_mb_per_s": total / 1e6 / max(seconds, 1e-9)}


# ----------------------------------------------------------------- the jobs (each in its own process)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """The peak of the process's current resident memory (and of its anonymous part) over a timed job, sampled every
    10 ms: `ru_maxrss` is a high-water mark since the process began, which the setup's own peak can hide."""

    def __init__(self) -> None:
        import threading

        self.start, self.start_anon = self.now(), self.now("RssAnon")
        self.peak, self.peak_anon = self.start, self.start_anon
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now(field: str = "VmRSS") -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak, self.peak_anon = max(self.peak, self.now()), max(self.peak_anon, self.now("RssAnon"))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"rss_job_peak_mb": self.peak - self.start, "anon_job_peak_mb": self.peak_anon - self.start_anon}


def cpu_s() -> float:
    """CPU seconds of this process so far: steadier than wall time on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(job: str, cache: str, pool: str | None, layer: int, head: int, heads: int) -> dict:
    """Set up (untimed), then time one job; returns its seconds and peak RSS."""
    import torch

    from clipterm.cache.inventory import verify
    from clipterm.cache.reader import CacheReader, model_for_cache

    torch.set_num_threads(int(os.environ.get("SCALE_THREADS", "1")))  # 1: a shared machine's cores are busy (see --threads)
    reader = CacheReader(cache)
    head_name, layer_name = f"L{layer}.H{head}", f"L{layer}"
    if job == "verify":
        rss0, start = rss_mb(), time.perf_counter()
        problems = verify(Path(cache))
        return {"seconds": time.perf_counter() - start, "rss_setup_mb": rss0, "rss_peak_mb": rss_mb(),
                "problems": len(problems)}
    loaded = model_for_cache(reader)
    from clipterm.analyses import ablation
    from clipterm.analyses.direct_ablation import ablate_cached
    from clipterm.analyses.examples import top_images
    from clipterm.analyses.session import Analyses
    from clipterm.analyses.textspan import component_stats, text_span
    from clipterm.inputs.texts import embed_pool, load_pool
    from clipterm.vit.textencode import encode_texts

    text_pool = load_pool(pool or "general")
    embeds = embed_pool(loaded, text_pool)  # (P, D), from the text-embedding cache after the first run
    memo: dict[str, torch.Tensor] = {}

    def encode(texts: list[str]) -> torch.Tensor:  # class prompts encoded once, before the timed part
        key = "\n".join(texts)
        if key not in memo:
            memo[key] = encode_texts(loaded.model, loaded.tokenizer, texts)
        return memo[key]

    if job.startswith("ablate") or job == "tui_visit":
        ablation.class_weights(encode, ablation.prompts_for("synthetic", "class", reader.tasks["class"], [TEMPLATE]))
    rss0, sampler = rss_mb(), RssSampler()
    start, cpu0 = time.perf_counter(), cpu_s()
    result: dict = {}
    if job == "textspan_head":
        text_span(*component_stats(reader, head_name), embeds, n_texts=10)
    elif job == "textspan_layer":
        for h in range(reader.shape.heads):
            text_span(*component_stats(reader, f"L{layer}.H{h}"), embeds, n_texts=10)
    elif job in ("ablate_head", "ablate_layer"):
        scorings = ablation.scorings(reader, encode, templates=[TEMPLATE])
        shape = reader.shape
        components = ([f"L{l}.H{h}" for l in range(shape.layers) for h in range(shape.heads)] if job == "ablate_head"
                      else [f"L{l}" for l in range(shape.layers)])
        ablate_cached(scorings, reader, components, DRAWS)  # what `clipterm ablate` runs (cosines included)
    elif job == "images_head":
        top_images(reader, head_name, top=16, text_embeds=lambda: (embeds, text_pool.texts))
    elif job == "images_neuron":
        top_images(reader, f"L{layer}.N123", top=16)
    elif job == "tui_visit":
        analyses = Analyses(reader, pool=pool, loaded=loaded)
        analyses._memo[("pool", None)] = (text_pool, embeds)  # the session's shared inputs, loaded before timing
        analyses._memo[("scorings", None)] = ablation.scorings(reader, encode, templates=[TEMPLATE], keep=analyses.ablation_sample())
        analyses.model_ablation()
        analyses.top_images("L0.H0")  # warms the thumbnails' code paths
        rss0, sampler = rss_mb(), RssSampler()
        start, cpu0 = time.perf_counter(), cpu_s()
        visits = []
        shape = reader.shape
        for k in range(heads):  # heads in layers not visited yet: nothing memoised for them
            l, h = shape.layers - 1 - k % shape.layers, (3 * k + 1) % shape.heads
            name = f"L{l}.H{h}"
            t0, c0 = time.perf_counter(), cpu_s()
            analyses.description(name)
            t1 = time.perf_counter()
            analyses.layer_ablation(l)
            t2 = time.perf_counter()
            analyses.top_images(name)
            t3 = time.perf_counter()
            visits.append({"head": name, "description_ms": 1e3 * (t1 - t0), "ablation_ms": 1e3 * (t2 - t1),
                           "images_ms": 1e3 * (t3 - t2), "total_ms": 1e3 * (t3 - t0), "cpu_ms": 1e3 * (cpu_s() - c0)})
        totals = sorted(v["total_ms"] for v in visits)
        cpus = sorted(v["cpu_ms"] for v in visits)
        result = {"visits": visits, "p50_ms": statistics.median(totals),
                  "p95_ms": totals[min(len(totals) - 1, round(0.95 * (len(totals) - 1)))],
                  "cpu_p95_ms": cpus[min(len(cpus) - 1, round(0.95 * (len(cpus) - 1)))]}
    else:
        raise SystemExit(f"unknown job {job}")
    seconds, cpu = time.perf_counter() - start, cpu_s() - cpu0
    return {"seconds": seconds, "cpu_s": cpu, "rss_setup_mb": rss0, "rss_peak_mb": rss_mb(), **sampler.stop(), **result}


def run_child(job: str, cache: Path, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "-m", __spec__.name, "--child", job, "--out", out.name, "--layer", str(args.layer),
                   "--head", str(args.head), "--heads", str(args.heads), str(cache.resolve())]
        if args.pool:
            command += ["--pool", str(Path(args.pool).resolve()) if Path(args.pool).exists() else args.pool]
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=ROOT,
                              env={**os.environ, "SCALE_THREADS": str(args.threads)})
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else f"exit {done.returncode}"}
        return json.loads(Path(out.name).read_text())


def timed_cli(args_: list[str]) -> dict:
    """Wall seconds and peak RSS (MB) of one `clipterm` command in its own process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "clipterm", *args_], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": time.perf_counter() - start, "rss_peak_mb": usage.ru_maxrss / 1024, "code": proc.returncode}


def tui_first_frame(cache: Path, repeats: int) -> dict:
    """Spawn `clipterm tui CACHE --images half` on a pty until the tree (`L0`) shows; median of `repeats` after one
    untimed run. The app is then killed: quitting waits for its model-loading worker, which is not what is measured."""
    import signal

    from tui import Terminal, bench_env
    from tui_helpers import clipterm_command

    runs = []
    with tempfile.TemporaryDirectory() as config:
        for k in range(repeats + 1):
            term = Terminal(clipterm_command() + ["tui", str(cache), "--cache-dir", str(cache.parent), "--images", "half"],
                            bench_env(config))
            try:
                seconds = term.wait_for("L0", timeout=120)
            except RuntimeError as exc:
                return {"error": str(exc)[:300]}
            finally:
                os.killpg(term.process.pid, signal.SIGKILL)
                term.close()
            if k:
                runs.append(seconds)
    return {"seconds": statistics.median(runs), "runs_s": runs}


def baseline_rss() -> float:
    proc = subprocess.Popen([sys.executable, "-c", "import torch, open_clip"])
    _, _, usage = os.wait4(proc.pid, 0)
    return usage.ru_maxrss / 1024


# ----------------------------------------------------------------- the run


def measure(cache: Path, args: argparse.Namespace, base: float) -> dict:
    manifest = json.loads((cache / "manifest.json").read_text())
    rows = sum(r["rows"] for r in manifest["shards"])
    entry: dict = {"cache": cache.name, "arch": manifest["model"]["arch"], "images": rows,
                   "bytes": sum(p.stat().st_size for p in cache.iterdir() if p.is_file()), "jobs": {}}
    entry["bytes_per_image"] = round(entry["bytes"] / rows)
    entry["jobs"]["info"] = timed_cli(["cache", "info", str(cache)])
    jobs = ["verify", "textspan_head", "textspan_layer", "ablate_head", "ablate_layer", "images_head", "images_neuron"]
    if not args.no_tui:
        jobs.append("tui_visit")
    for job in jobs:
        if job in args.skip:
            entry["jobs"][job] = {"error": "skipped (--skip)"}
            continue
        if job == "images_neuron" and not (cache / f"neurons.L{args.layer}.safetensors").is_file():
            entry["jobs"][job] = {"error": "no neurons file: `images` ranks neurons by their second-order effects, which "
                                           "`clipterm neurons build` computes with forward passes (not synthetic)"}
            continue
        floor = {}
        if not job.startswith("textspan"):  # read twice: the first read warms the page cache as it would for the job
            ranges = ranges_for(cache, job, args.layer, args.head)
            first = read_floor(ranges)
            floor = {**read_floor(ranges), "floor_first_read_s": first["floor_s"]}
        result = run_child(job, cache, args)
        if floor and "seconds" in result:
            result.update(floor, x_floor=result["seconds"] / max(floor["floor_s"], 1e-9))
            if "cpu_s" in result:  # CPU seconds over the floor's wall seconds: what the machine's load does not inflate
                result["cpu_x_floor"] = result["cpu_s"] / max(floor["floor_s"], 1e-9)
        if "rss_peak_mb" in result:
            result["rss_above_baseline_mb"] = result["rss_peak_mb"] - base
            result["rss_of_job_mb"] = result["rss_peak_mb"] - result["rss_setup_mb"]
        entry["jobs"][job] = result
        print(f"  {cache.name} {job}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in result.items() if k != "visits"), flush=True)
    if not args.no_tui and "tui_first_frame" not in args.skip:
        entry["jobs"]["tui_first_frame"] = tui_first_frame(cache, args.repeats)
        print(f"  {cache.name} tui_first_frame: {entry['jobs']['tui_first_frame']}", flush=True)
    return entry


def table(paths: list[Path]) -> str:
    """A markdown table of every cache in the given results files: seconds, x floor, and MB above the baseline."""
    rows = {}
    for path in paths:
        record = json.loads(path.read_text())
        for entry in record["caches"]:
            rows.setdefault(entry["cache"], {"images": entry["images"], "arch": entry["arch"], "jobs": {}})
            rows[entry["cache"]]["jobs"].update({k: v for k, v in entry["jobs"].items() if "error" not in v
                                                 or k not in rows[entry["cache"]]["jobs"]})
    columns = [("info", "cache info"), ("verify", "cache verify"), ("textspan_head", "TextSpan, a head"),
               ("textspan_layer", "TextSpan, a layer"), ("ablate_head", "ablate --by head"),
               ("ablate_layer", "ablate --by layer"), ("images_head", "images, a head"),
               ("tui_first_frame", "TUI first frame"), ("tui_visit", "TUI first visit of a head, p95")]
    lines = ["| job | " + " | ".join(f"{r['arch']} {r['images'] // 1000}k" for r in rows.values()) + " |",
             "|---|" + "---|" * len(rows)]
    for key, title in columns:
        cells = []
        for r in rows.values():
            job = r["jobs"].get(key)
            if job is None or "error" in job:
                cells.append("not run")
                continue
            seconds = job["p95_ms"] / 1e3 if key == "tui_visit" else job["seconds"]
            cell = f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.0f} s"
            if key == "tui_visit" and "cpu_p95_ms" in job:
                cell = f"{job['p95_ms']:.0f} ms (CPU {job['cpu_p95_ms']:.0f} ms)"
            if "x_floor" in job and key != "tui_visit":
                ratio = lambda x: f"{x:.1f}x" if x < 100 else f"{x:.0f}x"  # noqa: E731
                cell += (f" ({ratio(job['x_floor'])} floor; CPU {ratio(job['cpu_x_floor'])})" if "cpu_x_floor" in job
                         else f" ({ratio(job['x_floor'])} floor)")
            grew = job.get("rss_job_peak_mb", job.get("rss_of_job_mb", 0))
            if grew >= 20:
                cell += f", +{grew:.0f} MB"
            cells.append(cell)
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("caches", nargs="+", type=Path, help="synthetic caches, smallest first")
    parser.add_argument("--pool", default=None, help="text pool for TextSpan and top images (default: general)")
    parser.add_argument("--layer", type=int, default=9, help="the layer (and neuron L.N123) of the per-component jobs")
    parser.add_argument("--head", type=int, default=3)
    parser.add_argument("--heads", type=int, default=8, help="uncached heads the TUI's first visits are timed on")
    parser.add_argument("--repeats", type=int, default=3, help="timed TUI first-frame runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job (1 on a shared machine: two threads "
                        "on two busy cores made many small ops several times slower)")
    parser.add_argument("--no-tui", action="store_true", help="skip the TUI's first frame and first visits")
    parser.add_argument("--skip", action="append", default=[], help="a job to leave out (repeatable), e.g. ablate_head")
    parser.add_argument("--name", default="scale", help="bench/results/<name>.json")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the given results JSON files")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print(table(args.caches))
        return
    if args.child:
        Path(args.out).write_text(json.dumps(child(args.child, str(args.caches[0]), args.pool, args.layer, args.head,
                                                   args.heads)))
        return
    base = baseline_rss()
    print(f"baseline `import torch, open_clip`: {base:.0f} MB", flush=True)
    entries = []
    for cache in args.caches:  # written after each cache, so a long run keeps what it measured
        entries.append(measure(cache, args, base))
        path = write_result(args.name, {"baseline_import_torch_open_clip_rss_mb": base, "goals": GOALS, "pool": args.pool,
                                        "layer": args.layer, "head": args.head, "ablation_draws": DRAWS, "threads": args.threads,
                                        "load": os.getloadavg(), "caches": entries})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
