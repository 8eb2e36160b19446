"""`clipterm search` from the command line: JSON lines, plain lines, the live table, Ctrl-C and bad inputs."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import pytest

from clipterm.analyses.lm import DEFAULT_WEIGHT
from clipterm.cli.search import DEFAULT_LM_WEIGHT

QUICK = ["--beam", "3", "--top-tokens", "8", "--random", "4", "--steps", "4"]


def test_json_lines(cli):
    result = cli("search", "--target", "text:a red circle", *QUICK, "--json")
    assert result.code == 0, result
    events = [json.loads(line) for line in result.out.splitlines()]
    assert [e["step"] for e in events] == [0, 1, 2, 3, 4, 4]
    assert all(e["schema"] == "clipterm.search/1" for e in events)
    assert events[-1]["done"] and events[-1]["reason"] == "steps"
    best = events[-1]["best"]
    assert len(best) == 3 and set(best[0]) == {"text", "score", "cosine", "lm_nll", "lm_penalty"} and best[0]["score"] >= best[1]["score"]
    weight = events[-1]["lm_weight"]
    assert events[-1]["lm"] == "ngram:toy" and weight == DEFAULT_WEIGHT == DEFAULT_LM_WEIGHT  # guided by default
    for hit in best:  # the cosine and the LM term, each on its own
        assert hit["lm_nll"] > 0 and hit["lm_penalty"] >= 0
        assert hit["score"] <= hit["cosine"] - weight * hit["lm_penalty"] + 1e-5
    assert events[-1]["evals"] > events[1]["evals"] > 0 and events[-1]["evals_per_s"] > 0


def test_plain_lines_when_piped(cli):
    result = cli("search", "--target", "text:red - text:blue", *QUICK, "--lambda", "0", "--lm-weight", "0", "--seed", "3")
    assert result.code == 0, result
    lines = result.out.splitlines()
    assert lines[0].startswith("step 0\t") and "# stopped: steps" in lines
    final = lines[lines.index("# stopped: steps") + 1 :]
    assert len(final) == 3
    score, cosine, _text = final[0].split("\t")
    assert float(score) == pytest.approx(float(cosine), abs=1e-4)  # both weights 0: the score is the cosine


def test_live_table_on_a_terminal(cli, monkeypatch):
    from rich.console import Console

    import clipterm.cli.search as module

    screen = io.StringIO()
    monkeypatch.setattr(module, "stdout", Console(file=screen, force_terminal=True, width=100))
    result = cli("search", "--target", "class:star", *QUICK)
    assert result.code == 0, result
    assert "search: class:star" in screen.getvalue() and "stopped: steps" in screen.getvalue()


def test_head_targets_with_a_cache_use_the_cache_model(cli, tmp_path, toy):
    from clipterm.cache.build import BuildOptions, build_cache

    build_cache(BuildOptions(images="toy:32", cache_dir=str(tmp_path), name="tiny", device="cpu", workers=0), loaded=toy)
    result = cli("search", "--cache", str(tmp_path / "tiny"), "--target", "L5.H2:pc2 - class:colour/red", *QUICK, "--json")
    assert result.code == 0, result
    assert json.loads(result.out.splitlines()[-1])["reason"] == "steps"


def test_vocabulary_file_and_its_warning(cli, tmp_path):
    words = tmp_path / "colours.txt"
    words.write_text("red\ngreen\nblue\nwhatchamacallitz\n")
    result = cli("search", "--target", "text:green", *QUICK, "--vocab", str(words), "--json")
    assert result.code == 0, result
    assert "whatchamacallitz" in result.err and "left out" in result.err
    final = json.loads(result.out.splitlines()[-1])
    assert all(set(hit["text"].split()) <= {"red", "green", "blue"} for hit in final["best"])


def test_unguided_events_say_so(cli):
    result = cli("search", "--target", "text:a red circle", *QUICK, "--lm", "none", "--json")
    assert result.code == 0, result
    last = json.loads(result.out.splitlines()[-1])
    assert last["lm"] is None and all(hit["lm_nll"] is None for hit in last["best"])


def test_a_corpus_of_ones_own_trains_the_ngram(cli, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a green circle\na red square\nthe green square\n")
    result = cli("search", "--target", "text:a green square", *QUICK, "--lm-corpus", str(corpus), "--json")
    assert result.code == 0, result
    last = json.loads(result.out.splitlines()[-1])
    assert last["lm"] == "ngram:corpus.txt" and last["best"][0]["lm_nll"] > 0


@pytest.mark.parametrize("args, message", [
    (["--target", "text:red", "--lm-weight", "-0.5"], "--lm-weight must be 0 or more"),
    (["--target", "text:red", "--lm-corpus", "EMPTY"], "has no words"),
    (["--target", "text:red", "--lm-corpus", "LATIN1"], "is not UTF-8 (bad byte at line 2)"),
    (["--target", "text:red", "--lm-corpus", "MISSING"], "no --lm-corpus file"),
    (["--target", "text:red", "--lm", "none", "--lm-corpus", "EMPTY"], "--lm is none"),
    (["--target", "text:red", "--vocab", "FOREIGN"], "shares no words with the n-gram corpus toy"),
    (["--target", "text:red", "--lm", "no-such-lm-xyz"], "not in the local Hugging Face cache"),
])
def test_bad_lm_inputs_get_one_line_and_a_hint(cli, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "latin1.txt").write_bytes("red\ncaf\xe9\n".encode("latin-1"))
    (tmp_path / "foreign.txt").write_text("zebra\nquantum\nviolin\n")
    files = {"EMPTY": "empty.txt", "LATIN1": "latin1.txt", "FOREIGN": "foreign.txt", "MISSING": "missing.txt"}
    args = [str(tmp_path / files[a]) if a in files else a for a in args]
    result = cli("search", *args)
    assert result.code != 0 and message in result.err, result
    assert "hint:" in result.err and "Traceback" not in result.err and result.out == ""
    if "no-such-lm-xyz" in args:  # where it looked, and how to fetch it
        assert "huggingface" in result.err and "CLIPTERM_DOWNLOAD=1" in result.err


@pytest.mark.parametrize("args, message", [
    (["--target", "purple-ish"], "unknown target"),
    (["--target", "L5.H2"], "needs a cache"),
    (["--target", "text:red", "--beam", "0"], "--beam must be at least 1"),
    (["--target", "text:red", "--vocab", "EMPTY"], "is empty"),
    (["--target", "text:red", "--cache", "no-such-cache"], "no cache"),
])
def test_bad_inputs_get_one_clear_line(cli, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("")
    args = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in args]
    result = cli("search", *args)
    assert result.code != 0 and message in result.err, result
    assert "Traceback" not in result.err and result.out == ""


def test_ctrl_c_stops_cleanly_with_the_best_so_far(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLIPTERM_CACHE": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "clipterm", "search", "--target", "text:a red circle", "--steps", "100000",
         "--patience", "100000", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    while json.loads(process.stdout.readline())["step"] < 1:  # wait until it has found something
        pass
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    last = json.loads(out.splitlines()[-1])
    assert process.returncode == 130, err
    assert last["done"] and last["reason"] == "cancelled" and last["best"][0]["text"]
    assert "Traceback" not in err
