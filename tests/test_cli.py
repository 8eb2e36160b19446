"""The command-line skeleton: help, errors as one line plus a hint, JSON with a schema, no torch for --help."""

import json
import subprocess
import sys

import pytest


def test_bare_clipterm_shows_help(cli):
    result = cli()
    assert "Usage" in result.out + result.err
    assert "doctor" in result.out + result.err


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from clipterm.cli.app import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("NO-TORCH")


def test_python_dash_m_runs_the_same_app():
    out = subprocess.run([sys.executable, "-m", "clipterm", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "locate" in out.stdout


def test_locate_follows_the_cache_root_rule(cli, tmp_path, monkeypatch):
    assert cli("locate", "cache", "--cache-dir", str(tmp_path)).out.strip() == str(tmp_path)
    monkeypatch.setenv("CLIPTERM_CACHE", str(tmp_path / "env"))
    assert cli("locate", "cache").out.strip() == str(tmp_path / "env")
    monkeypatch.delenv("CLIPTERM_CACHE")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").mkdir()
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "clipterm"\n')  # ./cache counts in a checkout of clipterm
    payload = json.loads(cli("locate", "cache", "--json").out)
    assert payload["schema"].startswith("clipterm.locate/") and payload["paths"] == [str(tmp_path / "cache")]


def test_locate_themes_lists_bundled_themes(cli):
    paths = cli("locate", "themes").out.split()
    from pathlib import Path

    assert any((Path(p) / "clipterm-dark.toml").is_file() for p in paths)


def test_models_json_lists_toy_and_refusals(cli):
    result = cli("models", "--json")
    assert result.code == 0
    rows = json.loads(result.out)["models"]
    toy = next(r for r in rows if r["model"] == "toy")
    assert toy["weights"] == "present" and toy["supported"]
    vit = next(r for r in rows if r["model"] == "ViT-B-32" and r["pretrained"] == "openai")
    assert vit["supported"] and vit["quick_gelu"] and vit["weights"] in ("present", "needs download")
    refused = {r["model"]: r["reason"] for r in rows if not r["supported"]}
    resnets = [r for r in rows if r["model"].startswith("RN")]
    assert len(resnets) == 16 and all(r["supported"] for r in resnets)  # every ModifiedResNet arch/tag pair
    assert "FastViT" in refused["MobileCLIP-S1"] and "ViT-SO400M-14-SigLIP" not in refused  # SigLIP decomposes
    siglip = next(r for r in rows if r["model"] == "ViT-SO400M-14-SigLIP")
    assert siglip["supported"] and siglip["tower"] == "timm vision_transformer (map)"


def test_doctor_json(cli):
    payload = json.loads(cli("doctor", "--json").out)
    assert payload["schema"] == "clipterm.doctor/1"
    for key in ("python", "torch", "open_clip", "cuda", "cache_root", "config_dir", "weights_present"):
        assert key in payload
    assert any(m["model"] == "toy" for m in payload["weights_present"])


def assert_one_line_error(result, *fragments):
    assert result.code != 0
    assert "Traceback" not in result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert lines[0].startswith("error:") and lines[-1].startswith("hint:") and len(lines) == 2, result.err
    for fragment in fragments:
        assert fragment in result.err


def test_unknown_component_is_one_line_error(cli):
    assert_one_line_error(cli("names", "L99.H0", "--model", "toy"), "no layer 99", "L0..L5")


def test_unknown_model_is_one_line_error(cli):
    result = cli("names", "L1.H0", "--model", "ViT-B-33")
    assert_one_line_error(result, "unknown model", "ViT-B-32")
    assert result.code == 3


def test_unexpected_errors_have_no_traceback_unless_debugging(cli, monkeypatch):
    import clipterm.cli.basics as basics

    def boom(**_):
        raise RuntimeError("kaboom")

    monkeypatch.setattr("clipterm.doctor.report", boom)
    assert_one_line_error(cli("doctor"), "kaboom", "CLIPTERM_DEBUG=1")
    monkeypatch.setenv("CLIPTERM_DEBUG", "1")
    with pytest.raises(RuntimeError):
        cli("doctor")
    assert basics  # the module under test is the real one
