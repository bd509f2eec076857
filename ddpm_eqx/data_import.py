"""Import local data into the TFDS ArrayRecord format, once, so that it is read like any TFDS dataset.

Two kinds of input:

- a folder of images (png/jpg/jpeg/webp/bmp, searched recursively). When every image sits in a
  top-level subfolder, the subfolders holding images are the classes (sorted names -> labels 0, 1, ...);
  images beside the subfolders make the folder one without classes (with a warning naming them).
  Transparent pixels are composited on white.
- an ``.npz`` file with ``image`` (uint8 [N, H, W] or [N, H, W, C]) and optionally ``label``, or a
  folder of such files, one split each, named by a word of the file name (``mnist_test.npz`` -> test,
  ``val.npz`` -> validation, any other -> train). A single file is the ``train`` split.

The result lives under ``<data_dir>/ddpm_eqx_imports/<name>-<key>/``, where the key hashes the resolved
path and its listing (names, sizes, mtimes): editing the folder makes a new import. The user's folder is
never written to. A small ``GeneratorBasedBuilder`` writes the files; with a ``Tensor(uint8)`` feature or
PIL images it needs no TensorFlow.
"""

import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image as PILImage
from PIL import ImageOps

from ddpm_eqx._io import first_line, write_text_atomic

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# Bump when imported datasets change: old imports are then redone. Image folders: 3, 16-bit grey scaled; 4, EXIF
# orientation applied; 5, grey images with transparency composited on white (as colour ones were), and the size in
# the features where all images share one. .npz imports: unchanged since 3 (their evaluation caches are keyed by the import).
_FORMAT_VERSION = {"images": "6", "npz": "4"}
_MAX_CLASSES = 1_000_000  # a label above this is taken for a mistake (an id, a float scaled by mistake), not a class


class DataError(ValueError):
    """Unusable data or settings; the one-line message says what to do (re-exported by ``data``)."""


