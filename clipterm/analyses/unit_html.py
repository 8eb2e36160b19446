"""A unit page (`unit.py`) as one self-contained HTML file: images inline as data: URIs, styles inline, no script,
and a content security policy that lets the page fetch nothing, so it opens the same off the GPU box."""

from __future__ import annotations

import html
from typing import Any

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 68em; color: #222; background: #fafafa; }
h1 { font-size: 1.5em; margin-bottom: 0.1em; } h2 { font-size: 1.1em; margin: 1.4em 0 0.4em; border-bottom: 1px solid #ccc; }
.about { color: #555; } .grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; text-align: center; font-size: 12px; width: 128px; }
img { width: 128px; height: 128px; image-rendering: pixelated; border: 1px solid #bbb; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: left; border-bottom: 1px solid #e4e4e4; }
.unavailable { color: #a33; font-style: italic; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _unavailable(section: Any) -> str | None:
    if isinstance(section, dict) and "unavailable" in section:
        return f'<p class="unavailable">not available: {_e(section["unavailable"])}</p>'
    return None


def _figure(uri: str | None, caption: str) -> str:
    image = f'<img src="{_e(uri)}" alt="{_e(caption)}">' if uri else "<div>(missing)</div>"
    return f"<figure>{image}<figcaption>{_e(caption)}</figcaption></figure>"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{header}</tr>{body}</table>"


def _images(section: Any) -> str:
    figures = []
    for example in section["examples"]:
        labels = " ".join(example.get("labels", {}).values())
        figures.append(_figure(example.get("uri"), f"#{example['rank']} {example['score']:+.3g} {labels}"))
    return f'<p class="about">ranked by {_e(section["by"])}</p><div class="grid">{"".join(figures)}</div>'


def _visual(entry: dict) -> str:
    probe = entry.get("probe")
    caption = f"{entry['facet'] or 'no facet'}: {entry['objective']} {entry['final']:+.3g}"
    if probe:
        caption += f" · probe {probe['layer']} {probe['accuracy']:.0%} (chance {probe['chance']:.0%})"
    return _figure(entry["uri"], caption)


def _search(section: Any) -> str:
    return _table(["string", "cosine"], [[s["text"], f"{s['cosine']:.3f}"] for s in section["strings"]])


def _sparse(section: Any) -> str:
    weight = "explained" if section["method"] == "TextSpan" else "coefficient"
    note = f" (cosine of the code with the direction {section['cosine']:.3f})" if "cosine" in section else ""
    rows = [[t["text"], f"{t[weight]:+.3f}"] for t in section["terms"]]
    return f'<p class="about">{_e(section["method"])} over pool {_e(section["pool"])}{_e(note)}</p>' + \
        _table(["text", weight], rows)


def _ablation(section: Any) -> str:
    rows = [[task, t["metric"], f"{t['baseline']:.3f}", f"{t['drop']:+.3f}", f"[{t['low']:+.3f}, {t['high']:+.3f}]"]
            for task, t in section["tasks"].items()]
    return f'<p class="about">{_e(section["method"])}</p>' + _table(["task", "metric", "baseline", "drop", "95%"], rows)


def render(page: dict[str, Any]) -> str:
    """The page's HTML: sections `images`, `visualisation`, `facets`, `search`, `sparse`, `ablation`, in that order."""
    parts = {
        "images": ("Top dataset images", _images),
        "visualisation": ("Feature visualisation", lambda s: f'<div class="grid">{_visual(s)}</div>'),
        "facets": ("Faceted feature visualisation", lambda s: f'<div class="grid">{"".join(_visual(v) for v in s)}</div>'),
        "search": ("Best hill-climb strings", _search),
        "sparse": ("Sparse text decomposition", _sparse),
        "ablation": ("Ablation effect", _ablation),
    }
    body = []
    for section, (title, draw) in parts.items():
        content = page.get(section)
        shown = _unavailable(content) or draw(content)
        body.append(f'<section id="{section}"><h2>{_e(title)}</h2>{shown}</section>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<title>{_e(page["component"])} · {_e(page["cache"])}</title><style>{STYLE}</style></head><body>'
            f'<h1>{_e(page["component"])}</h1><p class="about">{_e(page["about"])} · model {_e(page["model"])} · '
            f'cache {_e(page["cache"])} ({page["images"]} images)</p>{"".join(body)}</body></html>\n')
