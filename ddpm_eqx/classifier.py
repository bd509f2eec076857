"""An offline sample-quality metric: Fréchet distance and KID in a small classifier's feature space.

FID (Heusel et al. 2017) needs Inception-v3 weights (`ddpm_eqx.inception`), which an offline machine cannot fetch.
This module trains a small CNN on the dataset's own train split once (about a minute on 2 CPU cores), caches it,
and measures generated images in its penultimate-layer feature space with the same Fréchet distance and KID
(Binkowski et al. 2018) maths. The numbers are comparable only between runs that share the cached classifier: they
are NOT FID/KID and must never be reported as such; hence the names `fd_classifier` and `kid_classifier`.

Images in: float32 [N, C, H, W] in [-1, 1] (the diffusion model's layout). Training data in: uint8 [N, H, W, C].
"""

import dataclasses
import hashlib
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax import lax
from jaxtyping import Array, Float, Int, PRNGKeyArray, Shaped, UInt8

from ddpm_eqx._io import first_line, write_text_atomic
from ddpm_eqx.metrics import feature_statistics, frechet_distance, kernel_inception_distance

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bumped when the architecture or the files change, so stale caches are retrained, not misread."""


def _downsampled(n: int) -> int:
    """Spatial size after two stride-2 'SAME' convolutions: ceil(ceil(n / 2) / 2)."""
    return -(-(-(-n // 2)) // 2)


class Conv(eqx.Module):
    """'SAME' convolution on one channels-last image: XLA:CPU runs NHWC convs ~2x faster than NCHW here."""

    weight: Float[Array, "kh kw cin cout"]
    bias: Float[Array, " cout"]
    stride: int = eqx.field(static=True)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, *, key: PRNGKeyArray):
        fan_in = in_channels * kernel_size * kernel_size
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.weight = jr.normal(key, shape) * np.sqrt(2.0 / fan_in)  # He init: ReLU follows
        self.bias = jnp.zeros(out_channels)
        self.stride = stride

    def __call__(self, x: Float[Array, "h w cin"]) -> Float[Array, "h2 w2 cout"]:
        dims = ("NHWC", "HWIO", "NHWC")
        y = lax.conv_general_dilated(x[None], self.weight, (self.stride,) * 2, "SAME", dimension_numbers=dims)
        return y[0] + self.bias


class Classifier(eqx.Module):
    """conv5x5/2 -> ReLU -> conv3x3/2 -> ReLU -> dense -> ReLU (features) -> dense (logits).

    Strided convolutions instead of conv + max-pool: a third of the FLOPs for about the same accuracy, which is
    what lets it train in about a minute on a laptop-class CPU.
    """

    conv1: Conv
    conv2: Conv
    hidden: eqx.nn.Linear
    head: eqx.nn.Linear
    image_shape: tuple[int, int, int] = eqx.field(static=True)
    """(channels, height, width) of the images it was built for."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        *,
        width: int = 32,
        feature_dim: int = 128,
        key: PRNGKeyArray,
    ):
        c, h, w = image_shape
        k1, k2, k3, k4 = jr.split(key, 4)
        self.conv1 = Conv(c, width, 5, 2, key=k1)
        self.conv2 = Conv(width, 2 * width, 3, 2, key=k2)
        flat = 2 * width * _downsampled(h) * _downsampled(w)
        self.hidden = eqx.nn.Linear(flat, feature_dim, key=k3)
        self.head = eqx.nn.Linear(feature_dim, num_classes, key=k4)
        self.image_shape = image_shape

    def __check_init__(self) -> None:
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (c, h, w), got {self.image_shape}")

    def features(self, x: Float[Array, "c h w"]) -> Float[Array, " f"]:
        """Penultimate-layer (post-ReLU) features of one image in [-1, 1]: the metric's feature space."""
        y = jax.nn.relu(self.conv1(jnp.transpose(x, (1, 2, 0))))
        y = jax.nn.relu(self.conv2(y))
        return jax.nn.relu(self.hidden(y.reshape(-1)))

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, " k"]:
        """Class logits of one image in [-1, 1]."""
        return self.head(self.features(x))