def safe_name(text: str) -> str:
    """``text`` with each character a file name in the data dir should not hold replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def import_path(path: Path, data_dir: Path) -> Path:
    """Return the builder directory of ``path``'s import, converting it first when needed."""
    path = path.expanduser().resolve()
    if path.is_file() and path.suffix.lower() == ".npz":
        files = [path]
    elif path.is_dir():
        files = _listing(path)
    else:
        raise DataError(f"{path} is neither a folder of images nor an .npz file")
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    arrays = [p for p in files if p.suffix.lower() == ".npz"]
    if not images and not arrays:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) and no .npz files found in {path}")
    if images and arrays:
        raise DataError(f"{path} holds both images ({len(images)}, e.g. {images[0].relative_to(path)}) and .npz files "
                        f"({arrays[0].relative_to(path)}): point --dataset at a folder of one kind")

    digest = hashlib.sha256(f"{_FORMAT_VERSION['images' if images else 'npz']}\n{path}\n".encode())
    for p in files:
        stat = p.stat()
        digest.update(f"{p.relative_to(path) if p != path else p.name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    name = safe_name(path.stem)[:40] or "data"
    root = data_dir / "ddpm_eqx_imports" / f"{name}-{digest.hexdigest()[:16]}"
    builder_dir = root / _ImportedDataset.name / str(_ImportedDataset.VERSION)
    notes = root / "warnings.txt"  # what the import warned of (files left out, no classes), warned on every use
    if (builder_dir / "dataset_info.json").exists():  # TFDS renames a finished build into place
        _warn(notes)
        return builder_dir
    with exclusive(root.parent / f".{root.name}.lock"):
        if (builder_dir / "dataset_info.json").exists():  # another process imported it while this one waited
            _warn(notes)
            return builder_dir
        try:
            with no_stray_temp_dirs():
                if images:
                    builder: _ImportedDataset = _folder_builder(path, images, root)
                else:
                    builder = _npz_builder(path, arrays, root)
            print(f"Importing {path} into {root} (once) ...", flush=True)  # checked: it will be imported
            _write_notes(notes, builder)  # before the build is final: a finished import always has its warnings
            builder.download_and_prepare(file_format="array_record")
        except DataError:
            raise
        except Exception as err:  # a full or read-only disk, a vanished file: nothing is taken as imported
            reason = f"{type(err).__name__}: {first_line(err, 200)}"
            raise DataError(f"importing {path} into {root} failed ({reason}); fix that (free space there?) and run "
                            "again") from err
        if builder.skipped:
            builder.notes.append(f"skipped {len(builder.skipped)} unreadable file(s) of {path}, e.g. "
                                 f"{builder.skipped[0]}")
        _write_notes(notes, builder)
    _warn(notes)
    return builder_dir


def _write_notes(notes: Path, builder: "_ImportedDataset") -> None:
    """Keep the import's warnings beside it (none: no file), whole or not at all."""
    if builder.notes:
        notes.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(notes, "".join(f"{note}\n" for note in builder.notes))
    else:
        notes.unlink(missing_ok=True)


def _warn(notes: Path) -> None:
    """Repeat an import's warnings (one per line of ``notes``, if any): a later run is told as the first was."""
    if notes.is_file():
        for note in notes.read_text().splitlines():
            warnings.warn(note, stacklevel=3)


def _listing(root: Path) -> list[Path]:
    """The files under ``root``, following linked folders (a class folder may be a link; each real folder
    once), leaving out hidden files and folders (``.ipynb_checkpoints/`` is no class)."""
    found, seen = [], set()

    def unreadable(err: OSError) -> None:  # os.walk skips a folder it cannot list: a class would vanish
        if Path(str(err.filename)).name == "lost+found":  # a file system's own, at the root of a mounted disk
            return
        raise DataError(f"cannot read {err.filename} ({err.strerror}), a folder of {root}: make it readable "
                        "(chmod) or move it out")

    for folder, dirs, names in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree, or a second link to one folder
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # sorted: the same link wins on every disk
        found += [Path(folder) / n for n in names if not n.startswith(".") and (Path(folder) / n).is_file()]
    return sorted(found)


@contextlib.contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    """Hold an advisory lock on the file ``lock`` (made if needed), waiting for another holder: the processes
    of a multi-process run on one disk prepare the same dataset, and the second would otherwise race the first
    into TFDS's final rename (``FileExistsError``); it now waits and finds the dataset ready. Where the file
    system has no locks, or the lock file cannot be made, nothing is held (as before)."""
    try:  # read-only: another user's lock file in a shared data dir still locks
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError:  # a data dir this process cannot write: the import itself will say so
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


@contextlib.contextmanager
def no_stray_temp_dirs() -> Iterator[None]:
    """Removes the empty ``tmpXXXXtfds`` folder TFDS leaves per builder of an unprepared dataset.

    ``DatasetInfo.initialize_from_bucket`` makes it for GCS metadata, then returns at once when GCS is off
    (TFDS's default) without removing it. Only new, empty folders of that pattern are removed.
    """
    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("tmp*tfds"))
    try:
        yield
    finally:
        for path in set(temp.glob("tmp*tfds")) - before:
            with contextlib.suppress(OSError):  # not empty (GCS enabled and used), or already gone
                path.rmdir()


