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
Links, repeated keys and members truncated or over MAX_MEMBER_BYTES are inputs skipped with a reason;
an unreadable label (too long, too deep, not UTF-8) is an unknown label (docs/reliability.md).

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from clipterm.errors import ClipTermError, ExitCode
from clipterm.inputs.images import IMAGE_SUFFIXES, ImageItem, ImageSource, SkipImage, decode, printable

_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
IMAGE_EXTENSIONS = tuple(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES)
# Bounds on what a spec or a tar may ask for (docs/reliability.md, "Every input bounded").
MAX_SHARDS = 1_000_000  # shards one spec may name: their paths take about 200 MB; LAION-5B is 500k shards of 10k
MAX_MEMBER_BYTES = 1 << 30  # one member is read whole into memory: a bigger one is skipped
MAX_LABEL_BYTES = 1 << 16  # a .cls or .json member bigger than this holds no label (unknown, -1)
MAX_LABEL_CHARS = 256  # a longer label is no class name (unknown, -1)


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
        refuse_ignored(spec, "a Hugging Face dataset", label_key=label_key)
        return hf_source(spec, image_column, label_column)
    refuse_ignored(spec, "webdataset shards", image_column=image_column, label_column=label_column)
    return tar_source(spec, label_key or "cls")


# Which sources read each source option; any other source would ignore it.
_OPTION_SOURCES = {"label_key": "webdataset tar shards", "image_column": "hf: datasets", "label_column": "hf: datasets"}


def refuse_ignored(spec: str, kind: str, **options: Any) -> None:
    """A one-line error for a source option (label_key, image_column, label_column) that `spec` would ignore."""
    for name, value in options.items():
        if value is not None:
            flag = "--" + name.replace("_", "-")
            raise ClipTermError(f"{flag} is read only from {_OPTION_SOURCES[name]}; {spec} is {kind}, which would ignore it",
                                hint=f"drop {flag}")


# --------------------------------------------------------------------------- webdataset tar shards


def expand_braces(pattern: str) -> list[str]:
    """`a{00..02}b` -> a00b a01b a02b (zero-padded as written); `{x,y}` lists; nested groups expand left to right."""
    return list(iter_braces(pattern))


def _choices(body: str) -> tuple[int, Any]:
    """How many choices a brace body holds, and a function from a choice's number to its text (nothing expanded)."""
    span = _RANGE.match(body)
    if span is None:
        parts = body.split(",")
        return len(parts), parts.__getitem__
    lo, hi = int(span.group(1)), int(span.group(2))
    width = len(span.group(1)) if span.group(1).startswith("0") else 0
    return max(hi - lo + 1, 0), lambda i: str(lo + i).zfill(width)


def count_braces(pattern: str) -> int:
    """How many names a pattern's braces expand to, counted without expanding them."""
    match = _BRACES.search(pattern)
    if match is None:
        return 1
    return _choices(match.group(1))[0] * count_braces(pattern[match.end():])


def iter_braces(pattern: str) -> Iterator[str]:
    """The names of `expand_braces`, one at a time: a range of 10^8 shards is never held in memory."""
    match = _BRACES.search(pattern)
    if match is None:
        yield pattern
        return
    n, choice = _choices(match.group(1))
    head, tail = pattern[: match.start()], pattern[match.end():]
    for i in range(n):
        yield from iter_braces(head + choice(i) + tail)


