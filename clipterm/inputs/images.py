"""Image sources for a cache build: a folder, a list file, or the synthetic world.

| spec          | meaning                                                                    |
|---------------|----------------------------------------------------------------------------|
| `DIR`         | every image file under DIR, recursively, in sorted order; the first-level sub-folder names the class (task `class`) |
| `LIST`        | a text file, one image path per line (relative to the list's folder); an optional tab-separated second column names the class |
| `toy:N`       | the first N scenes of the synthetic world, seed 0, with every toy task's labels: the world the built-in toy model was trained on (`cache build` reads it from the model; world 1 elsewhere) |
| `toy:N@SEED`  | the same with another seed                                                  |
| `toy1:N`, `toy2:N[@SEED]` | the same scenes of world 1 or 2, whatever the model                 |

Decoding is forgiving where it can be and honest where it can't: CMYK, alpha, palette and 16-bit
images are turned into RGB; empty, truncated and non-image files are skipped with a reason, and so are
images over MAX_PIXELS or longer than MAX_ASPECT times their width, read from the header before decoding.

By default a file decodes as plain open_clip sees it (`Image.open(path).convert("RGB")`, full size),
so cached embeddings equal open_clip's own on the same file. Two deliberate exceptions, where PIL's
`convert("RGB")` is wrong: 16/32-bit images are rescaled to 8 bits (PIL clips them, a 16-bit PNG
turns nearly white), and alpha is composited over white (PIL drops it and shows whatever colour
sits under transparent pixels). `fast=True` (`cache build --fast-decode`) is the older, faster
path: a JPEG over 2x the input size decodes at a reduced scale (`Image.draft`), huge images are
box-reduced, and EXIF orientation is applied; embeddings then differ from open_clip's by a few %.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Callable

from clipterm.errors import ClipTermError, ExitCode

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif")
# Decompression-bomb guard: more pixels than this (16k x 16k) is refused rather than decoded.
MAX_PIXELS = 16384 * 16384
# A long side over this many times the short one is refused too, read from the header before decoding: resizing
# the short side to the model's input (224 px) would blow a 665-byte 1x150000 PNG up to 224 x 33.6M pixels. 50:1 keeps
# every panorama and long screenshot, and bounds the resized image at 224 x 11,200 (7.5 MB).
MAX_ASPECT = 50
DECODE_FULL, DECODE_FAST = "full", "fast"  # the manifest's `decode`: how a build decoded its files
_TOY = re.compile(r"^toy([12])?:(\d+)(?:@(\d+))?$")  # world (none: the model's), N, seed


class SkipImage(Exception):
    """An input that cannot be decoded; the message is the reason recorded in the cache."""


@dataclass(frozen=True)
class ImageItem:
    """One input: a file path or a synthetic scene id, and its labels (task -> class, -1 unknown)."""

    index: int
    path: str | None  # absolute path of a file
    id: str | None  # synthetic id, e.g. "toy:0/17" (world 1) or "toy2:0/17"
    labels: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """images.jsonl's record. A path that is not valid UTF-8 (a file name in another encoding) is kept exactly
        as `path_bytes` (hex of its bytes), beside a readable `path` with the odd bytes escaped."""
        row: dict[str, Any] = {"index": self.index}
        if self.path is None:
            row["id"] = self.id
        else:
            row["path"] = printable(self.path)
            if row["path"] != self.path:
                row["path_bytes"] = os.fsencode(self.path).hex()
        row["labels"] = self.labels
        return row


def printable(text: str) -> str:
    """`text` (from the file system, maybe holding undecodable bytes) as valid UTF-8, odd bytes as \\xNN."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


def item_path(row: dict[str, Any]) -> str | None:
    """The exact path an images.jsonl record names (None for a synthetic input)."""
    if isinstance(row.get("path_bytes"), str):
        return os.fsdecode(bytes.fromhex(row["path_bytes"]))
    return row.get("path")


