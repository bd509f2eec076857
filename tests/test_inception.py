"""FID Inception-v3 port: architecture vs pytorch-fid naming, reference values, weight files, error messages."""

import os
import urllib.error
import urllib.request
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from ddpm_eqx import inception as inc

# pool3 features that pytorch-fid's own InceptionV3 (torch 2.14, torchvision 0.29, pytorch-fid 0.3) computed for
# `_test_images()` with the weights `_random_state_dict(seed=0)`: columns 0, 256, ..., 1792, and each row's sum.
REF_COLUMNS = np.arange(0, 2048, 256)
REF_FEATURES_32 = np.array(
    [
        [0.737859786, 0.565090716, 4.540180683, 2.794171333, 9.252985954, 1.845362186, 0.024184067, 2.375841856],
        [0.636701584, 0.519787908, 4.628196239, 2.87473321, 9.54020977, 1.831273794, 0.037568204, 2.435852528],
    ]
)
REF_SUMS_32 = np.array([4505.00018867, 4618.189967501])


def _random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic pytorch-fid-named weights: He-normal convs, BN statistics away from identity."""
    rng = np.random.default_rng(seed)
    shapes = inc.state_dict_shapes()
    sd = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("conv.weight"):
            sd[name] = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif name.endswith(("bn.weight", "bn.running_var")):
            sd[name] = rng.uniform(0.5, 1.5, shape)
        else:
            sd[name] = 0.1 * rng.standard_normal(shape)
    return {k: v.astype(np.float32) for k, v in sd.items()}


def _test_images(seed: int = 1, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """Two smooth-plus-noise RGB images in [0, 1], [2, 3, h, w]."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    base = np.stack([xx, yy, 0.5 * (xx + yy)])[None]
    return np.clip(0.7 * base + 0.3 * rng.uniform(0, 1, (2, 3, h, w)), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    return _random_state_dict(0)


@pytest.fixture(scope="module")
def model(state_dict: dict[str, np.ndarray]) -> inc.FIDInceptionV3:
    return inc.inception_from_state_dict(state_dict)


@pytest.fixture(scope="module")
def features(model: inc.FIDInceptionV3) -> np.ndarray:
    return inc.inception_features(model, 2.0 * _test_images() - 1.0, batch_size=2)


def _expected_conv_names() -> list[str]:
    """torchvision's BasicConv2d names, written out independently of the module."""
    a = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
    b = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
    c = ["branch1x1"] + [f"branch7x7_{i}" for i in (1, 2, 3)] + [f"branch7x7dbl_{i}" for i in range(1, 6)]
    d = ["branch3x3_1", "branch3x3_2"] + [f"branch7x7x3_{i}" for i in range(1, 5)]
    e = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b"]
    e += ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b"]
    blocks = {"5b": a, "5c": a, "5d": a, "6a": b, "6b": c, "6c": c, "6d": c, "6e": c, "7a": d, "7b": e, "7c": e}
    names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    for block, branches in blocks.items():
        pool = [] if block in ("6a", "7a") else ["branch_pool"]
        names += [f"Mixed_{block}.{branch}" for branch in branches + pool]
    return names


def test_conv_names_and_state_dict_keys_follow_pytorch_fid() -> None:
    names = [name for name, _ in inc.named_convs(eqx.filter_eval_shape(inc.FIDInceptionV3, key=jr.key(0)))]
    assert sorted(names) == sorted(_expected_conv_names())
    assert len(names) == 94
    keys = inc.state_dict_shapes()
    # pt_inception-2015-12-05 holds 94 x 5 BN/conv tensors + fc.weight/fc.bias = 472 (566 with BN counters).
    assert len(keys) == 94 * 5 == 472 - 2
    assert set(keys) == {f"{n}.{s}" for n in names for s in inc.BN_SUFFIXES}


def test_state_dict_shapes_spot_checks() -> None:
    shapes = inc.state_dict_shapes()
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert shapes["Mixed_6e.branch7x7dbl_2.conv.weight"] == (192, 192, 7, 1)
    assert shapes["Mixed_7b.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert shapes["Mixed_7c.branch_pool.bn.running_var"] == (192,)
    n_params = sum(int(np.prod(s)) for k, s in shapes.items() if k.endswith("conv.weight"))
    assert n_params == 21_751_136  # counted from torchvision's Inception3(aux_logits=False)


@pytest.mark.parametrize("size", [(32, 32), (299, 299), (64, 48)])
def test_output_shape_any_input_size(size: tuple[int, int]) -> None:
    net = eqx.filter_eval_shape(inc.FIDInceptionV3, key=jr.key(0))
    out = eqx.filter_eval_shape(net, jax.ShapeDtypeStruct((3, *size), jnp.float32))
    assert out.shape == (inc.FEATURE_DIM,)


def test_grayscale_and_ragged_batches(model: inc.FIDInceptionV3) -> None:
    # Random __init__ is only traced (eval_shape above): eagerly it compiles one RNG kernel per shape (~60 s).
    gray = 2.0 * _test_images(seed=3)[:, :1] - 1.0
    gray3 = np.concatenate([gray, gray[:1]])  # 3 images at batch size 2: the last batch is padded
    feats = inc.inception_features(model, gray3, batch_size=2)
    rgb = inc.inception_features(model, np.repeat(gray, 3, axis=1), batch_size=2)
    assert feats.shape == (3, 2048) and np.isfinite(feats).all() and (feats >= 0).all()
    np.testing.assert_array_equal(feats[:2], rgb)
    np.testing.assert_array_equal(feats[0], feats[2])


def test_matches_pytorch_fid_reference_values(features: np.ndarray) -> None:
    np.testing.assert_allclose(features[:, REF_COLUMNS], REF_FEATURES_32, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(features.sum(axis=1), REF_SUMS_32, rtol=2e-5)


def test_pooling_ignores_padding() -> None:
    x = jnp.arange(16.0).reshape(1, 4, 4)
    avg = inc.avg_pool_same(x)
    assert avg[0, 0, 0] == pytest.approx((0 + 1 + 4 + 5) / 4)  # corner: 4 real pixels, not 9
    assert avg[0, 1, 1] == pytest.approx(np.mean([0, 1, 2, 4, 5, 6, 8, 9, 10]))
    neg = -x - 1.0
    assert inc.max_pool(neg, stride=1, padding=1)[0, 0, 0] == -1.0  # padding is -inf, never 0


def test_npz_round_trip_and_env_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state_dict: dict[str, np.ndarray], model: inc.FIDInceptionV3
) -> None:
    extras = {"fc.weight": np.zeros((1008, 2048), np.float32), "fc.bias": np.zeros(1008, np.float32)}
    path = tmp_path / "weights.npz"
    np.savez(path, **state_dict, **extras)
    monkeypatch.setenv(inc.WEIGHTS_ENV_VAR, str(path))
    loaded = inc.load_inception()
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(model), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    images = 2.0 * _test_images(seed=5) - 1.0
    np.testing.assert_array_equal(
        inc.inception_features(loaded, images, batch_size=2), inc.inception_features(model, images, batch_size=2)
    )


def test_bad_state_dicts_are_rejected(state_dict: dict[str, np.ndarray]) -> None:
    missing = dict(state_dict)
    del missing["Mixed_6c.branch7x7_2.bn.running_var"]
    with pytest.raises(ValueError, match="missing"):
        inc.inception_from_state_dict(missing)
    wrong = dict(state_dict, **{"Mixed_5b.branch1x1.conv.weight": np.zeros((64, 192, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="wrong shapes"):
        inc.inception_from_state_dict(wrong)


def _assert_one_helpful_line(message: str) -> None:
    assert "\n" not in message
    for needle in (inc.FID_WEIGHTS_URL, inc.WEIGHTS_ENV_VAR, inc.WEIGHTS_FLAG):
        assert needle in message


def test_missing_file_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(inc.WEIGHTS_ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError) as no_path:
        inc.load_inception()
    _assert_one_helpful_line(str(no_path.value))
    missing = tmp_path / inc.WEIGHTS_FILENAME
    with pytest.raises(FileNotFoundError) as bad_path:
        inc.load_inception(missing)
    _assert_one_helpful_line(str(bad_path.value))
    assert str(missing) in str(bad_path.value)


def test_download_fails_fast_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError) as err:
        inc.download_inception_weights(tmp_path)
    _assert_one_helpful_line(str(err.value))
    assert not list(tmp_path.iterdir())


def test_pth_is_converted_once_and_cached(tmp_path: Path, state_dict: dict[str, np.ndarray]) -> None:
    torch = pytest.importorskip("torch")
    pth = tmp_path / inc.WEIGHTS_FILENAME
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, pth)
    inc.load_inception(pth)
    cached = pth.with_suffix(".npz")
    assert cached.is_file()
    with np.load(cached) as data:
        name = "Mixed_7c.branch_pool.conv.weight"
        np.testing.assert_array_equal(data[name], state_dict[name])


def _pytorch_fid_features(state_dict: dict[str, np.ndarray], images01: np.ndarray) -> np.ndarray:
    """pytorch-fid's InceptionV3(block 3) with `state_dict` swapped in for the download."""
    torch = pytest.importorskip("torch")
    pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}
    tensors.setdefault("fc.weight", torch.zeros(1008, 2048))
    tensors.setdefault("fc.bias", torch.zeros(1008))
    patched = pytest.MonkeyPatch()
    patched.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: tensors)
    try:
        net = pytorch_fid_inception.InceptionV3([3]).eval()
    finally:
        patched.undo()
    with torch.no_grad():
        return net(torch.from_numpy(images01))[0][:, :, 0, 0].numpy()


def test_matches_pytorch_fid_when_installed(state_dict: dict[str, np.ndarray], features: np.ndarray) -> None:
    expected = _pytorch_fid_features(state_dict, _test_images())
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(
    not os.path.isfile(os.environ.get(inc.WEIGHTS_ENV_VAR, "")), reason=f"{inc.WEIGHTS_ENV_VAR} names no file"
)
def test_real_weights() -> None:
    net = inc.load_inception()
    images = _test_images(size=(64, 64))
    feats = inc.inception_features(net, 2.0 * images - 1.0, batch_size=2)
    assert np.isfinite(feats).all() and (feats >= 0).all()
    assert 0.01 < feats.mean() < 5.0  # loose: pool3 is a post-ReLU mean, O(0.1-1) on real images
    try:
        import pytorch_fid  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        pytest.skip("pytorch-fid not installed: only sanity-checked the real-weight features")
    path = Path(os.environ[inc.WEIGHTS_ENV_VAR])
    npz = path if path.suffix == ".npz" else path.with_suffix(".npz")
    with np.load(npz) as data:
        sd = {k: data[k] for k in data.files}
    np.testing.assert_allclose(feats, _pytorch_fid_features(sd, images), rtol=1e-3, atol=1e-4)