@dataclasses.dataclass(frozen=True)
class ClassifierHyperparams:
    """Everything that determines the trained classifier (besides the data); stored in its JSON."""

    width: int = 32
    feature_dim: int = 128
    epochs: int = 4
    batch_size: int = 128
    learning_rate: float = 2e-3
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ClassifierInfo:
    """The JSON written beside the cached weights."""

    dataset: str
    image_shape: tuple[int, int, int]
    num_classes: int
    hyperparams: ClassifierHyperparams
    test_accuracy: float
    train_seconds: float
    cache_format: int = CACHE_FORMAT

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ClassifierInfo":
        raw = json.loads(text)
        raw["image_shape"] = tuple(raw["image_shape"])
        raw["hyperparams"] = ClassifierHyperparams(**raw["hyperparams"])
        return cls(**raw)


class LabelledSplits(NamedTuple):
    """What `get_data` returns: uint8 [N, H, W, C] images and integer labels for train and test."""

    train_images: UInt8[np.ndarray, "n h w c"]
    train_labels: Int[np.ndarray, " n"]
    test_images: UInt8[np.ndarray, "m h w c"]
    test_labels: Int[np.ndarray, " m"]


# ---------------------------------------------------------------------------------------------------------------
# Training


def to_model_layout(images: UInt8[np.ndarray, "n h w c"]) -> Float[np.ndarray, "n c h w"]:
    """uint8 channels-last -> float32 channels-first in [-1, 1], as the diffusion model sees images."""
    return np.transpose(images, (0, 3, 1, 2)).astype(np.float32) / 127.5 - 1.0


