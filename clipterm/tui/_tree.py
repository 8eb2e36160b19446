"""The model tree side of the app: building and filtering the tree, hints, lazy neurons, moving the cursor.

A mixin of `ClipTermApp` (it uses the app's reader, analyses and workers), kept apart so each file holds one idea.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import Input, Tree

from clipterm import names


class TreeMixin:
    """Tree state lives on the app: `nodes`, `hints`, `neuron_rows`, `filter_text`."""

    reader: Any
    analyses: Any
    selected: str

    # ----------------------------------------------------------------- the tree

    def _populate(self) -> None:
        """(Re)build the tree, keeping only nodes that match the filter (and their parents)."""
        tree = self.query_one(Tree)
        tree.clear()
        self.nodes = {"model": tree.root}
        shape, built = self.reader.shape, set(self.analyses.neuron_layers())
        if shape.tower in ("resnet", "convnext"):
            if shape.tower == "resnet":
                self._populate_resnet(tree, built)
            else:
                self._populate_convnext(tree)
            tree.root.expand()
            return
        for layer in range(shape.layers):
            children = [names.head(layer, h) for h in range(shape.heads)]
            neurons = [row.component for row in self.neuron_rows.get(layer, [])]
            if not self._matches(names.layer(layer)) and not any(self._matches(c) for c in children + [names.mlp(layer)] + neurons):
                continue
            layer_node = tree.root.add(self._label(names.layer(layer)), data=names.layer(layer), expand=bool(self.filter_text))
            self.nodes[names.layer(layer)] = layer_node
            for name in children:
                if self._matches(name) or self._matches(names.layer(layer)):
                    self.nodes[name] = layer_node.add_leaf(self._label(name), data=name)
            mlp = names.mlp(layer)
            shown_neurons = [n for n in neurons if self._matches(n)]
            if not (self._matches(mlp) or self._matches(names.layer(layer)) or shown_neurons):
                continue
            if layer in built:
                mlp_node = layer_node.add(self._label(mlp), data=mlp, expand=bool(self.filter_text and shown_neurons))
                self.nodes[mlp] = mlp_node
                for name in neurons if self._matches(mlp) and not shown_neurons else shown_neurons:
                    self.nodes[name] = mlp_node.add_leaf(self._label(name), data=name)
            else:
                self.nodes[mlp] = layer_node.add_leaf(self._label(mlp), data=mlp)
        if shape.pool_heads:
            self._populate_attention_pool(tree)
        tree.root.expand()

    def _populate_attention_pool(self, tree: Tree) -> None:
        """A MAP head's (or CoCa pooler's) own split, after the layers: `pool` with pool.H*, pool.bias, pool.MLP."""
        self.hints.setdefault(names.pool(), "the attention pool after the blocks: its own split by head")
        parts = [str(c) for c in self.reader.tower.pool_components()]
        if not (self._matches(names.pool()) or any(self._matches(p) for p in parts)):
            return
        pool_node = tree.root.add(self._label(names.pool()), data=names.pool(), expand=bool(self.filter_text))
        self.nodes[names.pool()] = pool_node
        for name in parts:
            if self._matches(name) or self._matches(names.pool()):
                self.nodes[name] = pool_node.add_leaf(self._label(name), data=name)

    def _populate_resnet(self, tree: Tree, built: set[int]) -> None:
        """A ResNet's two levels: `pool` (its heads, positional part and biases) and the last stage (its channels)."""
        shape = self.reader.shape
        stage = names.layer(shape.neuron_layer)
        self.hints.setdefault(names.pool_pos(), "position only, no image content")
        self.hints.setdefault(names.pool_bias(), "the same for every image")
        self.hints.setdefault(stage, f"{shape.neurons} channels" if shape.neuron_layer in built else
                              f"{shape.neurons} channels: clipterm neurons build {self.reader.name} --layer {stage}")
        parts = [str(h) for h in self.reader.tower.heads()] + [names.pool_pos(), names.pool_bias()]
        if self._matches(names.pool()) or any(self._matches(p) for p in parts):
            pool_node = tree.root.add(self._label(names.pool()), data=names.pool(), expand=bool(self.filter_text))
            self.nodes[names.pool()] = pool_node
            for name in parts:
                if self._matches(name) or self._matches(names.pool()):
                    self.nodes[name] = pool_node.add_leaf(self._label(name), data=name)
        channels = [row.component for row in self.neuron_rows.get(shape.neuron_layer, [])]
        shown = [c for c in channels if self._matches(c)]
        if not (self._matches(stage) or shown):
            return
        if shape.neuron_layer in built:
            stage_node = tree.root.add(self._label(stage), data=stage, expand=bool(self.filter_text and shown))
            for name in channels if self._matches(stage) and not shown else shown:
                self.nodes[name] = stage_node.add_leaf(self._label(name), data=name)
        else:
            stage_node = tree.root.add_leaf(self._label(stage), data=stage)
        self.nodes[stage] = stage_node

    def _populate_convnext(self, tree: Tree) -> None:
        """A ConvNeXt's components in the order they add up: `embed` (the last stage's input), the last stage
        (`S3`, its blocks `S3.B*` below it), `bias`. It has no heads and no neurons to list."""
        shape = self.reader.shape
        stage = names.stage(shape.stage)
        self.hints.setdefault("embed", f"the stem and stages 0–{shape.stage - 1}" if shape.stage > 1 else "the stem")
        self.hints.setdefault("bias", "the same for every image")
        blocks = self.reader.tower.mlps()
        if self._matches("embed"):
            self.nodes["embed"] = tree.root.add_leaf(self._label("embed"), data="embed")
        if self._matches(stage) or any(self._matches(b) for b in blocks):
            stage_node = tree.root.add(self._label(stage), data=stage, expand=True)
            self.nodes[stage] = stage_node
            for name in blocks:
                if self._matches(name) or self._matches(stage):
                    self.nodes[name] = stage_node.add_leaf(self._label(name), data=name)
        if self._matches("bias"):
            self.nodes["bias"] = tree.root.add_leaf(self._label("bias"), data="bias")

    def _neuron_parent(self, layer: int) -> str:
        """The node a layer's neurons hang under: its MLP, or a ResNet's stage itself."""
        return self.reader.tower.neuron_parent(layer)

    def _matches(self, name: str) -> bool:
        needle = self.filter_text.lower()
        return not needle or needle in name.lower() or needle in self.hints.get(name, "").lower()

    def _label(self, name: str) -> Text:
        label = Text(name.split(".")[-1] if "." in name else name)
        if self.hints.get(name):
            label.append(f"  {self.hints[name]}", style="dim italic")
        return label

    def _set_hint(self, name: str, hint: str) -> None:
        self.hints[name] = hint
        if name in self.nodes:
            self.nodes[name].set_label(self._label(name))

    def _compute_hints(self) -> None:
        """Background: each layer's ablation drop and each head's top TextSpan text, as tree hints."""
        from textual.worker import get_current_worker

        worker = get_current_worker()
        model = self.analyses.model_ablation()  # task -> one bar per layer (ResNet: its pool; ConvNeXt: embed, S3)
        for index, layer in enumerate(self.analyses.top_level()):
            drop, task = max((result.bars[index].drop, task) for task, result in model.items())
            self.call_from_thread(self._set_hint, layer, f"−{100 * drop:.1f}% {task}")
        for component in [str(h) for h in self.reader.tower.heads()] + self.reader.tower.mlps():
            if worker.is_cancelled:
                return
            rows = self.analyses.description(component).rows
            self.call_from_thread(self._set_hint, component, rows[0].text if rows else "")

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted) -> None:
        if event.node.data and event.node.data != self.selected:
            self.select(event.node.data)

    def on_tree_node_expanded(self, event: Tree.NodeExpanded) -> None:
        name = event.node.data
        parsed = names.parse(name) if name and name != "model" else None
        if parsed is not None and parsed.kind in ("layer", "mlp") and parsed.site == "block":  # a layer prefetches its neurons
            layer = parsed.layer
            if layer in self.analyses.neuron_layers() and layer not in self.neuron_rows:
                self._compute("neurons", layer, lambda: self.analyses.neurons(layer))

    def _add_neurons(self, layer: int) -> None:
        rows = self.analyses.cached("neurons", layer) or []
        self.neuron_rows[layer] = rows
        mlp_node = self.nodes.get(self._neuron_parent(layer))
        for row in rows:
            self.hints.setdefault(row.component, row.hint)
            if mlp_node is not None and row.component not in self.nodes:
                self.nodes[row.component] = mlp_node.add_leaf(self._label(row.component), data=row.component)

    def jump(self, component: str) -> None:
        """Move the tree cursor to a component by name (expanding its parents; adding a neuron node if needed)."""
        if self.filter_text:
            self._clear_filter()
        if component not in self.nodes and names.parse(component).kind == "neuron":
            neuron = names.parse(component)
            self.nodes[component] = self.nodes[self._neuron_parent(neuron.layer)].add_leaf(self._label(component),
                                                                                             data=component)
        node = self.nodes[component]
        parent = node.parent
        while parent is not None:
            parent.expand()
            parent = parent.parent
        # expanded lines exist only after the next refresh
        self.call_after_refresh(self.query_one(Tree).move_cursor, node)
        self.select(component)

    def action_move(self, step: int) -> None:
        tree = self.query_one(Tree)
        tree.action_cursor_down() if step > 0 else tree.action_cursor_up()

    def action_expand(self) -> None:
        node = self.query_one(Tree).cursor_node
        if node is not None and node.allow_expand:
            node.expand()

    def action_collapse(self) -> None:
        tree = self.query_one(Tree)
        node = tree.cursor_node
        if node is None:
            return
        if node.is_expanded and node.children and not node.is_root:  # the root stays open: it is the whole tree
            node.collapse()
        elif node.parent is not None:
            tree.move_cursor(node.parent)

    def action_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.display = True
        field.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self.filter_text = event.value.strip()
            self._populate()

    def action_escape(self) -> None:
        if self.query_one("#filter").display:
            self._clear_filter()
            self.query_one(Tree).focus()

    def _clear_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.value, field.display, self.filter_text = "", False, ""
        self._populate()
