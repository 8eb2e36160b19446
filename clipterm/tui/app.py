"""`clipterm tui`: the model tree on the left, Descriptions / Ablation / Info panes on the right.

The app only routes selections to workers and results to panes. Every number comes from
`Analyses` (the core, memoised), run in `@work(thread=True)` workers; results come back through
`call_from_thread`. A failing worker shows an error notification and the app keeps running.

| key | id | action |
|---|---|---|
| j / k | tree.down / tree.up | move in the tree, like the arrows |
| tab / shift+tab | panes.next / panes.previous | switch pane |
| ? | help | this list |
| q | quit | quit |
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import Footer, TabbedContent, TabPane, Tree
from textual.worker import Worker, WorkerState

from clipterm import names
from clipterm.tui.analyses import Analyses
from clipterm.tui.screens import HelpScreen
from clipterm.tui.widgets import AblationPane, DescriptionPane, InfoPane

PANES = ["descriptions", "ablation", "info"]


class ClipTermApp(App[None]):
    """Browse one cache: pick a head or MLP in the tree, read what it says and how much it matters."""

    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute, so subclasses elsewhere find it too
    TITLE = "clipterm"
    BINDINGS = [
        Binding("j", "move(1)", "Down", id="tree.down", show=False),
        Binding("k", "move(-1)", "Up", id="tree.up", show=False),
        Binding("tab", "switch_pane(1)", "Next pane", id="panes.next", priority=True),
        Binding("shift+tab", "switch_pane(-1)", "Previous pane", id="panes.previous", show=False, priority=True),
        Binding("question_mark", "help", "Help", id="help"),
        Binding("q", "quit", "Quit", id="quit"),
    ]

    def __init__(self, reader: Any, pool: str | None = None, cache_dir: str | None = None, theme: Any = None):
        super().__init__()
        self.reader = reader
        self.analyses = Analyses(reader, pool=pool, cache_dir=cache_dir)
        self.selected = "model"
        self._theme = theme
        self.nodes: dict[str, Any] = {}  # component name -> tree node

    # ----------------------------------------------------------------- layout

    def compose(self) -> ComposeResult:
        model = self.reader.manifest["model"]
        tree: Tree[str] = Tree(f"{model.get('arch') or model.get('spec')} · {self.reader.name}", data="model", id="tree")
        yield tree
        with TabbedContent(id="panes"):
            with TabPane("Descriptions", id="descriptions"):
                yield DescriptionPane(id="descriptions-body", classes="pane-body")
            with TabPane("Ablation", id="ablation"):
                yield AblationPane(id="ablation-body", classes="pane-body")
            with TabPane("Info", id="info"):
                yield InfoPane(id="info-body", classes="pane-body")
        yield Footer()

    def on_mount(self) -> None:
        if self._theme is not None:
            self.register_theme(self._theme)
            self.theme = self._theme.name
        tree = self.query_one(Tree)
        self.nodes["model"] = tree.root
        shape = self.reader.shape
        for layer in range(shape.layers):
            layer_node = tree.root.add(f"L{layer}", data=f"L{layer}")
            self.nodes[f"L{layer}"] = layer_node
            for head in range(shape.heads):
                self.nodes[f"L{layer}.H{head}"] = layer_node.add_leaf(f"L{layer}.H{head}", data=f"L{layer}.H{head}")
            self.nodes[f"L{layer}.MLP"] = layer_node.add_leaf(f"L{layer}.MLP", data=f"L{layer}.MLP")
        tree.root.expand()
        tree.focus()
        self.select("model")

    # ----------------------------------------------------------------- selection -> panes

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted) -> None:
        if event.node.data and event.node.data != self.selected:
            self.select(event.node.data)

    def select(self, component: str) -> None:
        """Show a component in every pane: at once where memoised, else via a worker."""
        self.selected = component
        self.query_one(InfoPane).show(self.analyses.info(component))
        self._refresh_description(component)
        self._refresh_ablation(component)

    def jump(self, component: str) -> None:
        """Move the tree cursor to a component by name (expanding its layer)."""
        node = self.nodes[component]
        if node.parent is not None:
            node.parent.expand()
        # the expanded layer's lines exist only after the next refresh
        self.call_after_refresh(self.query_one(Tree).move_cursor, node)
        self.select(component)

    @staticmethod
    def _layer_of(component: str) -> int | None:
        return None if component == "model" else names.parse(component).layer

    @staticmethod
    def _describable(component: str) -> bool:
        return component != "model" and names.parse(component).kind in ("head", "mlp")

    def _refresh_description(self, component: str) -> None:
        pane = self.query_one(DescriptionPane)
        if not self._describable(component):
            pane.show_message("select a head (L0.H0) or an MLP (L0.MLP) to see its TextSpan texts")
            return
        result = self.analyses.cached("description", component)
        if result is not None:
            pane.show(result)
            return
        pane.show_message(f"{component}: computing TextSpan…")
        self._describe(component)

    def _refresh_ablation(self, component: str) -> None:
        pane = self.query_one(AblationPane)
        layer = self._layer_of(component)
        if layer is None:
            pane.show_message("select a layer, head or MLP to see what mean-ablating each of its parts costs")
            return
        result = self.analyses.cached("ablation", layer)
        if result is not None:
            pane.show(result, component)
            return
        pane.show_message(f"L{layer}: mean-ablating its heads…")
        self._ablate(layer)

    # ----------------------------------------------------------------- workers

    @work(thread=True, group="describe", exit_on_error=False)
    def _describe(self, component: str) -> None:
        if component != self.selected:  # the user moved on before this worker started
            return
        self.analyses.description(component)
        self.call_from_thread(self._arrived, "describe", component)

    @work(thread=True, group="ablate", exit_on_error=False)
    def _ablate(self, layer: int) -> None:
        if self._layer_of(self.selected) != layer:
            return
        self.analyses.layer_ablation(layer)
        self.call_from_thread(self._arrived, "ablate", f"L{layer}")

    def _arrived(self, group: str, component: str) -> None:
        """A worker finished: redraw its pane if the selection still shows that result (memoised, so cheap)."""
        if group == "describe" and component == self.selected:
            self._refresh_description(self.selected)
        elif group == "ablate" and self._layer_of(component) == self._layer_of(self.selected):
            self._refresh_ablation(self.selected)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state != WorkerState.ERROR:
            return
        error = event.worker.error
        message = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
        hint = getattr(error, "hint", None)
        self.notify(message + (f"\nhint: {hint}" if hint else ""), title=f"{event.worker.group} failed",
                    severity="error", timeout=8)
        pane = {"describe": DescriptionPane, "ablate": AblationPane}[event.worker.group]
        self.query_one(pane).show_message(f"failed: {message}")

    # ----------------------------------------------------------------- actions

    def action_move(self, step: int) -> None:
        tree = self.query_one(Tree)
        tree.action_cursor_down() if step > 0 else tree.action_cursor_up()

    def action_switch_pane(self, step: int) -> None:
        tabs = self.query_one(TabbedContent)
        tabs.active = PANES[(PANES.index(tabs.active) + step) % len(PANES)]

    def action_help(self) -> None:
        self.push_screen(HelpScreen([b for b in self.BINDINGS if isinstance(b, Binding)]))
