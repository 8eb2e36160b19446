"""Local weights files: their tensors, read without running any code they hold, and what they say about the model
they belong to.

The tensors of a GELU and a QuickGELU model have the same names and shapes, so the activation can only come from
what travels with them: open_clip's `open_clip_config.json` beside the file (the hub layout), a config inside a
checkpoint (`{"state_dict": ..., "model_cfg": ...}`) or in a safetensors file's metadata, or the file being one
of OpenAI's TorchScript archives (always QuickGELU). `Weights.says` lists every such statement.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipterm.errors import ClipTermError, ExitCode

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPENAI_ARCHIVE = "an OpenAI TorchScript archive"
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # OpenAI's archives keep these as buffers


@dataclass
class Weights:
    """A weights file's tensors and what it says about the activation the model was trained with."""

    state: dict[str, Any]  # name -> tensor, as model.load_state_dict takes it
    says: list[tuple[bool, str]] = field(default_factory=list)  # (quick_gelu, where that was read)


def read_weights(path: Path) -> Weights:
    """The tensors of a weights file, and what the file and an open_clip config beside it say about QuickGELU."""
    _check_file(path)
    if _is_torchscript(path):
        return Weights(_torchscript_state(path), [(True, OPENAI_ARCHIVE)])
    loaded, metadata = _load(path)
    says = []
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        said = quick_gelu_in(loaded)
        if said is not None:
            says.append((said, f"the config inside {path.name}"))
        loaded = loaded["state_dict"]
    said = quick_gelu_in({key: _json_or_text(value) for key, value in (metadata or {}).items()})
    if said is not None:
        says.append((said, f"the metadata of {path.name}"))
    beside = path.parent / OPEN_CLIP_CONFIG
    if beside.is_file():
        try:
            said = quick_gelu_in(json.loads(beside.read_text()))
        except (OSError, ValueError):
            said = None
        if said is not None:
            says.append((said, f"{OPEN_CLIP_CONFIG} beside {path.name}"))
    return Weights(_tensors(loaded, path), says)


def read_state_dict(path: Path) -> dict:
    """Tensors from a weights file. Pickles are loaded with weights_only=True: code in them is refused."""
    return read_weights(path).state


def quick_gelu_in(config: dict) -> bool | None:
    """What a config says about QuickGELU: its `quick_gelu`, or an open_clip `model_cfg`'s (absent there means GELU,
    as open_clip builds it); None when it says nothing."""
    if not isinstance(config, dict):
        return None
    if isinstance(config.get("quick_gelu"), bool):
        return config["quick_gelu"]
    for key in ("model_cfg", "open_clip_config", "config"):
        inner = config.get(key)
        if isinstance(inner, dict) and ("vision_cfg" in inner or "quick_gelu" in inner):
            return bool(inner.get("quick_gelu", False))
        said = quick_gelu_in(inner) if isinstance(inner, dict) else None
        if said is not None:
            return said
    return None


# --------------------------------------------------------------------------- plain files


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ClipTermError(f"weights file not found: {path}", hint="check the path given to --pretrained", code=ExitCode.NOT_FOUND)
    if path.stat().st_size == 0:
        raise ClipTermError(f"weights file is empty: {path}", hint="re-download or re-save the weights", code=ExitCode.INVALID_DATA)


def _load(path: Path) -> tuple[Any, dict | None]:
    """(what the file holds, its safetensors metadata); pickles with weights_only=True."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata()
            return load_file(str(path)), metadata
        return torch.load(str(path), map_location="cpu", weights_only=True), None
    except pickle.UnpicklingError as exc:
        raise ClipTermError(
            f"refused to load {path.name}: it holds Python objects, not just tensors ({str(exc).splitlines()[0][:120]})",
            hint="only plain tensor files load safely; convert it to .safetensors in a trusted environment",
            code=ExitCode.INVALID_DATA,
        ) from None
    except Exception as exc:  # safetensors and zip errors have many types
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: Exception) -> ClipTermError:
    return ClipTermError(
        f"cannot read weights file {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}",
        hint="the file looks corrupt or truncated; re-download or re-save it",
        code=ExitCode.INVALID_DATA,
    )


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def _tensors(state: Any, path: Path) -> dict:
    import torch

    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ClipTermError(f"{path.name} is not a state dict of tensors", hint="save it with model.state_dict()", code=ExitCode.INVALID_DATA)
    return {k.removeprefix("module."): v for k, v in state.items()}


# --------------------------------------------------------------------------- TorchScript archives (OpenAI's .pt)


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip holding compiled `code/` beside its pickled `data.pkl`."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(name.endswith("/constants.pkl") for name in names) and any("/code/" in name for name in names)


def _torchscript_state(path: Path) -> dict:
    """The parameters and buffers of a TorchScript archive, as `torch.jit.load(path).state_dict()` gives them, read
    as data: `data.pkl` is unpickled with only tensors and plain containers allowed, and none of the archive's code
    runs (each module's `__parameters__` and `__buffers__` lists are read from its code as text)."""
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = archive.namelist()[0].split("/")[0]
            code = {name: archive.read(name).decode() for name in archive.namelist()
                    if name.startswith(f"{prefix}/code/") and name.endswith(".py")}
            root = _ArchiveUnpickler(archive, prefix).load()
    except ClipTermError:
        raise
    except Exception as exc:
        raise _unreadable(path, exc) from None
    state: dict = {}
    _collect(root, "", code, prefix, state)
    return _tensors({k: v for k, v in state.items() if k not in _OPENAI_EXTRAS}, path)


class _ScriptModule:
    """A TorchScript module's pickled attributes, kept as plain data."""

    qualified = ""

    def __setstate__(self, state: dict) -> None:
        self.state = state


_STORAGE_DTYPES = {"FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
                   "DoubleStorage": "float64", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
                   "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        import io

        super().__init__(io.BytesIO(archive.read(f"{prefix}/data.pkl")))
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (_ScriptModule,), {"qualified": f"{module}.{name}"})
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return getattr(torch, _STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"the archive's data names {module}.{name}, which a weights file has no need of")

    def persistent_load(self, pid: Any) -> Any:
        import torch

        _, dtype, key, _location, _numel = pid
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            self.storages[key] = torch.storage.TypedStorage(wrap_storage=flat.untyped_storage(), dtype=dtype, _internal=True)
        return self.storages[key]


_DECLARED = re.compile(r"class (\w+)\(Module\):\s*__parameters__ = \[([^\]]*)\]\s*__buffers__ = \[([^\]]*)\]")


def _collect(module: Any, stem: str, code: dict[str, str], prefix: str, state: dict) -> None:
    """Walk the module tree: its declared parameters and buffers, then its submodules, by their dotted names."""
    import torch

    where, _, cls = module.qualified.rpartition(".")
    source = code.get(f"{prefix}/code/{where.replace('.', '/')}.py", "")
    declared: set[str] = set()
    for match in _DECLARED.finditer(source):
        if match[1] == cls:
            declared = {name.strip().strip('"') for name in f"{match[2]},{match[3]}".split(",") if name.strip()}
    for name, value in getattr(module, "state", {}).items():
        if isinstance(value, _ScriptModule):
            _collect(value, f"{stem}{name}.", code, prefix, state)
        elif isinstance(value, torch.Tensor) and name in declared:
            state[f"{stem}{name}"] = value