@dataclass
class ImageSource:
    """An ordered list of inputs plus the class names of each label task."""

    spec: str  # what the user gave
    kind: str  # "folder" | "list" | "toy"
    root: str | None  # the folder or list file, absolute
    items: list[ImageItem]
    tasks: dict[str, list[str]]  # task -> class names, in label order
    seed: int | None = None  # toy only
    world: int = 1  # toy only: the synthetic world's version

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """A cheap identity of the inputs: relative names, sizes and labels (toy: seed and N)."""
        digest = hashlib.sha256(f"{self.kind}\n{self.seed}\n".encode())
        base = Path(self.root).parent if self.kind == "list" else Path(self.root or ".")
        if self.kind == "toy":  # the same digest as over the items' ids, without drawing a scene
            for i in range(len(self.items)):
                digest.update(f"{toy_id(self.seed or 0, i, self.world)}\n".encode())
            return digest.hexdigest()
        for item in self.items:
            if item.path is not None:
                try:
                    size = os.stat(item.path).st_size
                except OSError:
                    size = -1
                name = os.path.relpath(item.path, base)
                digest.update(f"{name}\0{size}\0{sorted(item.labels.items())}\n".encode("utf-8", "surrogateescape"))
            else:
                digest.update(f"{item.id}\n".encode())
        return digest.hexdigest()

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the dataset."""
        toy = {"world": self.world} if self.kind == "toy" else {}
        return {"source": printable(self.spec), "kind": self.kind, "root": printable(self.root) if self.root else None,
                "seed": self.seed, **toy, "n": len(self.items),
                "tasks": self.tasks, "fingerprint": self.fingerprint()}

    def load(self, index: int, min_side: int, fast: bool = False) -> Any:
        """The RGB PIL image of input `index` (with `fast`, reduced to about 2x `min_side` when huge); raises SkipImage."""
        item = self.items[index]
        if item.path is None:
            # a recorded id names its own world (`toy2:SEED/INDEX`), whatever source re-reads it
            return toy_scene(self.seed or 0, index, self.world) if item.id is None else synthetic_image(item.id, min_side)
        return decode(item.path, min_side, fast)


TOY_ID = re.compile(r"^toy(2)?:(\d+)/(\d+)$")  # the synthetic id of a toy scene, as images.jsonl records it


def _toy_prefix(world: int) -> str:
    return "toy" if world == 1 else f"toy{world}"  # world 1 keeps the prefix caches have always recorded


def toy_id(seed: int, index: int, world: int = 1) -> str:
    """`toy:SEED/INDEX` for world 1, `toy2:SEED/INDEX` for world 2."""
    return f"{_toy_prefix(world)}:{seed}/{index}"


def toy_spec(n: int, seed: int = 0, world: int = 1) -> str:
    """The image spec of the first n scenes of a world with this seed, as a manifest records it."""
    return f"{_toy_prefix(world)}:{n}" + (f"@{seed}" if seed else "")


def _parse_toy_id(synthetic_id: str) -> tuple[int, int, int] | None:
    """(seed, index, world) of a toy id; None for anything else."""
    match = TOY_ID.match(synthetic_id)
    return None if match is None else (int(match.group(2)), int(match.group(3)), 2 if match.group(1) else 1)


def toy_scene_of(synthetic_id: str) -> Any:
    """The world Scene behind a toy id (`toy:SEED/INDEX` or `toy2:SEED/INDEX`): its objects, word and labels."""
    from clipterm.toyworld.world import scene_at

    parts = _parse_toy_id(synthetic_id)
    if parts is None:
        raise ValueError(f"not a toy scene id: {synthetic_id!r}")
    return scene_at(*parts)


def toy_scene(seed: int, index: int, world: int = 1) -> Any:
    """The RGB PIL image (64×64) of toy scene `index` of the world (version `world`) with `seed`."""
    from PIL import Image

    from clipterm.toyworld import world as toyworld

    pixels, _ = toyworld.render(toyworld.scene_at(seed, index, world))  # (64, 64, 3) uint8
    return Image.fromarray(pixels)


def synthetic_image(synthetic_id: str, min_side: int = 224) -> Any:
    """The image of an input id: a toy scene (`toy:SEED/INDEX`, `toy2:...`), a tar member or a dataset row
    (`tar:...`, `hf:...`: clipterm.inputs.shards); ValueError for anything else."""
    parts = _parse_toy_id(synthetic_id)
    if parts is None and synthetic_id.startswith(("tar:", "hf:")):
        from clipterm.inputs.shards import load_by_id

        return load_by_id(synthetic_id, min_side)
    if parts is None:
        raise ValueError(f"not a synthetic image id: {synthetic_id!r}")
    return toy_scene(*parts)


def open_source(spec: str, toy_world: int = 1, **shard_options: Any) -> ImageSource:
    """Parse an image spec (`DIR`, `LIST`, `toy:N`, `toy:N@SEED`, `toy2:N`, or a shard spec of clipterm.inputs.shards)
    into an ImageSource; `toy:N` draws world `toy_world` (the model's). `shard_options` (label_key, image_column,
    label_column) go to the shard sources."""
    from clipterm.inputs import shards

    if shards.is_shard_spec(spec):
        return shards.open_shard_source(spec, **shard_options)
    kind = "the synthetic world" if spec.strip().startswith("toy") else "a folder or a list file"
    shards.refuse_ignored(spec, kind, **shard_options)
    match = _TOY.match(spec.strip())
    if match:
        world = int(match[1] or toy_world)
        n, seed = int(match[2]), int(match[3] or 0)
        return toy_source(n, seed, spec if match[1] or world == 1 else toy_spec(n, seed, world), world)
    if spec.startswith("toy"):
        raise ClipTermError(f"not a toy image spec: {spec!r}", hint="write toy:N or toy:N@SEED (toy1:/toy2: for a world), "
                                                                    "e.g. toy:2000")
    path = Path(spec).expanduser()
    if path.is_dir():
        return folder_source(path, spec)
    if path.is_file():
        return list_source(path, spec)
    raise ClipTermError(f"no such folder or list file: {spec}", hint="--images takes a folder, a list file, or toy:N",
                        code=ExitCode.NOT_FOUND)


# Each scene draws its noise from 2^31 seeds: a world with more scenes than that must repeat itself.
TOY_MAX = 2**31


class ToyItems(Sequence):
    """The items of a toy source, each labelled when it is first asked for (a scene costs a draw of the world)."""

    def __init__(self, n: int, seed: int, world: int = 1):
        self.n, self.seed, self.world = n, seed, world

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.n))]
        if not -self.n <= index < self.n:
            raise IndexError(index)
        index %= self.n
        return ImageItem(index, None, toy_id(self.seed, index, self.world), _toy_labels(self.seed, index, self.world))


def _toy_labels(seed: int, index: int, world: int = 1) -> dict[str, int]:
    from clipterm.toyworld import world as toyworld

    return toyworld.labels(toyworld.scene_at(seed, index, world))


def toy_source(n: int, seed: int = 0, spec: str | None = None, world: int = 1) -> ImageSource:
    """The first `n` scenes of the synthetic world (version `world`) with this seed, labelled for every toy task
    (lazily)."""
    from clipterm.toyworld.world import TASKS, check_world

    check_world(world)
    if n < 1:
        raise ClipTermError("toy:N needs N >= 1", hint="e.g. toy:2000")
    if n > TOY_MAX:
        raise ClipTermError(f"toy:{n} asks for more scenes than the synthetic world has: at most {TOY_MAX:,} "
                            "(each scene draws its noise from 2^31 seeds)", hint="use a smaller N, or another @SEED for more")
    items = ToyItems(n, seed, world)
    return ImageSource(spec or toy_spec(n, seed, world), "toy", None, items,  # type: ignore[arg-type]
                       {t: list(c) for t, c in TASKS.items()}, seed, world)


def folder_source(folder: Path, spec: str | None = None) -> ImageSource:
    """Every image file under `folder` (recursive, sorted); the first-level sub-folder is the class."""
    folder = folder.expanduser().resolve()
    files = sorted(_walk(folder), key=lambda rel: rel.split("/"))
    if not files:
        raise ClipTermError(
            f"no image files in {folder}",
            hint=f"put images ({', '.join(IMAGE_SUFFIXES[:5])}, ...) in it, one sub-folder per class",
            code=ExitCode.NOT_FOUND,
        )
    names = [printable(rel.split("/", 1)[0]) if "/" in rel else None for rel in files]  # class names are for reading
    return _labelled(spec or str(folder), "folder", folder, [str(folder / rel) for rel in files], names)


def list_source(list_file: Path, spec: str | None = None) -> ImageSource:
    """One path per line (relative to the list's folder), with an optional tab-separated class name."""
    list_file = list_file.expanduser().resolve()
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ClipTermError(f"{list_file} is not a UTF-8 text file", hint="a list file holds one image path per line") from None
    paths, names = [], []
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path, _, label = line.rstrip("\r\n").partition("\t")
        paths.append(str((list_file.parent / path.strip()).resolve()))
        names.append(label.strip() or None)
    if not paths:
        raise ClipTermError(f"{list_file} lists no images", hint="write one image path per line, optionally a tab and a class name",
                            code=ExitCode.NOT_FOUND)
    return _labelled(spec or str(list_file), "list", list_file, paths, names)


def _labelled(spec: str, kind: str, root: Path, paths: list[str], names: list[str | None]) -> ImageSource:
    from clipterm.inputs.classnames import wnid_names

    classes = sorted({n for n in names if n is not None})
    tasks = {"class": wnid_names(classes) or classes} if classes else {}  # ImageNet's wnid folders get its names
    items = [
        ImageItem(i, path, None, {"class": classes.index(name) if name is not None else -1} if classes else {})
        for i, (path, name) in enumerate(zip(paths, names))
    ]
    return ImageSource(spec, kind, str(root), items, tasks)


def _walk(folder: Path) -> list[str]:
    """Relative posix paths of image files under `folder`, hidden files and folders left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, folder)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                found.append(name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/"))
    return found


# --------------------------------------------------------------------------- decoding


def fast_decode(manifest: dict) -> bool:
    """Whether a cache's build decoded with the fast path; caches from before the choice was recorded did."""
    return manifest.get("decode", DECODE_FAST) == DECODE_FAST


def decode(path: str | os.PathLike | bytes, min_side: int = 224, fast: bool = False) -> Any:
    """Decode a file (or its bytes: a tar member, a dataset cell) to an RGB PIL image as open_clip would (see the
    module docstring); raises SkipImage with a reason.

    `fast`: JPEGs decode at a reduced scale and huge images shrink to about 2x `min_side`, EXIF orientation applied.
    """
    import io

    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2  # PIL refuses at twice this
    if isinstance(path, bytes):  # a tar member or a dataset cell
        path = io.BytesIO(path)
    try:
        size = path.getbuffer().nbytes if isinstance(path, io.BytesIO) else os.path.getsize(path)
    except OSError as exc:
        raise SkipImage(f"cannot read file: {exc.strerror or exc}") from None
    if size == 0:
        raise SkipImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, EXIF and palette warnings
            with Image.open(path) as image:
                _check_shape(*image.size)  # the header's size, before a pixel is decoded
                if fast:
                    image.draft("RGB", (min_side * 2, min_side * 2))  # JPEG: decode at a reduced scale, much faster
                image.load()
                if fast:
                    image = _shrink(ImageOps.exif_transpose(image) or image, min_side)
                return to_rgb(image)
    except Image.DecompressionBombError:
        raise SkipImage(f"too large to decode safely (over {MAX_PIXELS:,} pixels)") from None
    except Image.UnidentifiedImageError:
        raise SkipImage("not an image (unknown or unreadable format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        text = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise SkipImage(f"truncated or corrupt image: {text}") from None


def _check_shape(width: int, height: int) -> None:
    """Refuse (SkipImage) an image too large in area, or too long for its width, to decode and resize safely."""
    if width * height > MAX_PIXELS:
        raise SkipImage(f"too large to decode safely ({width:,}x{height:,} is over {MAX_PIXELS:,} pixels)")
    if max(width, height) > MAX_ASPECT * max(min(width, height), 1):
        raise SkipImage(f"extreme aspect ratio ({width:,}x{height:,}, over {MAX_ASPECT}:1): resizing it for the model "
                        "would take gigabytes")


def _shrink(image: Any, min_side: int) -> Any:
    """Box-reduce by an integer factor while the short side stays >= 2x min_side (the resize that follows antialiases)."""
    factor = min(image.size) // (2 * min_side)
    if factor < 2:
        return image
    if image.mode.startswith("I;16"):
        image = image.convert("I")  # same values, a mode `reduce` supports
    elif image.mode not in ("RGB", "RGBA", "L", "LA", "CMYK", "I", "F", "YCbCr"):
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    return image.reduce(factor)


def to_rgb(image: Any) -> Any:
    """Any PIL mode to 8-bit RGB: alpha over white, palettes expanded, 16/32-bit rescaled."""
    import numpy as np
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return image.convert("RGB") if image.mode != "RGB" else image


# --------------------------------------------------------------------------- a torch Dataset for the DataLoader


class ImageDataset:
    """`dataset[i]` -> (index, tensor or None, reason or None) for input `indices[i]`; skips never raise."""

    def __init__(self, source: ImageSource, preprocess: Callable, indices: list[int], min_side: int, fast: bool = False):
        self.source, self.preprocess, self.indices, self.min_side, self.fast = source, preprocess, indices, min_side, fast

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        index = self.indices[i]
        try:
            return index, self.preprocess(self.source.load(index, self.min_side, self.fast)), None
        except SkipImage as exc:
            return index, None, str(exc)
        except Exception as exc:  # the preprocess itself failed on an odd image: record it, don't stop the build
            return index, None, f"preprocessing failed: {type(exc).__name__}: {str(exc)[:120]}"


def collate(batch: list[tuple[int, Any, str | None]]) -> tuple[list[int], Any, list[tuple[int, str]]]:
    """Stack the decoded images; return (kept indices, (B, 3, S, S) tensor or None, [(index, reason)] skipped)."""
    import torch

    kept = [(index, tensor) for index, tensor, _ in batch if tensor is not None]
    skipped = [(index, printable(reason)) for index, tensor, reason in batch if tensor is None]
    pixels = torch.stack([tensor for _, tensor in kept]) if kept else None
    return [index for index, _ in kept], pixels, skipped
