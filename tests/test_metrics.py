"""Fréchet distance and KID against independent computations (scipy sqrtm, closed forms, a direct loop)."""

import numpy as np
import pytest
import scipy.linalg

from ddpm_eqx.metrics import (
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    mmd2_unbiased,
)


def _random_psd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(d, rank or 2 * d))
    return a @ a.T / a.shape[1]


def _scipy_fd(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The textbook formula with a general matrix square root (pytorch-fid's route)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d", [1, 5, 64])
def test_fd_matches_scipy_sqrtm(d: int) -> None:
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_psd(rng, d), _random_psd(rng, d)
    expected = _scipy_fd(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8, abs=1e-9)


def test_fd_rank_deficient_covariances_match_scipy() -> None:
    # Fewer samples than dims: singular covariances, where naive sqrtm can go complex.
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    s1, s2 = _random_psd(rng, 32, rank=8), _random_psd(rng, 32, rank=8)
    expected = _scipy_fd(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_fd_diagonal_closed_form() -> None:
    rng = np.random.default_rng(2)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_fd_of_identical_statistics_is_zero() -> None:
    rng = np.random.default_rng(3)
    mu, sigma = feature_statistics(rng.normal(size=(500, 48)).astype(np.float32))
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_fd_is_symmetric_and_translation_only_moves_the_mean_term() -> None:
    rng = np.random.default_rng(4)
    s1, s2 = _random_psd(rng, 10), _random_psd(rng, 10)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)
    shift = 3.0 * np.ones(10)
    assert frechet_distance(mu1 + shift, s1, mu1, s1) == pytest.approx(shift @ shift, rel=1e-10)


def test_feature_statistics_match_numpy() -> None:
    x = np.random.default_rng(5).normal(size=(200, 7))
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, np.cov(x.T, ddof=1))
    assert mu.dtype == sigma.dtype == np.float64


def _mmd2_loop(x: np.ndarray, y: np.ndarray) -> float:
    """Direct O(m^2) double loop over pairs: the definition, written out."""
    m, d = x.shape

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return float((a @ b / d + 1.0) ** 3)

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_mmd2_matches_direct_loop() -> None:
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.5, 1.0, size=(12, 5))
    assert mmd2_unbiased(x, y) == pytest.approx(_mmd2_loop(x, y), rel=1e-10)


def test_kid_single_full_subset_equals_mmd_of_the_sets() -> None:
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(15, 4)), rng.normal(size=(15, 4))
    mean, std = kernel_inception_distance(x, y, num_subsets=1, subset_size=15, seed=0)
    assert mean == pytest.approx(_mmd2_loop(x, y), rel=1e-10)
    assert std == 0.0


def test_kid_same_distribution_is_near_zero() -> None:
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(2000, 32)), rng.normal(size=(2000, 32))
    mean, std = kernel_inception_distance(x, y, num_subsets=20, subset_size=500, seed=0)
    assert abs(mean) < 3 * std + 1e-3


def test_kid_detects_shift_and_grows_with_it() -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=(1000, 32))
    kids = [
        kernel_inception_distance(x, rng.normal(shift, 1.0, size=(1000, 32)), num_subsets=10, subset_size=300, seed=0)
        for shift in (0.25, 0.5, 1.0)
    ]
    assert all(mean > 5 * std for mean, std in kids)
    assert kids[0][0] < kids[1][0] < kids[2][0]


def test_kid_is_reproducible_with_seed() -> None:
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    a = kernel_inception_distance(x, y, num_subsets=5, subset_size=100, seed=3)
    assert a == kernel_inception_distance(x, y, num_subsets=5, subset_size=100, seed=3)


# --- the evaluation's data: labels, splits, caches ------------------------------------------------------------


def _npz_config(path, tmp_path, **data):  # noqa: ANN001, ANN202
    from ddpm_eqx.config import Config, DataConfig

    return Config(data=DataConfig(dataset=str(path), data_dir=str(tmp_path / "tfds"), image_size=8, channels=1, **data))


