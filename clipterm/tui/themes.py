"""TUI themes: TOML data files in the user's theme dir or the bundled `themes/`, loaded by name."""

from __future__ import annotations

from pathlib import Path

from textual.theme import Theme

from clipterm import locations
from clipterm.errors import ClipTermError, ExitCode
from clipterm.tui.config import read_toml

COLOURS = ("primary", "secondary", "accent", "foreground", "background", "surface", "panel", "success", "warning", "error")


def available() -> dict[str, Path]:
    """Theme name -> file; the user's themes shadow bundled ones of the same name."""
    found: dict[str, Path] = {}
    for folder in reversed(locations.themes_dirs()):
        if folder.is_dir():
            found.update({p.stem: p for p in sorted(folder.glob("*.toml"))})
    return found


def load_theme(name: str) -> Theme:
    """The Textual theme called `name`, or a ClipTermError listing the ones there are."""
    files = available()
    if name not in files:
        raise ClipTermError(f"no theme {name!r}", hint=f"themes: {', '.join(sorted(files)) or 'none'} "
                                                       f"(add yours to {locations.user_themes_dir()})", code=ExitCode.NOT_FOUND)
    data = read_toml(files[name], "theme file")
    from textual.color import Color, ColorParseError

    for key in COLOURS:
        if key in data:
            try:
                Color.parse(data[key])
            except (ColorParseError, AttributeError, TypeError, ValueError):
                raise ClipTermError(f"theme file {files[name]}: {key} = {data[key]!r} is not a colour",
                                    hint="use a colour such as \"#1e90ff\", \"rgb(30,144,255)\" or \"dodgerblue\"",
                                    code=ExitCode.INVALID_DATA) from None
    return Theme(name=name, dark=bool(data.get("dark", True)), **{k: data[k] for k in COLOURS if k in data})
