"""Finding and preparing datasets: TFDS names (download or manual dir) and local paths (imported).

A TFDS dataset is prepared once as ArrayRecord with TFDS's own ``download_and_prepare`` (its builders need
TensorFlow); reading it later needs only ``array_record``. Offline, TFDS retries downloads for minutes, so
the builder's registered archives are checked first (manual dir, earlier downloads, a 3 s connection
probe) and a missing one is a one-line ``DataError`` naming the files and the folder to put them in.
"""

import dataclasses
import difflib
import importlib.util
import os
import re
import socket
import sys
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from ddpm_eqx.config import DataConfig
from ddpm_eqx.data_import import DataError, exclusive, first_line, import_path, no_stray_temp_dirs, safe_name

_TFDS_NAME = re.compile(r"[a-z0-9_]+(/[\w.-]+)?(:[\d.*]+)?")
_CATALOG = "https://www.tensorflow.org/datasets/catalog/overview"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What ``prepare_dataset`` found: enough for the CLI to print and the model to size itself."""

    name: str
    builder_dir: str
    splits: dict[str, int]
    image_key: str
    label_key: str | None
    image_shape: tuple[int | None, ...]
    num_classes: int | None

    @property
    def labelled(self) -> bool:
        """Class labels of two classes or more (a class-conditional model and the classifier metric need them)."""
        return self.label_key is not None and self.num_classes is not None and self.num_classes >= 2


def data_dir_of(cfg: DataConfig) -> Path:
    return Path(cfg.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def _manual_dir(cfg: DataConfig, name: str) -> Path:
    """``data.manual_dir``, else TFDS's ``<data_dir>/downloads/manual/``, or its subfolder ``<name>/`` where there
    is one: MNIST's and Fashion-MNIST's archives have the same file names, so they cannot share one folder."""
    if cfg.manual_dir:
        return Path(cfg.manual_dir).expanduser()
    shared = data_dir_of(cfg) / "downloads" / "manual"
    return shared / name if (shared / name).is_dir() else shared


def _tfds_builder(name: str, data_dir: Path) -> tfds.core.DatasetBuilder:
    try:
        with no_stray_temp_dirs():
            return tfds.builder(name, data_dir=str(data_dir), file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        close = difflib.get_close_matches(name, tfds.list_builders(with_community_datasets=False), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise DataError(
            f"unknown dataset {name!r}{hint}: not an existing path nor a TFDS name; list names with "
            f"`python -c 'import tensorflow_datasets as t; print(t.list_builders())'` or see {_CATALOG}"
        ) from None
    except Exception as err:  # a bad config or version, e.g. 'mnist:9.9.9'
        raise DataError(f"cannot load the TFDS builder {name!r}: {first_line(err)}") from err


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens quickly: TFDS itself retries for minutes."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True  # a proxy may well work where a direct connection does not
    parts = urllib.parse.urlsplit(url)
    address = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo itself has no timeout
    thread.start()
    thread.join(timeout + 1.0)
    return bool(ok)


def _missing_archives(builder: tfds.core.DatasetBuilder, manual_dir: Path, download_dir: Path) -> dict[str, str]:
    """URL -> file name of the builder's registered archives that are neither in manual_dir nor downloaded."""
    from tensorflow_datasets.core.download import resource  # where TFDS names its downloads

    missing = {}
    for url, info in (builder.url_infos or {}).items():
        name = info.filename or url.rstrip("/").rsplit("/", 1)[-1]
        if not (manual_dir / name).exists() and not (download_dir / resource.get_dl_fname(url, info.checksum)).exists():
            missing[url] = name
    return missing


def _foreign_archives(builder: tfds.core.DatasetBuilder, manual_dir: Path) -> list[str]:
    """Lines for the files in ``manual_dir`` that have a registered archive's name but not its size: another
    dataset's file of that name (MNIST and Fashion-MNIST share theirs), which TFDS would fail on by checksum."""
    lines = []
    for url, info in (builder.url_infos or {}).items():
        name = info.filename  # TFDS looks in the manual dir only for archives registered with a file name
        if name and (manual_dir / name).is_file() and info.size and (size := (manual_dir / name).stat().st_size) != int(info.size):
            lines.append(f"{name} ({size:,} bytes, {builder.name}'s has {int(info.size):,})")
    return lines


