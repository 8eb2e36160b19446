"""`clipterm tui`: the model tree on the left, panes that follow the selection on the right.

The app only routes selections to workers and results to panes. Every number comes from
`Analyses` (the core, memoised), run in thread workers; results come back through
`call_from_thread`. A failing worker shows an error notification and the app keeps running.

| key | id | action |
|---|---|---|
| j / k, ↓ / ↑ | tree.down / tree.up | move in the tree |
| l / → , h / ← | tree.expand / tree.collapse | expand a node; collapse it or go to its parent |
| / | tree.filter | filter the tree by name or hint (escape clears) |
| tab / shift+tab | panes.next / panes.previous | switch pane |
| s | search.toggle | start or stop a hill-climb for the selection (or the typed target) |
| v | visualise.toggle | start or stop a feature visualisation of the selection (or the typed target) |
| g | search.guidance | language-model guidance of the next search on or off (the n-gram LM; on at start) |
| t | ablation.task | show the next task's ablation |
| [ / ] | spatial.previous / spatial.next | the Spatial pane's previous / next cache image |
| c | copy | copy the active pane's text (OSC 52) |
| ctrl+p | command_palette | jump to a component by name, run an action |
| ? | help | every key, with its id |
| q | quit | quit |

Keys are remapped by id in `config.toml` (`clipterm locate config`).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Footer, Input, TabbedContent, TabPane, Tree
from textual.worker import Worker, WorkerState

from clipterm import names
from clipterm.analyses.session import Analyses, SpatialRequest
from clipterm.tui._live import LiveMixin
from clipterm.tui._tree import TreeMixin
from clipterm.tui.commands import ComponentCommands
from clipterm.tui.screens import HelpScreen
from clipterm.tui.widgets import (
    AblationPane,
    DescriptionPane,
    ImagesPane,
    InfoPane,
    SearchPane,
    SpatialPane,
    VisualisePane,
    steady,
)

PANES = ["descriptions", "ablation", "search", "images", "spatial", "visualise", "info"]


class ClipTermApp(TreeMixin, LiveMixin, App[None]):
    """Browse one cache: pick a layer, head, MLP or neuron in the tree; the panes say what it does."""

    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute, so subclasses elsewhere find it too
    TITLE = "clipterm"
    COMMANDS = App.COMMANDS | {ComponentCommands}
    BINDINGS = [
        Binding("j", "move(1)", "Down", id="tree.down", show=False),
        Binding("k", "move(-1)", "Up", id="tree.up", show=False),
        Binding("l,right", "expand", "Expand", id="tree.expand", show=False),
        Binding("h,left", "collapse", "Collapse / parent", id="tree.collapse", show=False),
        Binding("slash", "filter", "Filter", id="tree.filter"),
        Binding("tab", "switch_pane(1)", "Next pane", id="panes.next", priority=True),
        Binding("shift+tab", "switch_pane(-1)", "Previous pane", id="panes.previous", show=False, priority=True),
        Binding("s", "search", "Search", id="search.toggle"),
        Binding("v", "visualise", "Visualise", id="visualise.toggle"),
        Binding("g", "toggle_guidance", "LM guidance", id="search.guidance", show=False),
        Binding("t", "next_task", "Task", id="ablation.task", show=False),
        Binding("left_square_bracket", "spatial_step(-1)", "Previous image", id="spatial.previous", show=False),
        Binding("right_square_bracket", "spatial_step(1)", "Next image", id="spatial.next", show=False),
        Binding("c", "copy", "Copy", id="copy", show=False),
        Binding("escape", "escape", "Close filter", id="escape", show=False),
        Binding("question_mark", "help", "Help", id="help"),
        Binding("q", "quit", "Quit", id="quit"),
    ]

    def __init__(self, reader: Any, pool: str | None = None, cache_dir: str | None = None, theme: Any = None,
                 images: str = "half", keymap: dict[str, str] | None = None, loaded: Any = None,
                 load_model: Callable[[], Any] | None = None, hints: bool = True):
        super().__init__()
        self.reader = reader
        self.analyses = Analyses(reader, pool=pool, cache_dir=cache_dir, loaded=loaded, load_model=load_model)
        self.selected = "model"
        self.images = images
        self.task_index: int | None = None  # which task the Ablation pane shows; None: the one hurt most
        self.hints: dict[str, str] = {}  # component -> one-line hint shown next to its tree node
        self.nodes: dict[str, Any] = {}  # component name -> tree node
        self.neuron_rows: dict[int, list[Any]] = {}  # layer -> neurons shown under its MLP
        self.filter_text = ""
        self.search_results: dict[str, Any] = {}  # target -> last event
        self.search_running: str | None = None
        self.search_lm: str | None = "ngram"  # the language model that guides the next search; None: unguided
        self.spatial_row: int | None = None  # the Spatial pane's cache row; None: the selection's top image
        self.spatial_typed = ""  # a typed target (or `nmf K`) that replaces the selection in the Spatial pane
        self._search_stop = threading.Event()
        self.visual_frames: dict[str, Any] = {}  # target -> last frame shown
        self.visual_running: str | None = None
        self.visual_steps = 128  # steps of a visualisation started from the pane
        self._visual_stop = threading.Event()
        self._theme, self._keymap, self._with_hints = theme, keymap or {}, hints
        self._held: list[tuple[Callable[[], None], str, str]] | None = []  # workers asked for before the first frame
        self.animation_level = "none"  # calm over SSH; no smooth scrolling or fades

    # ----------------------------------------------------------------- layout

    def compose(self) -> ComposeResult:
        with Vertical(id="left"):
            yield steady(Input(placeholder="filter: L3, H2, red…", id="filter"))
            yield Tree(self._root_label(), data="model", id="tree")
        with TabbedContent(id="panes"):
            with TabPane("Descriptions", id="descriptions"):
                yield DescriptionPane(id="descriptions-body", classes="pane-body")
            with TabPane("Ablation", id="ablation"):
                yield AblationPane(id="ablation-body", classes="pane-body")
            with TabPane("Search", id="search"):
                yield SearchPane(id="search-body")
            with TabPane("Images", id="images"):
                yield ImagesPane(self.images, id="images-body")
            with TabPane("Spatial", id="spatial"):
                yield SpatialPane(id="spatial-body")
            with TabPane("Visualise", id="visualise"):
                yield VisualisePane(id="visualise-body")
            with TabPane("Info", id="info"):
                yield InfoPane(id="info-body", classes="pane-body")
        yield Footer()

    def on_mount(self) -> None:
        if self._theme is not None:
            self.register_theme(self._theme)
            self.theme = self._theme.name
        if self._keymap:
            self.set_keymap(self._keymap)
        self.query_one("#filter").display = False
        self._populate()
        tree = self.query_one(Tree)
        tree.focus()
        self.select("model")
        if self._with_hints:
            self._run_thread(self._compute_hints, "hints", "hints")

    def on_ready(self) -> None:
        """After the first frame: start the workers asked for until now. Started earlier, their imports (numpy,
        then torch) hold the GIL while Textual draws, and the first frame waits for them."""
        held, self._held = self._held or [], None
        for job, group, name in held:
            self._run_thread(job, group, name)

    def _run_thread(self, job: Callable[[], None], group: str, name: str) -> None:
        if self._held is not None:
            self._held.append((job, group, name))
            return
        self.run_worker(job, thread=True, group=group, exit_on_error=False, name=name)

    def _root_label(self) -> str:
        model = self.reader.manifest["model"]
        return f"{model.get('arch') or model.get('spec')} · {self.reader.name}"

    # ----------------------------------------------------------------- selection -> panes

    def select(self, component: str) -> None:
        """Show a component in every pane: at once where memoised, else via a worker."""
        self.selected = component
        self.query_one(InfoPane).show(self.analyses.info(component))
        self._refresh_description()
        self._refresh_ablation()
        self._refresh_images()
        self._refresh_search()
        self._refresh_spatial()
        self._refresh_visualise()

    def _kind(self) -> str:
        return "model" if self.selected == "model" else names.parse(self.selected).kind

    def _layer(self) -> int | None:
        return None if self.selected == "model" else names.parse(self.selected).layer

    def _ablation_layer(self) -> int | None:
        """Whose parts the Ablation pane lists: the selection's layer's (a ResNet's pool, a ConvNeXt's last stage)."""
        return None if self.selected == "model" else self.reader.tower.ablation_layer(self._layer())

    def _compute(self, group: str, key: Any, compute: Callable[[], Any]) -> None:
        """Run `compute` in a thread worker, unless the user moved on before it started; then redraw `group`."""
        def job() -> None:
            if group != "neurons" and self._wanted(group) != key:
                return
            compute()
            self.call_from_thread(self._arrived, group, key)

        self._run_thread(job, group, f"{group}:{key}")

    def _wanted(self, group: str) -> Any:
        """The key the selection needs for a pane, or None."""
        kind = self._kind()
        if group == "describe":
            return self.selected if kind in ("head", "mlp", "neuron") else None
        if group == "ablate":
            return "layers" if kind == "model" else self._ablation_layer()
        if group == "images":
            return self.selected if kind in ("head", "mlp", "neuron") and self.images != "off" else None
        if group == "spatial":
            return self._spatial_key()
        return None

    def _arrived(self, group: str, key: Any) -> None:
        if group == "neurons":
            self._add_neurons(key)
        elif group == "describe":
            self._refresh_description()
        elif group == "ablate":
            self._refresh_ablation()
        elif group == "images":
            self._refresh_images()
            self._refresh_spatial()  # its default image is the selection's top image
            self._refresh_visualise()  # its dataset examples
        elif group == "spatial":
            self._refresh_spatial()

    def _refresh_description(self) -> None:
        pane, component, kind = self.query_one(DescriptionPane), self.selected, self._kind()
        if kind not in ("head", "mlp", "neuron"):
            pane.show_message(self._no_words(kind))
            return
        describe = self.analyses.neuron_description if kind == "neuron" else self.analyses.description
        self._show_or_compute(pane, "description", "describe", lambda: describe(component),
                              f"computing {'its sparse decomposition' if kind == 'neuron' else 'TextSpan'}…")

    def _no_words(self, kind: str) -> str:
        """One line: why the selection has no Descriptions, and what has."""
        return self.reader.tower.no_words(self.selected, kind)

    def _show_or_compute(self, pane: Any, kind: str, group: str, compute: Callable[[], Any], waiting: str) -> None:
        """Show the selection's memoised result in a pane, or say why there is none, or compute it in a worker."""
        component = self.selected
        if self._kind() == "neuron" and names.parse(component).layer not in self.analyses.neuron_layers():
            layer = names.parse(component).layer
            pane.show_message(f"no neurons file for {names.layer(layer)}: run clipterm neurons build {self.reader.name} --layer {names.layer(layer)}")
            return
        result = self.analyses.cached(kind, component)
        if result is not None:
            pane.show(result)
            return
        pane.show_message(f"{component}: {waiting}")
        self._compute(group, component, compute)

    def _refresh_ablation(self) -> None:
        pane, layer = self.query_one(AblationPane), self._ablation_layer()
        layers = self.analyses.cached("ablation", "layers")
        result = self.analyses.cached("ablation", layer) if layer is not None else None
        if layers is None or (layer is not None and result is None):
            pane.show_message("mean-ablating " + (f"{self._ablation_title(layer)}…" if layer is not None else "each layer…"))

            def compute() -> None:
                self.analyses.model_ablation()
                if layer is not None:
                    self.analyses.layer_ablation(layer)

            self._compute("ablate", "layers" if layer is None else layer, compute)
            return
        tasks = list(layers)
        if self.task_index is None:  # start on the task the layers' ablation hurts most
            self.task_index = max(range(len(tasks)), key=lambda i: max(b.drop for b in layers[tasks[i]].bars))
        task = tasks[self.task_index % len(tasks)]
        pane.show(task, layer, result[task] if result else None, layers[task], self.selected, tasks,
                  titles=(self._ablation_title(layer), self._ablation_whole()))

    def _ablation_title(self, layer: int) -> str:
        return self.reader.tower.ablation_title(layer)

    def _ablation_whole(self) -> str:
        """The title of the Ablation pane's model-level section."""
        return self.reader.tower.ablation_whole()

    def _refresh_images(self) -> None:
        pane, component, kind = self.query_one(ImagesPane), self.selected, self._kind()
        if self.images == "off":
            pane.show_message("images are off (--images off); start with --images auto or half to see them")
            return
        if kind not in ("head", "mlp", "neuron"):
            pane.show_message(f"select {self.reader.tower.units} to see the images it responds to most")
            return
        self._show_or_compute(pane, "images", "images", lambda: self.analyses.top_images(component),
                              "ranking the cache's images…")

    # ----------------------------------------------------------------- spatial

    def _spatial_key(self) -> tuple[int, SpatialRequest] | None:
        """(cache row, what to map) for the Spatial pane, or None when the selection has no map."""
        if self.spatial_typed:
            target = SpatialRequest.typed(self.spatial_typed)
        elif self._kind() in ("head", "mlp", "neuron") or (self._kind() == "layer" and not self._is_stage()):
            target = SpatialRequest(self.selected)
        else:
            return None
        if self.spatial_row is not None:
            return self.spatial_row, target
        ranking = self.analyses.cached("images", self.selected)
        rows = [t.row for t in ranking.tiles if t.row is not None] if ranking else []
        return (rows[0] if rows else 0), target

    def _is_stage(self) -> bool:
        """A ResNet's last stage: a set of channels, with no one map."""
        return self.reader.tower.is_unit_group(self.selected)

    def _refresh_spatial(self) -> None:
        pane = self.query_one(SpatialPane)
        refusal = self.analyses.refusal("a per-patch map") if not self.reader.tower.heads() else None
        if refusal:  # nothing the pane could map: the cache's components are pooled over the grid
            pane.show_message(refusal)
            return
        key = self._spatial_key()
        if key is None:
            pane.show_message(self.reader.tower.spatial_hint())
            return
        result = self.analyses.cached("spatial", key)
        if result is not None:
            pane.show(result)
            return
        if self.spatial_row is None and self._wanted("images") and not self.analyses.cached("images", self.selected):
            pane.show_message(f"{self.selected}: finding its top image to map…")  # the images worker brings us back
            return
        pane.show_message(f"{key[1].title} · row {key[0]}: mapping…")
        self._compute("spatial", key, lambda: self.analyses.spatial(*key))

    def action_spatial_step(self, step: int) -> None:
        key = self._spatial_key()
        current = key[0] if key else (self.spatial_row or 0)
        self.spatial_row = (current + step) % self.reader.n
        self._refresh_spatial()

    # ----------------------------------------------------------------- inputs

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "search-target" and event.value.strip() and not self.search_running:
            self.start_search(event.value.strip())
        elif event.input.id == "visualise-target" and event.value.strip() and not self.visual_running:
            self.start_visualise(event.value.strip())
        elif event.input.id == "spatial-query":
            self.spatial_typed = event.value.strip()
            self._refresh_spatial()
        elif event.input.id == "filter":
            self.query_one(Tree).focus()

    # ----------------------------------------------------------------- failures

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state != WorkerState.ERROR:
            return
        error = event.worker.error
        message = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
        hint = getattr(error, "hint", None)
        group = event.worker.group
        title = {"describe": "describe", "ablate": "ablate", "images": "images"}.get(group, group)
        self.notify(message + (f"\nhint: {hint}" if hint else ""), title=f"{title} failed", severity="error", timeout=8)
        pane = {"describe": DescriptionPane, "ablate": AblationPane, "images": ImagesPane, "search": SearchPane,
                "spatial": SpatialPane, "visualise": VisualisePane}.get(group)
        if pane is not None:
            self.query_one(pane).show_message(f"failed: {message}")

    # ----------------------------------------------------------------- actions

    def action_switch_pane(self, step: int) -> None:
        tabs = self.query_one(TabbedContent)
        tabs.active = PANES[(PANES.index(tabs.active) + step) % len(PANES)]

    def action_next_task(self) -> None:
        self.task_index = (self.task_index or 0) + 1
        self._refresh_ablation()

    def action_copy(self) -> None:
        """Copy the active pane's text to the clipboard with OSC 52 (works over SSH and in tmux with set-clipboard)."""
        pane = {"descriptions": DescriptionPane, "ablation": AblationPane, "search": SearchPane, "images": ImagesPane,
                "spatial": SpatialPane, "visualise": VisualisePane, "info": InfoPane}[self.query_one(TabbedContent).active]
        text = self.query_one(pane).copy_text
        if not text:
            self.notify("nothing to copy in this pane yet", severity="warning")
            return
        self.copy_to_clipboard(text)
        self.notify(f"copied {len(text.splitlines())} line(s)", timeout=2)

    def action_help(self) -> None:
        self.push_screen(HelpScreen([b for b in self.BINDINGS if isinstance(b, Binding)], self._keymap))