def test_the_classifier_metric_of_an_unlabelled_dataset_is_unavailable_not_an_untrained_net(tmp_path) -> None:
    """One class gives a zero cross-entropy gradient: its 'features' would be the random initialisation's."""
    from ddpm_eqx.data_import import DataError
    from ddpm_eqx.evaluate import check_labelled, evaluate_images

    np.savez(tmp_path / "faces.npz", image=np.random.default_rng(0).integers(0, 255, (40, 8, 8), np.uint8))
    cfg = _npz_config(tmp_path / "faces.npz", tmp_path)
    with pytest.raises(DataError, match="has no class labels.*--metric inception"):
        check_labelled(cfg)
    results = evaluate_images(cfg, np.zeros((4, 1, 8, 8), np.float32), metric="all", fid_weights=str(tmp_path / "no"))
    assert "has no class labels" in results["classifier_unavailable"] and "fd_classifier" not in results
    import dataclasses

    from ddpm_eqx.config import ModelConfig, TrainingConfig
    from ddpm_eqx.train import validate_setup

    evaluating = dataclasses.replace(cfg, training=TrainingConfig(eval_every=100),
                                     model=ModelConfig(dim=8, dim_mults=(1, 2), resnet_block_groups=4))
    with pytest.raises(DataError, match="has no class labels"):  # before training, not at its first evaluation
        validate_setup(evaluating)


def test_a_dataset_without_a_test_split_tests_its_classifier_on_a_held_out_tenth(tmp_path, monkeypatch) -> None:
    import ddpm_eqx.evaluate as ev

    rng = np.random.default_rng(0)
    labels = np.arange(400) % 2
    images = np.where(labels[:, None, None] == 1, 220, 30).astype(np.uint8) + rng.integers(0, 20, (400, 8, 8), np.uint8)
    np.savez(tmp_path / "two.npz", image=images, label=labels)  # a single .npz: one split, "train"
    splits = []
    train = ev.load_or_train_classifier

    def spy(directory, name, get_data):  # noqa: ANN001, ANN202
        splits.append(get_data())
        return train(directory, name, lambda: splits[0])

    monkeypatch.setattr(ev, "load_or_train_classifier", spy)
    cfg = _npz_config(tmp_path / "two.npz", tmp_path)
    metric = ev.ClassifierMetric(cfg)
    train_images, _, test_images, _ = splits[0]
    assert (len(train_images), len(test_images)) == (360, 40)
    seen = {image.tobytes() for image in train_images}
    assert not any(image.tobytes() in seen for image in test_images)  # held out: none of them trained on
    assert metric.info.num_classes == 2 and metric.info.test_accuracy > 0.9  # an easy task
    assert metric.reference.features.shape[0] == 400  # the whole split: fewer than REFERENCE_EXAMPLES
    # `eval --reference 100`: the statistics of a fixed 100 of them (the classifier read back from its cache)
    fewer = ev.ClassifierMetric(cfg, reference=100)
    assert fewer.info == metric.info and fewer.reference.features.shape[0] == 100


def test_evaluation_caches_are_keyed_by_the_dataset_not_its_name(tmp_path) -> None:
    from ddpm_eqx.evaluate import cache_dir

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        np.savez(tmp_path / folder / "faces.npz", image=np.full((10, 8, 8), ord(folder), np.uint8))
    first, second = (cache_dir(_npz_config(tmp_path / f / "faces.npz", tmp_path)) for f in ("a", "b"))
    assert first != second and first.name.startswith("faces.npz_8px_1c_")
    assert cache_dir(_npz_config(tmp_path / "a" / "faces.npz", tmp_path)) == first  # stable


def test_generated_images_are_scored_at_8_bits_like_the_reference_images(tmp_path, monkeypatch) -> None:
    import ddpm_eqx.evaluate as ev
    from ddpm_eqx.config import Config

    scored = []
    monkeypatch.setattr(ev, "inception_metrics", lambda cfg, images, weights, **_: scored.append(images) or {})
    images = np.random.default_rng(0).uniform(-1.2, 1.2, (3, 1, 4, 4)).astype(np.float32)
    ev.evaluate_images(Config(), images, metric="inception")
    levels = (scored[0] + 1.0) * 127.5
    np.testing.assert_allclose(levels, np.rint(levels), atol=1e-4)  # on the 256 levels of a PNG
    np.testing.assert_allclose(scored[0], np.clip(images, -1, 1), atol=1 / 127.5)


