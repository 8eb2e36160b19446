"""Image sources for big image sets: webdataset tar shards and Hugging Face datasets on local disk.

| spec                          | meaning                                                                 |
|-------------------------------|-------------------------------------------------------------------------|
| `data/{000000..000099}.tar`   | webdataset shards (brace ranges, `,` lists and globs expand), in order   |
| a folder of `.tar` files      | every `.tar` directly in it, sorted                                      |
| `hf:PATH[:split]`             | a `datasets` folder (`save_to_disk`), a folder of parquet files, or an image folder (`imagefolder`); nothing is downloaded |

A webdataset sample is the run of consecutive members sharing a key (the member name up to the first
dot of its file name); its image is the first member with an image extension, its label the
`.{label_key}` member (an integer or a name) or the `label_key` field of its `.json` member. Tar
members are indexed by offset on open (headers only), so each process of a torchrun build reads the
bytes of its own chunks only, and inputs are numbered the same in every process.

Each input gets an id that names it for good: `tar:/abs/shard.tar#member` or `hf:/abs/path:split#row`,
so images.jsonl can be read back (thumbnails, `neurons build`) without the source spec.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from clipterm.errors import ClipTermError, ExitCode
from clipterm.inputs.images import IMAGE_SUFFIXES, ImageItem, ImageSource, SkipImage, decode

_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
IMAGE_EXTENSIONS = tuple(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES)


def is_shard_spec(spec: str) -> bool:
    """True for specs this module opens: `hf:...`, tar patterns, a `.tar` file, or a folder of `.tar` files."""
    if spec.startswith("hf:"):
        return True
    if spec.endswith(".tar") or (".tar" in spec and ("{" in spec or "*" in spec)):
        return True
    path = Path(spec).expanduser()
    return path.is_dir() and any(path.glob("*.tar")) and not any(path.glob("*/"))


def open_shard_source(spec: str, label_key: str | None = None, image_column: str | None = None,
                      label_column: str | None = None) -> ImageSource:
    """An ImageSource for a tar-shard or `hf:` spec."""
    if spec.startswith("hf:"):
        return hf_source(spec, image_column, label_column)
    return tar_source(spec, label_key or "cls")


# --------------------------------------------------------------------------- webdataset tar shards


def expand_braces(pattern: str) -> list[str]:
    """`a{00..02}b` -> a00b a01b a02b (zero-padded as written); `{x,y}` lists; nested groups expand left to right."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    span = _RANGE.match(body)
    if span:
        lo, hi = int(span.group(1)), int(span.group(2))
        width = len(span.group(1)) if span.group(1).startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        choices = body.split(",")
    return [out for choice in choices for out in expand_braces(head + choice + tail)]


