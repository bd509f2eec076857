"""Sample quality against the training split: FID/KID (Inception-v3) and the offline classifier metric.

``fd_classifier``/``kid_classifier`` are the Fréchet distance and KID in the feature space of a small
classifier trained once on the dataset (cached in the data dir): they need no download, but they are
*not* FID and are not comparable with published FID figures. FID/KID use the standard pytorch-fid
Inception weights when their file is available.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from collections.abc import Collection
from typing import Any, Literal

import numpy as np
from jaxtyping import Float, UInt8

from ddpm_eqx._types import HostOrDeviceImages
from ddpm_eqx.classifier import FeatureReference, classifier_metrics, load_or_train_classifier, reference_statistics
from ddpm_eqx.config import Config
from ddpm_eqx.data import load_split_array, subset_ids, to_model_images
from ddpm_eqx.data_import import DataError, first_line
from ddpm_eqx.data_prepare import data_dir_of, prepare_dataset
from ddpm_eqx.images import to_uint8
from ddpm_eqx.metrics import feature_statistics, frechet_distance, kernel_inception_distance

Metric = Literal["classifier", "inception", "all"]
REFERENCE_EXAMPLES = 10_000
"""Reference images drawn from the training split (a fixed random subset) for the statistics, by default; ``None``
where a function takes ``reference``: the whole split (the published FID protocol: all 50,000 of CIFAR-10's)."""


def cache_dir(cfg: Config) -> Path:
    """Where the classifier and the reference statistics of ``cfg``'s data are kept: keyed by the prepared
    dataset itself (its folder, which for an import names its content, and its splits), so two datasets of one
    name, or an edited image folder, never share them."""
    info = prepare_dataset(cfg.data)
    key = hashlib.sha256(f"{info.builder_dir}\n{sorted(info.splits.items())}".encode()).hexdigest()[:12]
    name = f"{Path(cfg.data.dataset).name}_{cfg.data.image_size}px_{cfg.data.channels}c_{key}"
    return data_dir_of(cfg.data) / "ddpm_eqx_eval" / name


def check_labelled(cfg: Config) -> None:
    """The classifier metric learns the dataset's classes: without labels (or with one class) it cannot."""
    info = prepare_dataset(cfg.data)
    if not info.labelled:
        raise DataError(f"{cfg.data.dataset} has no class labels, which the classifier metric (fd_classifier, "
                        "training.eval_every) learns from; use the Inception metric (eval --metric inception)")


HELD_OUT = 0.1
"""The share of the train split the classifier is tested on where the dataset has no test split."""


def reference_images(
    cfg: Config, train: UInt8[np.ndarray, "n h w c"] | None = None, *, reference: int | None = REFERENCE_EXAMPLES
) -> Float[np.ndarray, "m c h w"]:
    """The training split's fixed subset of ``reference`` images (:func:`subset_ids`; ``None``: all of it) the
    statistics are taken on; from ``train`` (the whole split, decoded already) when given, else decoded."""
    if train is not None:
        return to_model_images(train[subset_ids(train.shape[0], reference)])
    images, _ = load_split_array(cfg.data, "train", max_examples=reference)
    return to_model_images(images)


def kid_subset_size(num: int, reference: int) -> int:
    """KID's subset size: 1000 (Binkowski et al.'s), or fewer where the samples or the reference are fewer."""
    return min(1000, num, reference)


class ClassifierMetric:
    """The offline metric: its classifier and the training split's reference features (of ``reference`` images,
    :func:`reference_images`), loaded once."""

    def __init__(self, cfg: Config, *, reference: int | None = REFERENCE_EXAMPLES):
        directory = cache_dir(cfg)

        decoded: list[np.ndarray] = []  # the train split, when the classifier is trained on it here

        check_labelled(cfg)

        def get_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            train = load_split_array(cfg.data, "train")
            decoded.append(train[0])
            if "test" in prepare_dataset(cfg.data).splits:
                test = load_split_array(cfg.data, "test")
                return train[0], train[1], test[0], test[1]
            # An imported folder or .npz has one split: the classifier is tested on a fixed tenth held out.
            order = np.random.default_rng(0).permutation(train[0].shape[0])
            cut = max(1, int(HELD_OUT * len(order)))
            held, kept = np.sort(order[:cut]), np.sort(order[cut:])
            return train[0][kept], train[1][kept], train[0][held], train[1][held]

        self.classifier, self.info = load_or_train_classifier(directory, Path(cfg.data.dataset).name, get_data)
        self.reference: FeatureReference = reference_statistics(
            self.classifier, reference_images(cfg, *decoded, reference=reference),
            cache_path=directory / "classifier_reference.npz",
        )

    def __call__(self, images: Float[np.ndarray, "n c h w"], *, seed: int = 0) -> dict[str, float]:
        subset = kid_subset_size(images.shape[0], self.reference.features.shape[0])
        return classifier_metrics(self.classifier, images, self.reference, seed=seed, subset_size=subset)


class NonFiniteSamples(ValueError):
    """Samples with NaN or inf pixels (a diverged model): scoring them as black images would look plausible."""

    def __init__(self, count: int, total: int):
        super().__init__(f"{count} of {total} samples are not finite (NaN or inf pixels: the model diverged?); "
                         "they are not scored")
        self.count = count


def as_scored(images: HostOrDeviceImages) -> Float[np.ndarray, "n c h w"]:
    """``images`` as they are scored: the 8-bit images a sample writes (pytorch-fid scores image files), as the
    reference images are. ``NonFiniteSamples`` where any has a NaN or inf pixel (``to_uint8`` would make it 0)."""
    bad = int((~np.isfinite(images).reshape(images.shape[0], -1).all(axis=1)).sum())
    if bad:
        raise NonFiniteSamples(bad, images.shape[0])
    return to_model_images(to_uint8(images))


def check_metrics_available(cfg: Config, metric: Metric, fid_weights: str | None) -> list[str]:
    """What would otherwise fail only after the samples are drawn (hours at eval's defaults): no labels for
    ``metric="classifier"``; no usable Inception weights for ``"inception"``, or for ``"all"`` when a file is
    named (``fid_weights`` or $DDPM_EQX_FID_WEIGHTS; ``"all"`` without one reports ``fid_unavailable``). The
    weights are read here (``UnreadableWeights``: a file that is not pytorch-fid's), and kept for the scoring.
    Returns the Fréchet distances that will be scored (``"fd_classifier"``, ``"fid"``)."""
    from ddpm_eqx.inception import WEIGHTS_ENV_VAR

    scored = []
    if metric == "classifier":
        check_labelled(cfg)
    if metric == "classifier" or (metric == "all" and prepare_dataset(cfg.data).labelled):
        scored.append("fd_classifier")
    if metric == "inception" or (metric == "all" and (fid_weights or os.environ.get(WEIGHTS_ENV_VAR))):
        _load_weights(fid_weights)
        scored.append("fid")
    return scored


class UnreadableWeights(ValueError):
    """A named FID weights file that is not pytorch-fid's Inception (torn, another file, another network)."""


_loaded: dict[tuple[str, int, int], Any] = {}  # the last weights read (eval checks them before sampling)


def _load_weights(fid_weights: str | None) -> tuple[Any, Path]:
    """The Inception network and its weights file. FileNotFoundError (one line) where the file is missing or is
    a .pth that cannot be read here (torch is not installed and no converted .npz is beside it);
    ``UnreadableWeights`` (one line, naming the file) where it does not load as pytorch-fid's weights."""
    import importlib.util

    from ddpm_eqx.inception import WEIGHTS_FILENAME, WEIGHTS_FLAG, load_inception, resolve_weights_path

    path = resolve_weights_path(fid_weights)
    if path.suffix == ".pth" and not path.with_suffix(".npz").is_file() and importlib.util.find_spec("torch") is None:
        raise FileNotFoundError(f"reading the FID weights {path} needs torch, which is not installed: convert them "
                                "once with ddpm_eqx.inception.convert_pth_to_npz where torch is, and pass the .npz")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _loaded:
        try:
            model = load_inception(path)
        except (OSError, ValueError, KeyError, EOFError, ImportError, RuntimeError, pickle.UnpicklingError,
                zipfile.BadZipFile) as e:  # RuntimeError, UnpicklingError: torch.load of a torn or foreign .pth
            reason = f"{type(e).__name__}: {first_line(e, 160)}"
            beside = (f"; a .npz converted beside a .pth is read instead of it: delete {path.with_suffix('.npz')} if "
                      "the .pth was replaced") if path.suffix == ".pth" and path.with_suffix(".npz").is_file() else ""
            raise UnreadableWeights(f"the FID weights {path} cannot be read as pytorch-fid's Inception-v3 ({reason}); "
                                    f"pass {WEIGHTS_FILENAME} or its .npz with {WEIGHTS_FLAG}{beside}") from e
        _loaded.clear()
        _loaded[key] = model
    return _loaded[key], path


def inception_metrics(cfg: Config, images: Float[np.ndarray, "n c h w"], weights: str | None, *,
                      seed: int = 0, reference: int | None = REFERENCE_EXAMPLES) -> dict[str, float]:
    """FID and KID with the pytorch-fid Inception-v3 against ``reference`` training images
    (:func:`reference_images`); FileNotFoundError or ``UnreadableWeights`` (one line) without usable weights. The
    reference statistics are cached per weights file (its content's hash) and ``reference``, written whole, and an
    unreadable or stale cache is recomputed."""
    from ddpm_eqx.inception import inception_features

    model, weights_path = _load_weights(weights)
    with open(weights_path, "rb") as f:  # streamed: ~95 MB
        key = f"{hashlib.file_digest(f, 'sha256').hexdigest()[:16]}-{'all' if reference is None else reference}"
    path = cache_dir(cfg) / "inception_reference.npz"
    cached = None
    try:
        with np.load(path) as stored:
            if str(stored["key"]) == key:
                cached = stored["mu"], stored["sigma"], stored["features"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # none yet, torn, or of other weights
        pass
    if cached is None:
        ref_features = inception_features(model, reference_images(cfg, reference=reference))
        ref_mu, ref_sigma = feature_statistics(ref_features)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, key=key, mu=ref_mu, sigma=ref_sigma, features=ref_features)
        tmp.replace(path)  # a killed write never leaves a torn cache behind
    else:
        ref_mu, ref_sigma, ref_features = cached
    features = inception_features(model, images)
    mu, sigma = feature_statistics(features)
    subset = kid_subset_size(features.shape[0], ref_features.shape[0])
    kid, kid_std = kernel_inception_distance(features, ref_features, subset_size=subset, seed=seed)
    return {"fid": frechet_distance(mu, sigma, ref_mu, ref_sigma), "kid": kid, "kid_std": kid_std,
            "reference_images": ref_features.shape[0]}


def feature_dims() -> dict[str, int]:
    """The feature dimension of each Fréchet distance."""
    from ddpm_eqx.classifier import ClassifierHyperparams
    from ddpm_eqx.inception import FEATURE_DIM

    return {"fd_classifier": ClassifierHyperparams().feature_dim, "fid": FEATURE_DIM}


def small_sample_warning(num: int, distances: Collection[str]) -> str | None:
    """A line where ``num`` samples are under twice the feature dimension of a Fréchet distance in ``distances``
    (what :func:`check_metrics_available` returns): their covariance is then poorly estimated (singular below the
    dimension) and the distance biased upwards, the more the fewer the samples, so that scores compare only at
    one ``num``."""
    few = {name: dim for name, dim in feature_dims().items() if name in distances and num < 2 * dim}
    if not few:
        return None
    named = " and ".join(f"{name} ({dim} features)" for name, dim in few.items())
    return (f"{num} samples are few for {named}: the distance is biased upwards by small samples (real images "
            "score far above 0), so compare scores only at one --num (the usual FID: 10,000 or more)")


def evaluate_images(cfg: Config, images: HostOrDeviceImages, *, metric: Metric = "all",
                    fid_weights: str | None = None, seed: int = 0,
                    reference: int | None = REFERENCE_EXAMPLES) -> dict[str, Any]:
    """All requested metrics of ``images`` (model layout, [-1, 1]), with what they were measured against: the
    reference images (``reference_images`` of the train split: a fixed random subset where it has more than
    ``reference``, the whole split for ``None``), KID's subset size and each distance's feature dimension. With
    ``metric="all"`` unusable Inception weights are reported under ``"fid_unavailable"`` instead of failing."""
    results: dict[str, Any] = {}
    images = as_scored(images)
    if metric in ("classifier", "all"):
        try:
            check_labelled(cfg)
        except DataError as e:
            if metric == "classifier":
                raise
            results["classifier_unavailable"] = str(e)
        else:
            measure = ClassifierMetric(cfg, reference=reference)
            results.update(measure(images, seed=seed))
            results["classifier_test_accuracy"] = measure.info.test_accuracy
            results["reference_images"] = measure.reference.features.shape[0]
    if metric in ("inception", "all"):
        try:
            results.update(inception_metrics(cfg, images, fid_weights, seed=seed, reference=reference))
        except (FileNotFoundError, UnreadableWeights) as e:
            if metric == "inception":
                raise
            results["fid_unavailable"] = str(e)
    if "reference_images" in results:  # what the scores were measured against
        results.update(reference_split="train",
                       kid_subset_size=kid_subset_size(images.shape[0], results["reference_images"]),
                       feature_dims={name: dim for name, dim in feature_dims().items() if name in results})
    return results