class _ImportedDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # type: ignore[call-arg]
    """One builder for every import: the features and generators are given to the constructor."""

    name = "imported"
    VERSION = tfds.core.Version("1.0.0")

    def __init__(
        self, *, features: tfds.features.FeaturesDict, splits: dict[str, Any], description: str, data_dir: Path
    ):
        self._features = features
        self._splits = splits  # split name -> a zero-argument function yielding (key, example)
        self._description = description
        self.skipped: list[str] = []
        self.notes: list[str] = []  # warnings for the user, repeated on every use of the import
        super().__init__(data_dir=str(data_dir), file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        # No shuffling: the files' order is kept (load_split_array returns examples in that order).
        return tfds.core.DatasetInfo(
            builder=self, description=self._description, features=self._features, disable_shuffling=True
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager
        return {split: make() for split, make in self._splits.items()}

    def _generate_examples(self, **kwargs: Any) -> Iterator[tuple[int, dict[str, Any]]]:  # pragma: no cover
        raise NotImplementedError  # the split generators above are used instead


# --- a folder of images -------------------------------------------------------------------------


def _folder_builder(root: Path, images: list[Path], out: Path) -> _ImportedDataset:
    top = [p.relative_to(root).parts for p in images]
    loose = [p for p, parts in zip(images, top) if len(parts) == 1]
    classes = sorted({parts[0] for parts in top}) if not loose else []
    notes = []
    if loose and len(loose) < len(images):
        folders = sorted({parts[0] for parts in top if len(parts) > 1})
        notes.append(f"{len(loose)} image(s) of {root} sit beside its subfolders (e.g. {loose[0].name}), so it is "
                     f"imported without classes; move them into a class folder to make classes of the "
                     f"{len(folders)} subfolders ({_some(folders)})")
    if classes:
        empty = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                       and d.name not in classes)
        if empty:
            notes.append(f"subfolder(s) of {root} without images are no class: {_some(empty)} (labels "
                         f"0..{len(classes) - 1} go to the {len(classes)} folders with images, in sorted order)")
    class_of = {name: i for i, name in enumerate(classes)}
    # A header pass picks one mode for the whole dataset (grey only when every image is grey) and finds
    # files that are not images at all; truncated files show up later, when decoded.
    readable: list[Path] = []
    skipped: list[str] = []
    size_of: dict[Path, tuple[int, int]] = {}
    mode_of: dict[Path, str] = {}
    for p in images:
        try:
            with PILImage.open(p) as im:
                mode_of[p] = im.mode
                w, h = im.size
                turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # stored upright below: a quarter turn
                size_of[p] = (w, h) if turned else (h, w)
            readable.append(p)
        except Exception:  # PIL raises many kinds of errors for broken files
            skipped.append(str(p))
    sizes = Counter(size_of.values())
    if len(sizes) > 1:
        # Before calling the sizes various, decode the rarer sizes' images until one decodes: truncated files
        # (skipped later, when decoded) must not make a folder of one size "various" (nor decide its mode).
        common = sizes.most_common(1)[0][0]
        broken = set()
        for p in (p for p in readable if size_of[p] != common):
            if _decodes(p):
                break
            broken.add(p)
        skipped.extend(str(p) for p in readable if p in broken)
        readable = [p for p in readable if p not in broken]
        sizes = Counter(size_of[p] for p in readable)
    if not readable:
        raise DataError(f"none of the {len(images)} image files in {root} could be read")
    mode = "L" if {mode_of[p] for p in readable} <= _GREY_MODES else "RGB"

    def generate() -> Iterator[tuple[int, dict[str, Any]]]:
        for i, p in enumerate(readable):
            try:
                image = _load_image(p, mode)
            except Exception:
                builder.skipped.append(str(p))
                continue
            label = class_of[p.relative_to(root).parts[0]] if classes else 0
            yield i, {"image": image, "label": label}  # int keys: with shuffling off TFDS keeps key order

    # One size for all: stated in the features, so that a run can take its image size from the data.
    height, width = next(iter(sizes)) if len(sizes) == 1 else (None, None)  # (None, None): various
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(height, width, 1 if mode == "L" else 3)),
        "label": tfds.features.ClassLabel(names=classes or ["none"]),
    })
    builder = _ImportedDataset(
        features=features, splits={"train": generate}, description=f"Images imported from {root}", data_dir=out
    )
    builder.skipped.extend(skipped)
    builder.notes.extend(notes)
    return builder