def _download_and_prepare(builder: tfds.core.DatasetBuilder, cfg: DataConfig, download: bool) -> None:
    name = builder.name
    manual_dir = _manual_dir(cfg, name)
    if foreign := _foreign_archives(builder, manual_dir):
        raise DataError(f"{manual_dir}/ holds files named as {name}'s archives that are not them: "
                        f"{'; '.join(foreign)} (another dataset's?); give {name}'s archives a folder of their own and "
                        "pass it as --manual-dir (data prepare) or --set data.manual_dir=DIR")
    missing = _missing_archives(builder, manual_dir, data_dir_of(cfg) / "downloads")
    where = f"place {', '.join(f'{f} ({u})' for u, f in missing.items())} in {manual_dir}/"
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not (manual_dir.is_dir() and any(manual_dir.iterdir())):
        raise DataError(f"{name} must be downloaded by hand into {manual_dir}/: "
                        + " ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split()))
    if missing and not (download and _reachable(next(iter(missing)))):
        raise DataError(f"cannot download {name} ({'offline' if download else 'downloads disabled'}): {where}")
    if importlib.util.find_spec("tensorflow") is None:
        raise DataError(f"preparing the TFDS dataset {name} needs TensorFlow: pip install 'ddpm-eqx[prepare]'")
    print(f"Preparing {name} as ArrayRecord in {data_dir_of(cfg)} (once) ...", flush=True)
    try:
        builder.download_and_prepare(
            file_format="array_record", download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
        )
    except Exception as err:
        hint = f"; {where}" if missing else ""
        raise DataError(f"preparing {name} failed: {type(err).__name__}: {first_line(err)}{hint}") from err


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    # Without dataset_info.json it is not prepared, and TFDS's is_prepared would warn as much ("Variant folder").
    return (Path(builder.data_dir) / "dataset_info.json").exists() and builder.is_prepared()


def names_a_path(name: str) -> bool:
    """Whether ``data.dataset`` names a file or folder rather than a TFDS dataset: it exists, and is not a bare
    TFDS name (``fashion_mnist``, ``mnist:3.*``) that TFDS knows. A registered name wins over a folder of the same
    name in the working directory (a run's stored config means the dataset it trained on): ``./fashion_mnist``
    names the folder."""
    if not Path(name).expanduser().exists():
        return False
    registered = tfds.list_builders(with_community_datasets=False)
    return not (_TFDS_NAME.fullmatch(name) and re.split("[/:]", name)[0] in registered)


_NOTED: set[str] = set()


def prepared_builder(cfg: DataConfig, *, download: bool = True) -> tfds.core.DatasetBuilder:
    """The builder of ``cfg.dataset``, prepared (or imported) first when needed."""
    name, data_dir = cfg.dataset, data_dir_of(cfg)
    path = Path(name).expanduser()
    if names_a_path(name) or not _TFDS_NAME.fullmatch(name):
        if not path.exists():
            raise DataError(f"dataset {name!r}: no such file or folder (nor a TFDS name; see {_CATALOG})")
        return tfds.builder_from_directory(str(import_path(path, data_dir)))
    if path.exists() and name not in _NOTED:  # once a process (validated first, then read)
        _NOTED.add(name)
        print(f"note: data.dataset={name!r} is the TFDS dataset, not the folder {name}/ here (./{name} names that)",
              file=sys.stderr, flush=True)
    builder = _tfds_builder(name, data_dir)
    feature_keys(builder)  # a dataset without images fails here, before any download
    if not _is_prepared(builder):
        # One process prepares, the others of a multi-process run on this disk wait and read it (see exclusive).
        with exclusive(data_dir / f".{safe_name(name)}.ddpm_eqx.lock"):
            builder = _tfds_builder(name, data_dir)  # as it is now: another process may have prepared it
            if not _is_prepared(builder):
                _download_and_prepare(builder, cfg, download)
    elif str(builder.info.file_format) != str(tfds.core.FileFormat.ARRAY_RECORD):
        raise DataError(
            f"{name} in {builder.data_dir} was prepared as {builder.info.file_format}, but reading needs "
            "ArrayRecord: set data.data_dir to another folder, or delete that one, and prepare again"
        )
    return builder


def feature_keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str | None]:
    """The image feature (preferring 'image') and the label feature ('label', else a ClassLabel) or None."""
    features = builder.info.features
    images = [
        k for k, f in features.items()
        if isinstance(f, (tfds.features.Image, tfds.features.Tensor)) and len(f.shape) == 3 and f.np_dtype == np.uint8
    ]
    if not images:
        raise DataError(f"{builder.name} has no uint8 image feature (features: {', '.join(features.keys())})")
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    label = features["label"] if "label" in features else None
    if isinstance(label, tfds.features.Tensor) and not label.shape and np.issubdtype(label.np_dtype, np.integer):
        labels.insert(0, "label")
    return ("image" if "image" in images else images[0]), (labels[0] if labels else None)


def prepare_dataset(cfg: DataConfig, *, download: bool = True) -> DatasetInfo:
    """Prepare ``cfg.dataset`` (download or manual dir, or import a path) if needed; describe it.

    With ``download=False`` a missing archive is an error instead of a download attempt.
    """
    builder = prepared_builder(cfg, download=download)
    image_key, label_key = feature_keys(builder)
    features = builder.info.features
    label = features[label_key] if label_key else None
    return DatasetInfo(
        name=cfg.dataset,
        builder_dir=str(builder.data_dir),
        splits={k: v.num_examples for k, v in builder.info.splits.items()},
        image_key=image_key,
        label_key=label_key,
        image_shape=tuple(features[image_key].shape),
        num_classes=label.num_classes if isinstance(label, tfds.features.ClassLabel) else None,
    )


def open_split(builder: tfds.core.DatasetBuilder, split: str, *, image_bytes: str | None = None) -> Any:
    """A random-access source over ``split``. With ``image_bytes``, that feature, if an encoded ``Image``, is
    returned as its PNG/JPEG bytes for the caller to decode (TFDS's NumPy decoding of an image costs ~4x
    Pillow's own)."""
    if split.split("[")[0] not in builder.info.splits:
        raise DataError(f"{builder.name} has no split {split!r}; splits: {', '.join(builder.info.splits)}")
    decoders = None
    if image_bytes is not None and isinstance(builder.info.features[image_bytes], tfds.features.Image):
        decoders = {image_bytes: tfds.decode.SkipDecoding()}
    return builder.as_data_source(split=split, decoders=decoders)
