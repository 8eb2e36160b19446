"""The live panes of the app: text search and feature visualisation, each run in a worker that streams its
events or frames into its pane, one at a time, stoppable with the key that started it.

A mixin of `ClipTermApp` (it uses the app's analyses, workers and selection), kept apart like `_tree.py`.
"""

from __future__ import annotations

from typing import Any

from clipterm.tui.widgets import SearchPane, VisualisePane


class LiveMixin:
    """Run state lives on the app: `search_running`, `search_results`, `search_lm`, `visual_running`,
    `visual_frames`, `visual_steps` and the stop events `_search_stop`, `_visual_stop`."""

    analyses: Any
    selected: str

    # ----------------------------------------------------------------- search

    def _refresh_search(self) -> None:
        pane = self.query_one(SearchPane)
        target = self.analyses.search_target(self.selected)
        pane.suggest(target)
        if self.search_running:
            return
        if target in self.search_results:
            pane.show_event(target, self.search_results[target])
        elif target:
            pane.show_message(f"s: search for the strings {target} likes best · or type a target and press enter · "
                              f"g: guidance {'by ' + self.search_lm if self.search_lm else 'off'}")
        else:
            pane.show_message(self.reader.tower.search_hint())

    def action_search(self) -> None:
        """Stop the running search, or start one for the typed target (else the selection's)."""
        if self.search_running:
            self._search_stop.set()
            return
        target = self.query_one(SearchPane).typed or self.analyses.search_target(self.selected)
        if not target:
            self.notify("nothing to search for: select a head or neuron, or type a target", severity="warning")
            return
        self.start_search(target)

    def action_toggle_guidance(self) -> None:
        """Guide the next search by the n-gram language model, or not."""
        self.search_lm = None if self.search_lm else "ngram"
        state = f"on ({self.search_lm})" if self.search_lm else "off"
        self.notify(f"language-model guidance {state}, from the next search", timeout=3)
        if not self.search_running:
            self._refresh_search()

    def start_search(self, target: str) -> None:
        """Start a live hill-climb towards `target`; events stream into the Search pane."""
        self._search_stop.clear()
        self.search_running = target
        self.query_one(SearchPane).show_message(f"{target}: loading the text tower…")
        lm = self.search_lm

        def job() -> None:
            try:
                for event in self.analyses.search(target, cancel=self._search_stop.is_set, lm=lm):
                    self.call_from_thread(self._search_event, target, event)
            finally:
                self.call_from_thread(self._search_finished)

        self.run_worker(job, thread=True, group="search", exit_on_error=False, name=f"search:{target}")

    def _search_event(self, target: str, event: Any) -> None:
        self.search_results[target] = event
        self.query_one(SearchPane).show_event(target, event)

    def _search_finished(self) -> None:
        self.search_running = None

    # ----------------------------------------------------------------- visualise

    def _visual_refusal(self) -> str | None:
        """Why this cache's tower has no feature visualisation, in one line naming the model part; None: it has."""
        return self.reader.tower.visual_refusal(self.analyses.refusal)

    def _refresh_visualise(self) -> None:
        pane = self.query_one(VisualisePane)
        refusal = self._visual_refusal()
        if refusal:
            pane.show_message(refusal)
            return
        target = self.analyses.visual_target(self.selected)
        pane.suggest(target)
        if self.visual_running:
            return
        frame = self.analyses.cached("visualise", target) or self.visual_frames.get(target)
        if frame is not None:
            pane.show_frame(frame, self.analyses.cached("images", target))
        elif target:
            pane.show_message(f"v: paint the image {target} wants · or type a target and press enter")
        else:
            pane.show_message("select a head or a neuron, or type a target (text:a red shape, class:red) and press enter")

    def action_visualise(self) -> None:
        """Stop the running visualisation, or start one for the typed target (else the selection's)."""
        if self.visual_running:
            self._visual_stop.set()
            return
        target = self.query_one(VisualisePane).typed or self.analyses.visual_target(self.selected)
        if not target:
            self.notify("nothing to visualise: select a head or neuron, or type a target", severity="warning")
            return
        self.start_visualise(target)

    def start_visualise(self, target: str) -> None:
        """Paint `target`'s image in a worker; frames stream into the Visualise pane. Finished runs are memoised."""
        refusal = self._visual_refusal()
        if refusal:
            self.notify(refusal, severity="warning")
            return
        memo = self.analyses.cached("visualise", target)
        if memo is not None:
            self.query_one(VisualisePane).show_frame(memo, self.analyses.cached("images", target))
            return
        self._visual_stop.clear()
        self.visual_running = target
        self.query_one(VisualisePane).show_message(f"{target}: loading the model…")

        def job() -> None:
            try:
                for frame in self.analyses.visualise(target, cancel=self._visual_stop.is_set, steps=self.visual_steps):
                    if frame.tiles and (frame.done or frame.step % 4 == 0 or frame.step == 1):
                        self.call_from_thread(self._visual_frame, frame)
            finally:
                self.call_from_thread(self._visual_finished)

        self.run_worker(job, thread=True, group="visualise", exit_on_error=False, name=f"visualise:{target}")

    def _visual_frame(self, frame: Any) -> None:
        self.visual_frames[frame.target] = frame
        self.query_one(VisualisePane).show_frame(frame, self.analyses.cached("images", frame.target))

    def _visual_finished(self) -> None:
        self.visual_running = None