def test_the_inception_reference_cache_is_keyed_by_the_weights_and_a_torn_one_is_redone(tmp_path, monkeypatch) -> None:
    """The cached reference statistics of one weights file were reused with another (FID 821 for identical
    images), and a cache torn by a kill failed every later eval with BadZipFile. The network is stubbed by a
    projection that depends on the weights file (the real one takes minutes here)."""
    from pathlib import Path

    import ddpm_eqx.evaluate as ev
    import ddpm_eqx.inception as inc

    np.savez(tmp_path / "faces.npz", image=np.random.default_rng(0).integers(0, 256, (40, 8, 8), np.uint8))
    cfg = _npz_config(tmp_path / "faces.npz", tmp_path)
    weights = {name: tmp_path / f"{name}.npz" for name in ("a", "b")}
    for name, path in weights.items():
        path.write_bytes(name.encode())
    monkeypatch.setattr(inc, "load_inception", lambda path: Path(path).read_bytes())

    def features(model: bytes, images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1) @ np.random.default_rng(model[0]).normal(size=(images[0].size, 6))

    monkeypatch.setattr(inc, "inception_features", features)
    reference = ev.reference_images(cfg)
    for name in ("a", "b", "a"):  # the reference scored against itself, whichever weights: 0
        assert ev.inception_metrics(cfg, reference, str(weights[name]))["fid"] == pytest.approx(0, abs=1e-6), name
    cache = ev.cache_dir(cfg) / "inception_reference.npz"
    cache.write_bytes(cache.read_bytes()[:100])  # torn by a kill mid-write
    assert ev.inception_metrics(cfg, reference, str(weights["b"]))["fid"] == pytest.approx(0, abs=1e-6)
    # `eval --reference`: the statistics of another number of training images are another cache entry.
    for count, images in ((20, ev.reference_images(cfg, reference=20)), (None, reference)):
        scores = ev.inception_metrics(cfg, images, str(weights["b"]), reference=count)
        assert scores["reference_images"] == len(images) and scores["fid"] == pytest.approx(0, abs=1e-6), count


def test_non_finite_samples_are_not_scored_as_black_images() -> None:
    """to_uint8 makes NaN 0: a diverged model's samples scored as plausible black images (and the training
    evaluation crashed in eigh)."""
    from ddpm_eqx.config import Config
    from ddpm_eqx.evaluate import NonFiniteSamples, as_scored, evaluate_images

    images = np.zeros((5, 1, 4, 4), np.float32)
    images[1, 0, 2, 2], images[3] = np.nan, np.inf
    with pytest.raises(NonFiniteSamples, match="2 of 5 samples are not finite") as raised:
        evaluate_images(Config(), images, metric="inception")
    assert raised.value.count == 2 and isinstance(raised.value, ValueError)  # the CLI's one-line errors
    finite = np.where(np.isfinite(images), -1.0, 1.0).astype(np.float32)  # two of the 256 levels: kept as they are
    np.testing.assert_array_equal(as_scored(finite), finite)


def test_the_training_evaluation_scores_at_8_bits_and_skips_non_finite_samples(monkeypatch) -> None:
    """training.eval_every scored floats where `ddpm-eqx eval` scores 8-bit images (their figures differed)."""
    import jax.numpy as jnp

    from ddpm_eqx import train
    from ddpm_eqx.config import Config
    from ddpm_eqx.generate import ShardedSampler
    from ddpm_eqx.state import TrainState

    drawn = np.random.default_rng(0).uniform(-1, 1, (4, 1, 4, 4)).astype(np.float32)

    class Draw(ShardedSampler):
        def __init__(self) -> None:
            pass

        def __call__(self, model, keys, labels=None, **kwargs):  # noqa: ANN001, ANN003, ANN204
            return drawn.copy()

    scored = []
    evaluator = object.__new__(train._Evaluator)
    evaluator.cfg = Config()
    evaluator.metric = lambda images: scored.append(images) or {"fd_classifier": 1.0}
    state = TrainState(step=jnp.int32(0), model={}, ema_model={}, opt_state=())
    assert evaluator(Draw(), state) == {"fd_classifier": 1.0}
    levels = (scored[0] + 1) * 127.5
    np.testing.assert_allclose(levels, np.rint(levels), atol=1e-4)
    drawn[2] = np.nan
    assert evaluator(Draw(), state) == {"nonfinite_samples": 1.0}