def _loss(model: Classifier, images: Float[Array, "b c h w"], labels: Int[Array, " b"]) -> Float[Array, ""]:
    logits = jax.vmap(model)(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@eqx.filter_jit
def _train_step(
    model: Classifier,
    opt_state: optax.OptState,
    optimizer: optax.GradientTransformation,
    images: Float[Array, "n c h w"],
    labels: Int[Array, " n"],
    batch_idx: Int[Array | np.ndarray, " b"],  # host indices in (a device array's rows are dispatched slices)
) -> tuple[Classifier, optax.OptState, Float[Array, ""]]:
    """One Adam step on images[batch_idx]. A plain jitted step, not lax.scan: on XLA:CPU the conv gradients inside
    a scan ran ~20x slower than the same step dispatched from Python (jax 0.10.2, 2 cores)."""
    loss, grads = eqx.filter_value_and_grad(_loss)(model, images[batch_idx], labels[batch_idx])
    updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss


def _make_optimizer(hp: ClassifierHyperparams, total_steps: int) -> optax.GradientTransformation:
    return optax.adam(optax.cosine_decay_schedule(hp.learning_rate, total_steps))


def train_classifier(
    train_images: UInt8[np.ndarray, "n h w c"],
    train_labels: Int[np.ndarray, " n"],
    test_images: UInt8[np.ndarray, "m h w c"],
    test_labels: Int[np.ndarray, " m"],
    *,
    num_classes: int,
    hyperparams: ClassifierHyperparams = ClassifierHyperparams(),
) -> tuple[Classifier, float]:
    """Train with Adam + cosine decay for `hyperparams.epochs` epochs; returns (classifier, test accuracy)."""
    hp = hyperparams
    images = jnp.asarray(to_model_layout(train_images))
    labels = jnp.asarray(train_labels, jnp.int32)
    init_key, shuffle_key = jr.split(jr.key(hp.seed))
    _, c, h, w = images.shape
    model = Classifier((c, h, w), num_classes, width=hp.width, feature_dim=hp.feature_dim, key=init_key)
    batch = min(hp.batch_size, images.shape[0])  # a split smaller than a batch is one batch an epoch
    steps_per_epoch = images.shape[0] // batch  # drop the ragged batch: one shape, one compilation
    optimizer = _make_optimizer(hp, hp.epochs * steps_per_epoch)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    for epoch in range(hp.epochs):
        # Host indices: iterating over a device array dispatches a slice per batch (~7 ms of a ~26 ms step here).
        order = np.asarray(jr.permutation(jr.fold_in(shuffle_key, epoch), images.shape[0]))
        for batch_idx in order[: steps_per_epoch * batch].reshape(steps_per_epoch, batch):
            model, opt_state, _ = _train_step(model, opt_state, optimizer, images, labels, batch_idx)
    return model, accuracy(model, to_model_layout(test_images), test_labels)


# ---------------------------------------------------------------------------------------------------------------
# Batched inference


@eqx.filter_jit
def _logits_batch(model: Classifier, images: Float[Array, "b c h w"]) -> Float[Array, "b k"]:
    return jax.vmap(model)(images)


@eqx.filter_jit
def _features_batch(model: Classifier, images: Float[Array, "b c h w"]) -> Float[Array, "b f"]:
    return jax.vmap(model.features)(images)


def _batched(
    fn: Callable[[Classifier, Array], Array], model: Classifier, images: np.ndarray, batch_size: int
) -> np.ndarray:
    """Apply `fn` over fixed-size batches (the last one zero-padded, so one compilation serves all)."""
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        chunk = np.asarray(images[start : start + batch_size], np.float32)
        padded = np.pad(chunk, ((0, batch_size - chunk.shape[0]), (0, 0), (0, 0), (0, 0)))
        outputs.append(np.asarray(fn(model, jnp.asarray(padded)))[: chunk.shape[0]])
    return np.concatenate(outputs)


def accuracy(
    classifier: Classifier,
    images: Float[np.ndarray, "n c h w"],
    labels: Int[np.ndarray, " n"],
    *,
    batch_size: int = 1000,
) -> float:
    """Top-1 accuracy on images in [-1, 1]."""
    predictions = _batched(_logits_batch, classifier, images, batch_size).argmax(axis=1)
    return float(np.mean(predictions == np.asarray(labels)))


def classifier_features(
    classifier: Classifier, images: Float[np.ndarray, "n c h w"], *, batch_size: int = 1000
) -> Float[np.ndarray, "n f"]:
    """Penultimate-layer features of images in [-1, 1], float32 [N, feature_dim]."""
    if tuple(images.shape[1:]) != classifier.image_shape:
        raise ValueError(f"images {images.shape[1:]} do not match the classifier's {classifier.image_shape}")
    return _batched(_features_batch, classifier, images, batch_size)


# ---------------------------------------------------------------------------------------------------------------
# Cache


def _classifier_dir(cache_dir: str | os.PathLike[str], dataset_name: str) -> Path:
    return Path(cache_dir) / f"classifier_{dataset_name}"


def save_classifier(directory: str | os.PathLike[str], classifier: Classifier, info: ClassifierInfo) -> None:
    """Weights via eqx.tree_serialise_leaves plus `classifier.json`; the JSON is written last and marks completion.

    A classifier cached before is unmarked first, so that a save killed half-way (or two evaluations saving at
    once) never leaves its JSON beside other weights; each file is written whole (a temporary file renamed)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "classifier.json").unlink(missing_ok=True)
    tmp = out / f".classifier.eqx.{os.getpid()}.tmp"
    eqx.tree_serialise_leaves(tmp, classifier)
    os.replace(tmp, out / "classifier.eqx")
    write_text_atomic(out / "classifier.json", info.to_json())


def load_classifier(directory: str | os.PathLike[str]) -> tuple[Classifier, ClassifierInfo]:
    """Rebuild the skeleton from the JSON (no weights initialised) and read the leaves into it."""
    info = ClassifierInfo.from_json((Path(directory) / "classifier.json").read_text())
    hp = info.hyperparams
    skeleton = eqx.filter_eval_shape(
        Classifier, info.image_shape, info.num_classes, width=hp.width, feature_dim=hp.feature_dim, key=jr.key(0)
    )
    return eqx.tree_deserialise_leaves(Path(directory) / "classifier.eqx", skeleton), info


def load_or_train_classifier(
    cache_dir: str | os.PathLike[str],
    dataset_name: str,
    get_data: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    *,
    hyperparams: ClassifierHyperparams = ClassifierHyperparams(),
) -> tuple[Classifier, ClassifierInfo]:
    """The cached classifier for `dataset_name`, trained (and cached) first if absent or built differently.

    `get_data()` returns (train_images, train_labels, test_images, test_labels), images uint8 [N, H, W, C]; it is
    only called when training.
    """
    directory = _classifier_dir(cache_dir, dataset_name)
    if (directory / "classifier.json").is_file():
        try:
            classifier, info = load_classifier(directory)
        except (OSError, ValueError, KeyError, TypeError, EOFError, RuntimeError) as e:  # damaged: trained again
            log.warning("the cached classifier in %s is unreadable (%s: %s); training it again", directory,
                        type(e).__name__, first_line(e, 160))
        else:
            if info.hyperparams == hyperparams and info.cache_format == CACHE_FORMAT:
                return classifier, info
    data = LabelledSplits(*get_data())
    num_classes = int(max(data.train_labels.max(), data.test_labels.max())) + 1
    start = time.perf_counter()
    classifier, test_accuracy = train_classifier(*data, num_classes=num_classes, hyperparams=hyperparams)
    info = ClassifierInfo(
        dataset=dataset_name,
        image_shape=classifier.image_shape,
        num_classes=num_classes,
        hyperparams=hyperparams,
        test_accuracy=test_accuracy,
        train_seconds=round(time.perf_counter() - start, 2),
    )
    save_classifier(directory, classifier, info)
    return classifier, info


# ---------------------------------------------------------------------------------------------------------------
# Metrics


class FeatureReference(NamedTuple):
    """Reference-set statistics in the classifier's feature space: Fréchet moments and raw features for KID."""

    mu: Float[np.ndarray, " f"]
    sigma: Float[np.ndarray, "f f"]
    features: Float[np.ndarray, "n f"]


def _fingerprint(classifier: Classifier, images: Shaped[np.ndarray, "..."]) -> str:
    """Hash of the classifier's weights and the reference images: a cached reference is valid only for both."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(eqx.filter(classifier, eqx.is_array)):
        digest.update(np.asarray(leaf).tobytes())
    digest.update(str(images.shape).encode())
    digest.update(np.ascontiguousarray(images, np.float32).tobytes())
    return digest.hexdigest()


def reference_statistics(
    classifier: Classifier,
    images: Float[np.ndarray, "n c h w"],
    *,
    cache_path: str | os.PathLike[str] | None = None,
    batch_size: int = 1000,
) -> FeatureReference:
    """Features, mean and covariance of reference images (e.g. the train split), cached as .npz if asked."""
    fingerprint = _fingerprint(classifier, images)
    path = Path(cache_path) if cache_path is not None else None
    if path is not None and path.is_file():
        try:
            with np.load(path) as cached:
                if str(cached["fingerprint"]) == fingerprint:
                    return FeatureReference(cached["mu"], cached["sigma"], cached["features"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # damaged: computed again
            pass
    features = classifier_features(classifier, images, batch_size=batch_size)
    reference = FeatureReference(*feature_statistics(features), features)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")  # per process: two evaluations may write at once
        np.savez(tmp, fingerprint=fingerprint, **reference._asdict())
        tmp.replace(path)
    return reference


def _fd(features: Float[np.ndarray, "n f"], reference: FeatureReference) -> float:
    mu, sigma = feature_statistics(features)
    return frechet_distance(mu, sigma, reference.mu, reference.sigma)


def _kid(
    features: Float[np.ndarray, "n f"], reference: FeatureReference, *, seed: int, num_subsets: int, subset_size: int
) -> tuple[float, float]:
    return kernel_inception_distance(
        features, reference.features, num_subsets=num_subsets, subset_size=subset_size, seed=seed
    )


def fd_classifier(
    classifier: Classifier,
    images: Float[np.ndarray, "n c h w"],
    reference: FeatureReference,
    *,
    batch_size: int = 1000,
) -> float:
    """Fréchet distance (Heusel et al. 2017's formula) between `images` and the reference, in classifier space."""
    return _fd(classifier_features(classifier, images, batch_size=batch_size), reference)


def kid_classifier(
    classifier: Classifier,
    images: Float[np.ndarray, "n c h w"],
    reference: FeatureReference,
    *,
    seed: int,
    num_subsets: int = 100,
    subset_size: int = 1000,
    batch_size: int = 1000,
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018) mean and std between `images` and the reference, in classifier space."""
    features = classifier_features(classifier, images, batch_size=batch_size)
    return _kid(features, reference, seed=seed, num_subsets=num_subsets, subset_size=subset_size)


def classifier_metrics(
    classifier: Classifier,
    images: Float[np.ndarray, "n c h w"],
    reference: FeatureReference,
    *,
    seed: int,
    num_subsets: int = 100,
    subset_size: int = 1000,
) -> dict[str, float]:
    """fd_classifier and kid_classifier (mean, std) from one pass of feature extraction, for logging."""
    features = classifier_features(classifier, images)
    kid_mean, kid_std = _kid(features, reference, seed=seed, num_subsets=num_subsets, subset_size=subset_size)
    return {"fd_classifier": _fd(features, reference), "kid_classifier": kid_mean, "kid_classifier_std": kid_std}
