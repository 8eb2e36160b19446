"""`clipterm tui` in a real terminal: the console script inside a detached 100x30 tmux session, driven by keys."""

from __future__ import annotations

import os

import pytest
from test_tui import toy_cache  # noqa: F401  (the 64-image toy cache fixture)
from tui_helpers import TMUX, Tmux, clipterm_command

pytestmark = [
    pytest.mark.skipif(TMUX is None, reason="tmux is not installed: this test runs `clipterm tui` in a real terminal "
                                            "inside tmux (.ci/run installs it)"),
    pytest.mark.slow,
]


@pytest.fixture
def terminal(toy_cache, tmp_path):  # noqa: F811
    reader, root = toy_cache
    # conftest's isolated CLIPTERM_CACHE / CLIPTERM_CONFIG are in os.environ; the tmux server passes them on
    term = Tmux(clipterm_command() + ["tui", str(reader.path), "--cache-dir", root], dict(os.environ),
                tmp_path)
    yield term
    term.close()


def test_keys_in_a_real_terminal_move_expand_switch_panes_show_help_and_quit(terminal):
    screen = terminal.wait_for(lambda s: "L0" in s and "L5" in s and "Descriptions" in s, "the tree and the panes")
    assert terminal.size() == (100, 30) and len(screen.splitlines()) == 30
    assert "select a head" in screen and "▶ L0" in screen and "── H0" not in screen  # layers start collapsed

    terminal.send("j", "Enter")  # the cursor to L0, then expand it
    screen = terminal.wait_for(lambda s: "▼ L0" in s and "── H0" in s and "── MLP" in s, "L0's heads and MLP")
    assert "── H7" in screen and "▶ L1" in screen
    terminal.send("j")  # L0.H0: TextSpan is computed in a worker (first use loads torch and the model)
    screen = terminal.wait_for(lambda s: "L0.H0" in s and "TextSpan over pool toy" in s, "L0.H0's TextSpan texts",
                               timeout=60)
    assert "together" in screen and "% of the variance" in screen

    terminal.send("Tab")  # the Ablation pane: L0's heads and MLP, mean-ablated
    screen = terminal.wait_for(lambda s: "L0 heads and MLP" in s and "L0.MLP" in s, "L0's ablation bars", timeout=60)
    assert "mean-ablation, task" in screen and "TextSpan over pool" not in screen

    terminal.send("?")
    screen = terminal.wait_for(lambda s: "clipterm keys" in s and "tree.down" in s, "the help screen")
    assert "panes.next" in screen and "quit" in screen
    terminal.send("Escape")
    terminal.wait_for(lambda s: "tree.down" not in s and "L0.MLP" in s, "the help screen to close")

    assert terminal.exit_status() is None  # still running
    terminal.send("q")
    terminal.wait_for(lambda s: terminal.exit_status() is not None, "clipterm tui to exit after q", timeout=30)
    assert terminal.exit_status() == 0
