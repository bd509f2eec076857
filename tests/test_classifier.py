"""Offline classifier metric on real Fashion-MNIST: accuracy, caching, and fd/kid_classifier behaviour."""

import os
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _archives import FASHION_MNIST_FILES, SHARED_DATA, read_idx
from _cli import _env

from ddpm_eqx import classifier as clf

DATA_DIR = SHARED_DATA / "fashion_mnist"
NOISE_LEVELS = (0.1, 0.3, 0.6, 1.0)


def _fashion_mnist() -> clf.LabelledSplits:
    x_train, y_train, x_test, y_test = (read_idx(DATA_DIR / name) for name in FASHION_MNIST_FILES)
    return clf.LabelledSplits(x_train[..., None], y_train.astype(np.int64), x_test[..., None], y_test.astype(np.int64))


@pytest.fixture(scope="module")
def data() -> clf.LabelledSplits:
    if not all((DATA_DIR / name).is_file() for name in FASHION_MNIST_FILES):
        pytest.skip(f"Fashion-MNIST archives not found in {DATA_DIR} (see shared/data/README.md)")
    return _fashion_mnist()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("classifier_cache")


_TRAIN = """
import sys
from ddpm_eqx import classifier as clf
from test_classifier import _fashion_mnist

clf.load_or_train_classifier(sys.argv[1], "fashion_mnist", _fashion_mnist)
"""


@pytest.fixture(scope="module")
def trained(data: clf.LabelledSplits, cache_dir: Path) -> tuple[clf.Classifier, clf.ClassifierInfo]:
    """The product's default classifier, trained by ``load_or_train_classifier`` in a process of its own: at XLA's
    default optimisation level (this one's is conftest's -O0, which trains it ~3x slower), as ``ddpm-eqx eval``
    would; this process then reads it from the cache."""
    start = time.perf_counter()
    env = _env(cache_dir, optimised=True)
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(Path(__file__).parent)])  # for this module
    subprocess.run([sys.executable, "-c", _TRAIN, str(cache_dir)], env=env, check=True, timeout=900)

    def must_not_train() -> clf.LabelledSplits:
        raise AssertionError("the classifier trained in its own process was not found in the cache")

    result = clf.load_or_train_classifier(cache_dir, "fashion_mnist", must_not_train)
    print(f"\nclassifier: test accuracy {result[1].test_accuracy:.4f}, {time.perf_counter() - start:.1f} s")
    return result


@pytest.fixture(scope="module")
def reference(trained: tuple[clf.Classifier, clf.ClassifierInfo], data: clf.LabelledSplits) -> clf.FeatureReference:
    return clf.reference_statistics(trained[0], clf.to_model_layout(data.train_images[:20000]))


@pytest.fixture(scope="module")
def test_images(data: clf.LabelledSplits) -> np.ndarray:
    return clf.to_model_layout(data.test_images[:5000])


def _noised(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, images.shape).astype(np.float32)
    return np.clip(images + noise, -1.0, 1.0)


def test_shapes_for_any_image_size() -> None:
    net = eqx.filter_eval_shape(clf.Classifier, (3, 32, 32), 10, width=8, feature_dim=16, key=jr.key(0))
    x = jax.ShapeDtypeStruct((3, 32, 32), jnp.float32)
    assert eqx.filter_eval_shape(net, x).shape == (10,)
    assert eqx.filter_eval_shape(net.features, x).shape == (16,)
    odd = clf.Classifier((1, 27, 30), 4, width=4, feature_dim=8, key=jr.key(1))
    assert odd(jnp.zeros((1, 27, 30))).shape == (4,)


def test_accuracy_at_least_90_percent(
    trained: tuple[clf.Classifier, clf.ClassifierInfo], data: clf.LabelledSplits
) -> None:
    classifier, info = trained
    assert info.test_accuracy >= 0.90
    recomputed = clf.accuracy(classifier, clf.to_model_layout(data.test_images), data.test_labels)
    # Stored by the training process, recomputed here from the cached weights: XLA's code at another optimisation
    # level may round a borderline image's logits the other way (one image of the 10,000 is 1e-4).
    assert recomputed == pytest.approx(info.test_accuracy, abs=2.5e-4)
    assert info.dataset == "fashion_mnist" and info.image_shape == (1, 28, 28) and info.num_classes == 10


