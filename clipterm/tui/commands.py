"""The command palette (ctrl+p): jump to any component by name, or run one of the app's actions."""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

from clipterm import names

ACTIONS = [  # (title, action, help)
    ("Search: start or stop for the selection", "search", "hill-climb the strings the selection likes best"),
    ("Ablation: next task", "next_task", "show another task's mean-ablation drops"),
    ("Copy the active pane's text", "copy", "OSC 52: works over SSH"),
    ("Filter the tree", "filter", "by name or hint"),
    ("Keys", "help", "every binding with its id"),
]


class ComponentCommands(Provider):
    """Components of the open cache (every layer, head and MLP; the neurons of built layers), then actions."""

    def _components(self) -> list[str]:
        app = self.app
        found = app.reader.tower.palette()
        return found + [n for n in app.nodes if n not in found and n != "model"]

    async def discover(self) -> Hits:
        for title, action, help_text in ACTIONS:
            yield DiscoveryHit(title, partial(self.app.run_action, action), help=help_text)

    async def search(self, query: str) -> Hits:
        app, matcher = self.app, self.matcher(query)
        exact = self._exact(query.strip())
        if exact is not None:
            yield Hit(1.0, f"Go to {exact}", partial(app.jump, exact), help=app.reader.tower.describe(names.parse(exact)))
        for name in self._components():
            if name == exact:
                continue
            score = matcher.match(name)
            if score > 0:
                hint = app.hints.get(name, "")
                yield Hit(score, matcher.highlight(name), partial(app.jump, name), help=hint or None)
        for title, action, help_text in ACTIONS:
            score = matcher.match(title)
            if score > 0:
                yield Hit(score * 0.9, matcher.highlight(title), partial(app.run_action, action), help=help_text)

    def _exact(self, query: str) -> str | None:
        """A valid component typed in full, e.g. L4.N300 (a neuron not listed in the tree yet)."""
        app = self.app
        try:
            component = app.reader.tower.parse(query)
        except Exception:
            return None
        if component.kind == "neuron" and component.layer not in app.analyses.neuron_layers():
            return None
        wanted = component.kind in ("head", "mlp", "neuron", "layer") or component.site == "pool" \
            or app.reader.shape.tower == "convnext"  # pool.pos, pool.bias; a ConvNeXt's embed and bias are nodes
        return str(component.base) if wanted else None