def shard_paths(spec: str) -> list[Path]:
    """The tar files a spec names, in order; a missing one is a one-line error, and so is a spec naming more than
    MAX_SHARDS (counted before anything is expanded)."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        paths = sorted(folder.glob("*.tar"))
    else:
        pattern = os.path.expanduser(spec)
        count = count_braces(pattern)
        if count > MAX_SHARDS:
            raise ClipTermError(f"{spec} names {count:,} shards; clipterm reads at most {MAX_SHARDS:,} shards in one build",
                                hint="check the brace range (its digits), or build the shards in parts", code=ExitCode.USAGE)
        paths = []
        for name in iter_braces(pattern):
            paths += [Path(p) for p in sorted(glob.glob(name))] if any(c in name for c in "*?[") else [Path(name)]
            if len(paths) > MAX_SHARDS:
                raise ClipTermError(f"{spec} matches more than {MAX_SHARDS:,} shards; clipterm reads at most "
                                    f"{MAX_SHARDS:,} in one build", hint="build the shards in parts", code=ExitCode.USAGE)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ClipTermError(f"no such shard: {missing[0]} ({len(missing)} of the {len(paths)} shards of {spec} are missing)",
                            hint="check the brace range or the folder; every shard must be there", code=ExitCode.NOT_FOUND)
    if not paths:
        raise ClipTermError(f"no tar shards match {spec}", hint="write data/{000000..000099}.tar, a glob, or a folder of .tar files",
                            code=ExitCode.NOT_FOUND)
    return [p.resolve() for p in paths]


@dataclass
class TarIndex:
    """One tar's samples, from its headers alone (data seeked over).

    `members`: printable member name -> (data offset, size), regular files only, the first of a repeated name.
    `samples`: (the member an input id names, the sample's parts: extension -> member) in tar order; a sample
    without a readable image names a pseudo member `KEY.[...]` instead, and `skipped` says why."""

    members: dict[str, tuple[int, int]] = field(default_factory=dict)
    samples: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def tar_index(path: str) -> TarIndex:
    """The index of one tar, re-read when the file changes (a tar rewritten under a cache is never read stale)."""
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise ClipTermError(f"cannot read the shard {path}: {exc.strerror}", hint="check that the shard is there and readable",
                            code=ExitCode.NOT_FOUND) from None
    return _tar_index(path, stat.st_size, stat.st_mtime_ns)


def tar_members(path: str) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size) for the regular files of one tar."""
    return tar_index(path).members


_LINKS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link"}


@lru_cache(maxsize=256)
def _tar_index(path: str, size: int, _mtime_ns: int) -> TarIndex:
    index, shard = TarIndex(), Path(path).name
    runs: dict[str, dict[str, str]] = {}  # key -> the parts of its sample
    problems: dict[str, str] = {}  # key -> why a member of its sample could not be read (the first reason)
    repeats: dict[str, int] = {}  # key -> how many skipped repeats it has had
    current = repeating = None  # the key of the run being read; of a repeated run being skipped

    def skip(key: str, why: str) -> None:
        repeats[key] = repeats.get(key, 0) + 1
        pseudo = f"{key}.[repeat {repeats[key]}]"
        index.samples.append((pseudo, {}))
        index.skipped[pseudo] = why

    try:
        with tarfile.open(path, mode="r:", encoding="utf-8", errors="surrogateescape") as tar:
            while True:
                try:
                    member = tar.next()
                except tarfile.ReadError:
                    if not runs:
                        raise
                    break  # the end is damaged: what came before is kept (a member that overran it is skipped)
                if member is None:
                    break
                if member.isdir():
                    continue
                name = printable(member.name)
                key, ext = _split_key(name)
                if key == repeating:
                    continue  # the rest of a repeated run: skipped as one input
                if key != current and key in runs:  # webdataset samples are runs: a key coming back is a second sample
                    current, repeating = None, key
                    skip(key, f"the key {key} repeats in {shard}: member {name} comes after other samples "
                              "(a webdataset sample is a run of members sharing a key)")
                    continue
                if key != current:
                    current, repeating = key, None
                    runs[key] = {}
                    index.samples.append((key, runs[key]))
                parts = runs[key]
                if ext in parts or f"[{ext}]" in parts:
                    if ext in IMAGE_EXTENSIONS:  # a second image under one name: an input of its own, skipped
                        skip(key, f"member {name} repeats in {shard}: only its first copy is read")
                    continue
                why = _unreadable(member, name, size)
                if why is not None:
                    problems.setdefault(key, why)
                    parts[f"[{ext}]"] = name  # held but unreadable: named in the sample's pseudo member
                    continue
                parts[ext] = name
                index.members[name] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError) as exc:
        raise ClipTermError(f"{path} is not a readable tar file: {exc}", hint="webdataset shards are plain (uncompressed) tar files",
                            code=ExitCode.INVALID_DATA) from None
    for i, (key, parts) in enumerate(index.samples):
        if key in index.skipped:
            continue
        readable = {ext: name for ext, name in parts.items() if not ext.startswith("[")}
        image = next((readable[ext] for ext in readable if ext in IMAGE_EXTENSIONS), None)
        if image is not None:
            index.samples[i] = (image, readable)
            continue
        held = sorted(ext.strip("[]") for ext in parts)
        pseudo = f"{key}.[{'+'.join(held)}]"  # no image: never a member; skipped when loaded
        index.samples[i] = (pseudo, readable)
        index.skipped[pseudo] = problems.get(key) or f"no image member in sample {key} (it holds .{', .'.join(held)})"
    return index