def shard_paths(spec: str) -> list[Path]:
    """The tar files a spec names, in order; a missing one is a one-line error."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        paths = sorted(folder.glob("*.tar"))
    else:
        paths = []
        for name in expand_braces(os.path.expanduser(spec)):
            paths += [Path(p) for p in sorted(glob.glob(name))] if any(c in name for c in "*?[") else [Path(name)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ClipTermError(f"no such shard: {missing[0]} ({len(missing)} of the {len(paths)} shards of {spec} are missing)",
                            hint="check the brace range or the folder; every shard must be there", code=ExitCode.NOT_FOUND)
    if not paths:
        raise ClipTermError(f"no tar shards match {spec}", hint="write data/{000000..000099}.tar, a glob, or a folder of .tar files",
                            code=ExitCode.NOT_FOUND)
    return [p.resolve() for p in paths]


@lru_cache(maxsize=256)
def tar_members(path: str) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size) for the regular files of one tar (headers read, data seeked over)."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
    except (tarfile.TarError, OSError) as exc:
        raise ClipTermError(f"{path} is not a readable tar file: {exc}", hint="webdataset shards are plain (uncompressed) tar files",
                            code=ExitCode.INVALID_DATA) from None


def _read_member(path: str, member: str) -> bytes:
    offset, size = tar_members(path)[member]
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name; the rest is the extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def tar_source(spec: str, label_key: str = "cls") -> ImageSource:
    """Every sample of the shards, in shard order then member order."""
    paths = shard_paths(spec)
    items: list[ImageItem] = []
    raw_labels: list[Any] = []
    for path in paths:
        members = tar_members(str(path))
        samples: dict[str, dict[str, str]] = {}
        for name in members:  # tar order
            key, ext = _split_key(name)
            samples.setdefault(key, {})[ext] = name
        for key, parts in samples.items():
            image = next((parts[ext] for ext in parts if ext in IMAGE_EXTENSIONS), None)
            member = image or f"{key}.[{'+'.join(sorted(parts))}]"  # no image: never a member; skipped when loaded
            items.append(ImageItem(len(items), None, f"tar:{path}#{member}", {}))
            raw_labels.append(_tar_label(str(path), parts, label_key))
    return _with_labels(ImageSource(spec, "tar", str(paths[0].parent), items, {}), raw_labels)


def _tar_label(path: str, parts: dict[str, str], label_key: str) -> Any:
    try:
        if label_key in parts:
            return _read_member(path, parts[label_key]).decode("utf-8").strip() or None
        if "json" in parts:
            value = json.loads(_read_member(path, parts["json"]).decode("utf-8")).get(label_key)
            return None if value is None else str(value)
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None  # an unreadable label is an unknown label (-1), not a stopped build
    return None


def load_tar_member(image_id: str, min_side: int) -> Any:
    """The image of `tar:/abs/shard.tar#member`; SkipImage when the sample has no image or it doesn't decode."""
    path, _, member = image_id.removeprefix("tar:").rpartition("#")
    if member not in tar_members(path):
        key, _, held = member.rpartition(".[")
        if held.endswith("]"):
            raise SkipImage(f"no image member in sample {key} (it holds .{held[:-1].replace('+', ', .')})")
        raise SkipImage(f"no member {member} in {path}")
    return decode(_read_member(path, member), min_side)


# --------------------------------------------------------------------------- Hugging Face datasets on local disk


@lru_cache(maxsize=8)
def _hf_dataset(path: str, split: str | None) -> Any:
    """A `datasets.Dataset` from a local folder: `save_to_disk` output, parquet files, or an image folder."""
    try:
        import datasets
    except ImportError:
        raise ClipTermError("hf: inputs need the `datasets` package", hint="pip install 'clipterm[hf]'",
                            code=ExitCode.USAGE) from None
    folder = Path(path)
    if not folder.exists():
        raise ClipTermError(f"no such dataset folder: {folder}", hint="hf: takes a local folder; nothing is downloaded",
                            code=ExitCode.NOT_FOUND)
    datasets.disable_progress_bars()
    if (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(folder))
    else:
        parquet = sorted(str(p) for p in folder.rglob("*.parquet"))
        builder = ("parquet", {"data_files": parquet}) if parquet else ("imagefolder", {"data_dir": str(folder)})
        loaded = datasets.load_dataset(builder[0], **builder[1])
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            split = "train" if "train" in loaded else sorted(loaded)[0] if len(loaded) == 1 else None
        if split not in loaded:
            raise ClipTermError(f"{folder} has splits {', '.join(sorted(loaded))}; choose one",
                                hint=f"write hf:{folder}:{sorted(loaded)[0]}", code=ExitCode.USAGE)
        loaded = loaded[split]
    return loaded


def _parse_hf(spec: str) -> tuple[str, str | None]:
    body = spec.removeprefix("hf:")
    path, _, split = body.rpartition(":") if ":" in body and not Path(body).expanduser().exists() else (body, "", "")
    return str(Path(path).expanduser().resolve()), split or None


