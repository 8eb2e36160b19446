"""clipterm's benchmarks, by kind: `speed/`, `scale/`, `truth/`, and `tools/` that they use.

Run one from the checkout's root as a module (`python -m bench.speed.search --help`); `python -m bench` lists
them all with their last result file. docs/benchmarks.md says what each measures.
"""
