"""The user's TUI settings: key bindings remapped by id in `config.toml` (see `clipterm locate config`).

```toml
[keys]
"tree.down" = "n"          # one key, or several separated by commas: "n,down"
"search.toggle" = "ctrl+s"
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipterm import locations
from clipterm.errors import ClipTermError, ExitCode

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict, or a ClipTermError naming the file."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ClipTermError(f"{what} {path} is not valid TOML: {exc}", hint="fix or remove it",
                            code=ExitCode.INVALID_DATA) from exc


def config_file() -> Path:
    return locations.config_dir() / "config.toml"


def load_keymap(binding_ids: set[str], path: Path | None = None) -> dict[str, str]:
    """Binding id -> keys from the config file's [keys] table; {} when there is no file. Unknown ids are an error."""
    path = path or config_file()
    if not path.is_file():
        return {}
    keys = read_toml(path, "config file").get("keys", {})
    if not isinstance(keys, dict) or not all(isinstance(v, str) and v.strip() for v in keys.values()):
        raise ClipTermError(f"[keys] in {path} must map binding ids to key names, e.g. \"tree.down\" = \"n\"",
                            hint="press ? in the TUI to see every binding id", code=ExitCode.INVALID_DATA)
    unknown = sorted(set(keys) - binding_ids)
    if unknown:
        raise ClipTermError(f"{path}: no key binding with id {unknown[0]!r}",
                            hint=f"binding ids: {', '.join(sorted(binding_ids))}", code=ExitCode.INVALID_DATA)
    keymap = {binding_id: value.replace(" ", "") for binding_id, value in keys.items()}
    for binding_id, value in keymap.items():
        bad = [key for key in value.split(",") if not is_key(key)]
        if bad:
            raise ClipTermError(f"{path}: {bad[0]!r} (for {binding_id!r}) is not a key name",
                                hint="use a character or a key name with optional modifiers: n, f5, pageup, ctrl+s, shift+tab",
                                code=ExitCode.INVALID_DATA)
    return keymap


MODIFIERS = ("ctrl", "shift", "alt", "meta", "super", "hyper")


def is_key(spec: str) -> bool:
    """Whether Textual knows `spec` as a key: modifiers+ a printable character or a key name (`ctrl+s`, `f5`, `?`)."""
    *modifiers, key = spec.split("+") if spec not in ("+",) and not spec.endswith("++") else [*spec[:-2].split("+"), "+"]
    if any(m not in MODIFIERS for m in modifiers if m) or not key:
        return False
    return (len(key) == 1 and key.isprintable()) or key in _key_names()


def _key_names() -> set[str]:
    from textual.keys import KEY_ALIASES, KEY_NAME_REPLACEMENTS, Keys, _character_to_key

    found = {k.value.split("+")[-1] for k in Keys} | set(KEY_ALIASES) | set(KEY_NAME_REPLACEMENTS.values())
    return found | {_character_to_key(chr(c)) for c in range(32, 127)}