def hf_source(spec: str, image_column: str | None = None, label_column: str | None = None) -> ImageSource:
    """Every row of a local Hugging Face dataset; labels from `label_column` (a ClassLabel keeps its names)."""
    path, split = _parse_hf(spec)
    dataset = _hf_dataset(path, split)
    columns = list(dataset.column_names)
    image_column = image_column or _image_column(dataset)
    for wanted, what in ((image_column, "--image-column"), (label_column, "--label-column")):
        if wanted is not None and wanted not in columns:
            raise ClipTermError(f"the dataset {Path(path).name} has no column {wanted!r} (it has {', '.join(columns)})",
                                hint=f"pass {what} with one of those columns", code=ExitCode.USAGE)
    tag = f"{path}:{split}" if split else path
    items = [ImageItem(i, None, f"hf:{tag}#{image_column}/{i}", {}) for i in range(len(dataset))]
    source = ImageSource(spec, "hf", path, items, {})
    if label_column is None:
        return source
    feature = dataset.features[label_column]
    values = dataset[label_column]
    names = getattr(feature, "names", None)
    if names:  # a ClassLabel: its own names, in its own order
        source.tasks = {"class": list(names)}
        source.items = [ImageItem(i, None, item.id, {"class": -1 if v is None or v < 0 else int(v)})
                        for i, (item, v) in enumerate(zip(items, values))]
        return source
    return _with_labels(source, [None if v is None else str(v) for v in values])


def _image_column(dataset: Any) -> str:
    import datasets

    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    if "image" in dataset.column_names:
        return "image"
    raise ClipTermError(f"the dataset has no image column (columns: {', '.join(dataset.column_names)})",
                        hint="pass --image-column NAME", code=ExitCode.USAGE)


@lru_cache(maxsize=8)
def _hf_undecoded(path: str, split: str | None, column: str) -> Any:
    """The dataset with `column` left as bytes or paths: clipterm decodes images itself (and skips bad ones)."""
    import datasets

    dataset = _hf_dataset(path, split)
    return dataset.cast_column(column, datasets.Image(decode=False)) if isinstance(dataset.features[column], datasets.Image) else dataset


def load_hf_row(image_id: str, min_side: int) -> Any:
    """The image of `hf:/abs/path[:split]#column/row`, decoded like a file (bad images raise SkipImage)."""
    tag, _, where = image_id.removeprefix("hf:").rpartition("#")
    column, _, row = where.rpartition("/")
    path, split = _parse_hf(f"hf:{tag}")
    raw = _hf_undecoded(path, split, column)[int(row)][column]
    if isinstance(raw, dict) and raw.get("bytes"):
        return decode(raw["bytes"], min_side)
    if isinstance(raw, dict) and raw.get("path"):
        return decode(raw["path"], min_side)
    if isinstance(raw, (bytes, bytearray)):
        return decode(bytes(raw), min_side)
    raise SkipImage(f"row {row} holds no image in column {column!r}")


# --------------------------------------------------------------------------- shared


def load_by_id(image_id: str, min_side: int = 224) -> Any:
    """The RGB image an input id names (`tar:...` or `hf:...`); ValueError for any other id."""
    if image_id.startswith("tar:"):
        return load_tar_member(image_id, min_side)
    if image_id.startswith("hf:"):
        return load_hf_row(image_id, min_side)
    raise ValueError(f"not a shard or dataset id: {image_id!r}")


def _with_labels(source: ImageSource, raw: list[Any]) -> ImageSource:
    """Class names from raw label values: all integers sort as numbers, names as text; None is unknown (-1)."""
    known = {v for v in raw if v is not None}
    if not known:
        return source
    numeric = all(re.fullmatch(r"-?\d+", v) for v in known)
    classes = sorted(known, key=int) if numeric else sorted(known)
    position = {name: i for i, name in enumerate(classes)}
    source.tasks = {"class": classes}
    source.items = [ImageItem(item.index, item.path, item.id, {"class": position.get(value, -1)})
                    for item, value in zip(source.items, raw)]
    return source