def _some(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _decodes(path: Path) -> bool:
    try:
        with PILImage.open(path) as im:
            im.load()
        return True
    except Exception:  # PIL raises many kinds of errors for broken files
        return False


def _load_image(path: Path, mode: str) -> bytes | PILImage.Image:
    """The file's own bytes when they decode to ``mode`` as they are, else a converted PIL image."""
    with PILImage.open(path) as opened:
        opened.load()
        as_is = opened.mode == mode and "transparency" not in opened.info and opened.getexif().get(0x0112, 1) == 1
        if opened.format in ("PNG", "JPEG") and as_is:
            return path.read_bytes()
        im = ImageOps.exif_transpose(opened)  # a camera's orientation tag: stored upright (a copy where rotated)
        if im.mode.startswith("I"):
            # 16-bit grey (PIL opens 16-bit PNGs as I;16, or I in older versions): convert clips it at 255.
            values = np.asarray(im, np.float64)
            scaled = np.rint(values / 257).clip(0, 255).astype(np.uint8)
            if "transparency" in im.info:  # the grey value that stands for transparent: white, as below
                scaled[values == im.info["transparency"]] = 255
            return PILImage.fromarray(scaled, "L").convert(mode)
        if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:  # composite on white
            background = PILImage.new("RGBA", im.size, (255, 255, 255, 255))
            return PILImage.alpha_composite(background, im.convert("RGBA")).convert(mode)
        return im.convert(mode)


# --- .npz arrays --------------------------------------------------------------------------------


_SPLIT_WORDS = {"train": "train", "test": "test", "val": "validation", "valid": "validation", "validation": "validation"}


def _split_name(p: Path) -> str:
    """The split a file of several is, from the words of its name: ``mnist_test`` and ``val2017`` name one, ``latest``
    does not (words are the runs of letters; ``training``/``trainset`` count as ``train``, likewise for the others)."""
    words = {re.sub(r"(ing|set)$", "", w) for w in re.findall(r"[a-z]+", p.stem.lower())}
    named = {_SPLIT_WORDS[w] for w in words if w in _SPLIT_WORDS}
    if len(named) > 1:
        raise DataError(f"{p.name} names the splits {sorted(named)}; rename it to name one of train, test, validation")
    return named.pop() if named else "train"


def _npz_builder(root: Path, files: list[Path], out: Path) -> _ImportedDataset:
    by_split: dict[str, Path] = {}
    for p in files:
        split = "train" if len(files) == 1 else _split_name(p)
        if split in by_split:
            raise DataError(f"{by_split[split].name} and {p.name} would both be the {split!r} split of {root}")
        by_split[split] = p
    shapes, num_classes, unlabelled = set(), 1, []
    for p in by_split.values():
        image, label = _checked_arrays(p)
        shapes.add(image.shape[1:3] + (image.shape[3] if image.ndim == 4 else 1,))
        if label is not None:
            num_classes = max(num_classes, int(label.max()) + 1)
        else:
            unlabelled.append(p.name)
    if len(shapes) != 1:
        raise DataError(f"the .npz files of {root} have different image shapes: {sorted(shapes)}")
    if unlabelled and len(unlabelled) < len(by_split):  # its images would all be class 0 of a labelled dataset
        raise DataError(f"{_some(unlabelled)} in {root} have no 'label' array where the other .npz files have one; "
                        "add labels to every file, or remove them from all")

    def make(p: Path) -> Any:
        def generate() -> Iterator[tuple[int, dict[str, Any]]]:
            image, label = _checked_arrays(p)  # as checked above (labels squeezed, bools counted as 0/1)
            images = image.reshape((-1, *shape))
            labels = label if label is not None else np.zeros(len(images), np.int64)
            for i in range(len(images)):
                yield i, {"image": images[i], "label": labels[i]}

        return generate

    (shape,) = shapes
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=shape, dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=num_classes),
    })
    return _ImportedDataset(
        features=features,
        splits={split: make(p) for split, p in by_split.items()},
        description=f"Arrays imported from {root}",
        data_dir=out,
    )


def _checked_arrays(p: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``p``'s ``image`` and ``label`` (None without one), or a ``DataError`` saying what is wrong with them."""
    try:
        loaded = np.load(p)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy under an .npz name
            raise ValueError("a single array, not named arrays")
        with loaded as npz:
            keys = list(npz.files)
            image = npz["image"] if "image" in keys else None
            label = npz["label"] if "label" in keys else None
    except Exception as err:  # noqa: BLE001  (not a zip, truncated, a bad CRC, pickled objects ...)
        reason = f"{type(err).__name__}: {first_line(err, 160)}"
        raise DataError(f"{p} cannot be read as an .npz of arrays ({reason}); save it with np.savez(path, "
                        "image=..., label=...)") from None
    if image is None:
        raise DataError(f"{p} has no 'image' array (keys: {', '.join(keys)})")
    if image.dtype != np.uint8 or image.ndim not in (3, 4) or (image.ndim == 4 and image.shape[-1] not in (1, 3)):
        raise DataError(f"{p}: 'image' must be uint8 [N,H,W] or [N,H,W,1|3] (NHWC, 0..255), got {image.dtype} "
                        f"{image.shape}")
    if not len(image):
        raise DataError(f"{p}: 'image' holds no images")
    if label is None:
        return image, None
    if label.ndim == 2 and label.shape[1] == 1:  # [N, 1], as keras' datasets give them
        label = label[:, 0]
    if label.dtype == np.bool_:
        label = label.astype(np.int64)
    if label.ndim != 1 or len(label) != len(image):
        raise DataError(f"{p}: 'label' must be one class index per image, shape ({len(image)},), got {label.shape}")
    if not (np.issubdtype(label.dtype, np.integer) or (np.issubdtype(label.dtype, np.floating)
                                                      and np.all(np.isfinite(label) & (label == np.round(label))))):
        raise DataError(f"{p}: 'label' must hold integer class indices, got {label.dtype}")
    if label.min() < 0 or label.max() >= _MAX_CLASSES:
        raise DataError(f"{p}: 'label' must be class indices 0..{_MAX_CLASSES - 1}, got {label.min()}..{label.max()}")
    return image, label.astype(np.int64)