def test_cache_is_reused(trained: tuple[clf.Classifier, clf.ClassifierInfo], cache_dir: Path) -> None:
    def must_not_load() -> clf.LabelledSplits:
        raise AssertionError("cached classifier was retrained")

    loaded, info = clf.load_or_train_classifier(cache_dir, "fashion_mnist", must_not_load)
    assert info == trained[1]
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(trained[0]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (cache_dir / "classifier_fashion_mnist" / "classifier.json").is_file()


def test_reference_statistics_cache(
    trained: tuple[clf.Classifier, clf.ClassifierInfo], test_images: np.ndarray, tmp_path: Path
) -> None:
    path = tmp_path / "ref.npz"
    first = clf.reference_statistics(trained[0], test_images[:500], cache_path=path)
    stamp = path.stat().st_mtime_ns
    again = clf.reference_statistics(trained[0], test_images[:500], cache_path=path)
    assert path.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(first.sigma, again.sigma)
    other = clf.reference_statistics(trained[0], test_images[500:1000], cache_path=path)  # stale: recomputed
    assert not np.array_equal(other.mu, first.mu)
    path.write_bytes(path.read_bytes()[:300])  # damaged (a disk error; every write is a renamed whole file)
    redone = clf.reference_statistics(trained[0], test_images[500:1000], cache_path=path)
    np.testing.assert_array_equal(redone.sigma, other.sigma)
    assert clf.reference_statistics(trained[0], test_images[500:1000], cache_path=path).mu.tobytes() == other.mu.tobytes()


def test_fd_of_held_out_real_images_is_small_and_noise_is_far_worse(
    trained: tuple[clf.Classifier, clf.ClassifierInfo], reference: clf.FeatureReference, test_images: np.ndarray
) -> None:
    classifier = trained[0]
    real = clf.fd_classifier(classifier, test_images, reference)
    noisy = [clf.fd_classifier(classifier, _noised(test_images, s), reference) for s in NOISE_LEVELS]
    print(f"\nfd_classifier: test vs train {real:.4g}; noise {dict(zip(NOISE_LEVELS, np.round(noisy, 3)))}")
    assert all(a < b for a, b in zip([real, *noisy], noisy))  # grows with every noise step
    assert noisy[-1] > 100 * real  # measured: 0.78 vs 420
    assert real < 0.5 * noisy[0]  # even faint noise (sigma 0.1 of a [-1, 1] range) scores worse: 4.5


def test_kid_of_held_out_real_images_is_near_zero_and_noise_is_not(
    trained: tuple[clf.Classifier, clf.ClassifierInfo], reference: clf.FeatureReference, test_images: np.ndarray
) -> None:
    classifier = trained[0]
    real_mean, real_std = clf.kid_classifier(classifier, test_images, reference, seed=0, num_subsets=20)
    noisy_mean, noisy_std = clf.kid_classifier(classifier, _noised(test_images, 1.0), reference, seed=0, num_subsets=20)
    print(f"\nkid_classifier: real {real_mean:.3g} +- {real_std:.2g}; noise 1.0 {noisy_mean:.3g} +- {noisy_std:.2g}")
    assert abs(real_mean) < 3 * real_std + 1e-3 * noisy_mean
    assert noisy_mean > 20 * noisy_std


def test_classifier_metrics_agree_with_separate_calls(
    trained: tuple[clf.Classifier, clf.ClassifierInfo], reference: clf.FeatureReference, test_images: np.ndarray
) -> None:
    classifier, images = trained[0], _noised(test_images[:1000], 0.3)
    scores = clf.classifier_metrics(classifier, images, reference, seed=1, num_subsets=5)
    assert scores["fd_classifier"] == pytest.approx(clf.fd_classifier(classifier, images, reference), rel=1e-9)
    kid = clf.kid_classifier(classifier, images, reference, seed=1, num_subsets=5)
    assert (scores["kid_classifier"], scores["kid_classifier_std"]) == pytest.approx(kid, rel=1e-9)


def test_wrong_image_shape_is_rejected(trained: tuple[clf.Classifier, clf.ClassifierInfo]) -> None:
    with pytest.raises(ValueError, match="do not match"):
        clf.classifier_features(trained[0], np.zeros((2, 3, 28, 28), np.float32))


def test_a_split_smaller_than_a_batch_trains_on_it_whole() -> None:
    """A labelled dataset under 128 images (the classifier's batch) trained zero steps and crashed optax's
    schedule (decay_steps=0) at the first evaluation of a run: it is one batch an epoch."""
    hp = clf.ClassifierHyperparams(width=8, feature_dim=8, epochs=30, learning_rate=1e-2)
    _, accuracy = clf.train_classifier(*_two_classes(), num_classes=2, hyperparams=hp)
    assert accuracy == 1.0  # two classes a constant apart: learnt, so it did train


def _two_classes() -> clf.LabelledSplits:
    """40 8x8 images of two classes a constant apart (plus noise); the test split is the train split."""
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    images = np.where(labels[:, None, None, None] == 1, 200, 30).astype(np.uint8) * np.ones((40, 8, 8, 1), np.uint8)
    images = np.clip(images + rng.integers(0, 20, images.shape), 0, 255).astype(np.uint8)
    return clf.LabelledSplits(images, labels, images, labels)


def test_a_damaged_cached_classifier_is_trained_again_and_a_failed_save_leaves_no_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Torn weights beside a valid classifier.json failed every later evaluation of the dataset; and a save over a
    cached classifier (other hyperparameters) that died half-way left the old JSON beside the new, torn, weights."""
    hp = clf.ClassifierHyperparams(width=8, feature_dim=8, epochs=2, learning_rate=1e-2)
    trainings = []

    def data() -> clf.LabelledSplits:
        trainings.append(1)
        return _two_classes()

    first, info = clf.load_or_train_classifier(tmp_path, "two", data, hyperparams=hp)
    folder = tmp_path / "classifier_two"
    (folder / "classifier.eqx").write_bytes((folder / "classifier.eqx").read_bytes()[:50])
    again, info_again = clf.load_or_train_classifier(tmp_path, "two", data, hyperparams=hp)
    assert len(trainings) == 2 and info_again.test_accuracy == info.test_accuracy
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(first), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same training, read back whole

    def dies_half_way(path: Path, tree: object) -> None:  # a full disk, or a kill, mid-write
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(clf.eqx, "tree_serialise_leaves", dies_half_way)
        with pytest.raises(OSError):
            clf.save_classifier(folder, again, info_again)
    assert not (folder / "classifier.json").exists()  # nothing claims the folder holds a complete classifier
    clf.load_or_train_classifier(tmp_path, "two", data, hyperparams=hp)
    assert len(trainings) == 3