def _unreadable(member: tarfile.TarInfo, name: str, size: int) -> str | None:
    """Why a member cannot be read as a sample's part; None when it can."""
    if member.type in _LINKS:
        return f"member {name} is {_LINKS[member.type]} (to {printable(member.linkname)}), not a file: clipterm reads only regular members"
    if not member.isfile():
        return f"member {name} is not a regular file"
    if member.offset_data + member.size > size:
        return (f"member {name} declares {member.size:,} bytes but its shard ends {max(size - member.offset_data, 0):,} "
                "bytes after its start (a truncated or damaged tar)")
    if member.size > MAX_MEMBER_BYTES:
        return f"member {name} is {member.size:,} bytes, over the {MAX_MEMBER_BYTES:,} clipterm reads from one member"
    return None


def _read_member(path: str, member: str, limit: int = MAX_MEMBER_BYTES) -> bytes | None:
    """A member's bytes; None when it is larger than `limit`."""
    offset, size = tar_members(path)[member]
    if size > limit:
        return None
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
        for member, parts in tar_index(str(path)).samples:
            items.append(ImageItem(len(items), None, f"tar:{path}#{member}", {}))
            raw_labels.append(_tar_label(str(path), parts, label_key))
    return _with_labels(ImageSource(spec, "tar", str(paths[0].parent), items, {}), raw_labels)


def _tar_label(path: str, parts: dict[str, str], label_key: str) -> Any:
    """The raw label of a sample; None (unknown) when it is missing, unreadable, too large or too long."""
    try:
        if label_key in parts:
            data = _read_member(path, parts[label_key], MAX_LABEL_BYTES)
            text = None if data is None else data.decode("utf-8").strip()
        elif "json" in parts:
            data = _read_member(path, parts["json"], MAX_LABEL_BYTES)
            value = None if data is None else json.loads(data.decode("utf-8")).get(label_key)
            text = None if value is None else str(value)
        else:
            return None
    except (UnicodeDecodeError, ValueError, AttributeError, RecursionError):  # RecursionError: JSON nested too deep
        return None  # an unreadable label is an unknown label (-1), not a stopped build
    return text if text and len(text) <= MAX_LABEL_CHARS else None


def _split_id(image_id: str) -> tuple[str, str]:
    """(shard path, member) of `tar:/abs/shard.tar#member`; a member name may hold `#` itself (`x#y.png`)."""
    body = image_id.removeprefix("tar:")
    cut = body.find(".tar#")
    if cut >= 0:
        return body[: cut + 4], body[cut + 5:]
    path, _, member = body.rpartition("#")
    return path, member


def load_tar_member(image_id: str, min_side: int) -> Any:
    """The image of `tar:/abs/shard.tar#member`; SkipImage when the sample has no readable image or it doesn't decode."""
    path, member = _split_id(image_id)
    index = tar_index(path)
    if member in index.skipped:
        raise SkipImage(index.skipped[member])
    if member not in index.members:
        key, _, held = member.rpartition(".[")
        if held.endswith("]"):  # recorded by an older build
            raise SkipImage(f"no image member in sample {key} (it holds .{held[:-1].replace('+', ', .')})")
        raise SkipImage(f"no member {member} in {path}: the shard changed since the cache was built")
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