def test_unreadable_fid_weights_are_refused_before_sampling_and_reported_by_metric_all(tmp_path, monkeypatch) -> None:
    """A torn or foreign weights file passed the early check (it exists) and failed after the sampling: with a
    traceback (BadZipFile) that lost the classifier scores already computed, or a message naming no file."""
    import zipfile

    from ddpm_eqx.evaluate import UnreadableWeights, check_metrics_available, evaluate_images

    np.savez(tmp_path / "faces.npz", image=np.random.default_rng(0).integers(0, 255, (40, 8, 8), np.uint8))
    cfg = _npz_config(tmp_path / "faces.npz", tmp_path)
    np.savez(tmp_path / "weights.npz", conv=np.zeros(3))
    torn = tmp_path / "torn.npz"
    torn.write_bytes((tmp_path / "weights.npz").read_bytes()[:60])
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, **{"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3), np.float32)})
    with pytest.raises(zipfile.BadZipFile):
        np.load(torn)["conv"]
    for bad, reason in ((torn, "BadZipFile|EOFError|ValueError"), (foreign, "not an FID Inception state dict")):
        with pytest.raises(UnreadableWeights, match=rf"the FID weights {bad} cannot be read .*({reason}).*--fid-weights"):
            check_metrics_available(cfg, "inception", str(bad))
        with pytest.raises(UnreadableWeights):  # a named file is checked for "all" too
            check_metrics_available(cfg, "all", str(bad))
        results = evaluate_images(cfg, np.zeros((4, 1, 8, 8), np.float32), metric="all", fid_weights=str(bad))
        assert str(bad) in results["fid_unavailable"] and "\n" not in results["fid_unavailable"]
    monkeypatch.setenv("DDPM_EQX_FID_WEIGHTS", str(torn))  # named by the environment: the same
    with pytest.raises(UnreadableWeights, match=str(torn)):
        check_metrics_available(cfg, "all", None)
    monkeypatch.delenv("DDPM_EQX_FID_WEIGHTS")
    check_metrics_available(cfg, "all", None)  # none named: "all" reports fid_unavailable after sampling


def test_too_few_samples_for_a_frechet_distance_are_named(tmp_path) -> None:
    """Only the distances that will be scored: --metric all without FID weights, or on unlabelled data, warned
    of distances it does not compute."""
    from ddpm_eqx.evaluate import check_metrics_available, small_sample_warning

    both = small_sample_warning(64, ["fd_classifier", "fid"])
    assert both is not None and "fd_classifier (128 features) and fid (2048 features)" in both
    assert small_sample_warning(255, ["fd_classifier"]) is not None and small_sample_warning(256, ["fd_classifier"]) is None
    assert "fid (2048 features)" in (small_sample_warning(300, ["fd_classifier", "fid"]) or "") and "fd_classifier" not in (
        small_sample_warning(300, ["fd_classifier", "fid"]) or "")
    assert small_sample_warning(300, ["fid"]) is not None and small_sample_warning(4096, ["fd_classifier", "fid"]) is None
    assert small_sample_warning(64, []) is None
    labels = np.arange(40) % 2
    np.savez(tmp_path / "two.npz", image=np.zeros((40, 8, 8), np.uint8), label=labels)
    np.savez(tmp_path / "faces.npz", image=np.zeros((40, 8, 8), np.uint8))
    assert check_metrics_available(_npz_config(tmp_path / "two.npz", tmp_path), "all", None) == ["fd_classifier"]
    assert check_metrics_available(_npz_config(tmp_path / "faces.npz", tmp_path), "all", None) == []
