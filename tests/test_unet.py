"""U-Net tests: parity parameter count, shapes, closed-form layer properties, options, runtime shape checks.

Models are tiny (dim 8) except the parity count, which uses an ``eqx.filter_eval_shape`` skeleton.
Initialisation uses ``rbg`` keys: on XLA:CPU they compile several times faster than threefry when drawn
per shape, as ``layers.uniform`` does for them (its Threefry path is tested against ``jax.random.uniform``).
``UNet.__call__`` is ``@jaxtyped(typechecker=beartype)``, so shape checks are on here without a conftest.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from ddpm_eqx.config import ModelConfig
from ddpm_eqx.layers import (
    Attention,
    ChannelLayerNorm,
    Conv2d,
    Downsample,
    LinearAttention,
    PreNormResidual,
    TimeEmbedding,
    WSConv2d,
    group_norm_hwc,
    kernels_as_oihw,
    kernels_from_oihw,
    linear,
    standardise_weight,
    to_chw,
    to_hwc,
    uniform,
    upsample_nearest,
)
from ddpm_eqx.step import to_bfloat16
from ddpm_eqx.unet import UNet, count_params, make_unet

PARITY_PARAMS = 10_042_753  # the seed's (and lucidrains' 2022 Unet's) count for the config below


def key(i: int) -> jax.Array:
    return jax.random.key(i, impl="rbg")


def small(**overrides) -> UNet:
    kwargs = dict(dim=8, channels=1, image_size=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8, key=key(0))
    return UNet(**(kwargs | overrides))


@eqx.filter_jit
def apply(model: UNet, x, t, **kwargs):
    return model(x, t, **kwargs)


def normal(shape, i: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(i), shape)


# --- parity and construction ----------------------------------------------------------------------


def test_parity_param_count():
    model = eqx.filter_eval_shape(
        lambda k: UNet(dim=64, channels=1, image_size=28, dim_mults=(1, 2, 4), resnet_block_groups=8, key=k),
        jax.random.key(0),
    )
    assert count_params(model) == PARITY_PARAMS


def test_count_params_skeleton_equals_real_model(plain):
    real = plain
    skeleton = eqx.filter_eval_shape(lambda k: small(key=k), key(0))
    expected = sum(x.size for x in jax.tree.leaves(eqx.filter(real, eqx.is_inexact_array)))
    assert count_params(real) == count_params(skeleton) == expected


@pytest.mark.parametrize(
    ("image_size", "dim_mults", "message"),
    [
        (30, (1, 2, 4), r"image_size 30 is not divisible by 4 \(2\*\*\(len\(dim_mults\)-1\)\); use 28 or 32"),
        ((16, 20), (1, 2, 4, 8), r"image_size 20 is not divisible by 8 .*use 16 or 24"),
        (2, (1, 2, 4), r"image_size 2 is not divisible by 4 .*use 4$"),
    ],
)
def test_bad_image_size_names_working_sizes(image_size, dim_mults, message):
    with pytest.raises(ValueError, match=message):
        UNet(dim=8, channels=1, image_size=image_size, dim_mults=dim_mults, key=key(0))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dim": 12}, r"resnet_block_groups=8 must divide every block's width \(dim = 12, init_dim = 12\): pick dim and "
                      "init_dim as multiples of 8"),
        ({"init_dim": 4}, r"\(init_dim = 4\)"),
        ({"dim": 8, "resnet_block_groups": 3}, r"resnet_block_groups=3 .*\(dim = 8, init_dim = 8, dim \* 2 = 16\)"),
        ({"channels": 0}, "channels must be positive, got 0"),
        ({"num_classes": 0}, r"num_classes must be positive \(or None: unconditional\), got 0"),
        ({"dim_mults": (1, 0)}, r"dim_mults must be positive multipliers, got \(1, 0\)"),
        # One frequency: the embedding divided 0 by 0 and every output was NaN.
        ({"dim": 2, "resnet_block_groups": 2}, r"dim must be at least 4 for the sinusoidal time embedding \(two "
                                               r"frequencies\), got 2"),
    ],
)
def test_widths_the_blocks_cannot_take_are_named(options, message):
    """GroupNorm's "The number of groups must divide the number of channels" named none of the options."""
    with pytest.raises(ValueError, match=message):
        UNet(**{"dim": 8, "channels": 1, "image_size": 8, "dim_mults": (1, 2), "key": key(0), **options})
    from ddpm_eqx.unet import _check_widths  # an unknown downsample (a Literal: the tests' hook refuses it first)

    with pytest.raises(ValueError, match="downsample must be 'conv' or 'pixel_unshuffle', got 'pixelunshuffle'"):
        _check_widths(dim=8, channels=1, init_dim=8, out_dim=None, dim_mults=(1, 2), groups=8, num_classes=None,
                      downsample="pixelunshuffle")


def test_make_unet_maps_the_config():
    cfg = ModelConfig(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8, downsample="pixel_unshuffle",
                      learned_sinusoidal_cond=True, num_classes=3, out_dim=2)
    model = eqx.filter_eval_shape(
        lambda k: make_unet(cfg, channels=3, image_size=16, self_condition=True, key=k), key(0)
    )
    assert (model.num_classes, model.self_condition, model.out_dim, model.image_size) == (3, True, 2, (16, 16))
    assert model.init_conv.in_channels == 6  # self-conditioning doubles the input
    assert model.downs[0].down.pixel_unshuffle and model.time_embedding.fourier is not None
    direct = eqx.filter_eval_shape(
        lambda k: UNet(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)},
                       channels=3, image_size=16, self_condition=True, key=k), key(0)
    )
    assert count_params(model) == count_params(direct)


# --- shapes and variants --------------------------------------------------------------------------
# Compiling is what costs here (~2-5 s a trace on XLA:CPU): shapes are checked by abstract evaluation,
# and the option tests share one model and three traces of ``apply``.


@pytest.fixture(scope="module")
def plain() -> UNet:
    return small(image_size=(8, 16))


@pytest.fixture(scope="module")
def featured() -> UNet:
    """Every option at once: self-conditioning, 3 classes, dropout, pixel-unshuffle, learned features."""
    return small(self_condition=True, num_classes=3, dropout=0.5, downsample="pixel_unshuffle",
                 learned_sinusoidal_cond=True)


def output_shape(options: dict, x_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Trace a model abstractly (no weights, no compile): shapes without the cost."""
    model = eqx.filter_eval_shape(lambda k: UNet(**options, key=k), key(0))
    out = jax.eval_shape(lambda m, x: m(x, jnp.array(10.0)), model, jax.ShapeDtypeStruct(x_shape, jnp.float32))
    return out.shape


@pytest.mark.parametrize(
    ("options", "x_shape"),
    [
        (dict(dim=64, channels=1, image_size=28, dim_mults=(1, 2, 4)), (1, 28, 28)),  # the parity model
        (dict(dim=8, channels=3, image_size=32, dim_mults=(1, 2, 4, 8)), (3, 32, 32)),
        (dict(dim=8, channels=1, image_size=(16, 24), dim_mults=(1, 2)), (1, 16, 24)),
        (dict(dim=8, channels=3, image_size=8, dim_mults=(1, 2), out_dim=6, init_dim=16), (3, 8, 8)),
        (dict(dim=8, channels=1, image_size=8, random_fourier_features=True, downsample="pixel_unshuffle"),
         (1, 8, 8)),
    ],
)
def test_output_shape(options, x_shape):
    out_channels = options.get("out_dim", options["channels"])
    assert output_shape(options, x_shape) == (out_channels, *x_shape[1:])


def test_non_square_vmap_matches_per_image_calls(plain):
    xs, ts = normal((3, 1, 8, 16)), jnp.array([0, 5, 999])
    batched = eqx.filter_jit(lambda m, xs, ts: jax.vmap(m)(xs, ts))(plain, xs, ts)
    singles = jnp.stack([apply(plain, x, t) for x, t in zip(xs, ts)])
    assert batched.shape == (3, 1, 8, 16) and jnp.all(jnp.isfinite(batched))
    np.testing.assert_allclose(batched, singles, rtol=1e-5, atol=1e-5)


def run(model: UNet, *, cond=None, label=None, key=None, inference=True) -> jax.Array:
    return apply(model, normal((1, 8, 8)), jnp.array(7), x_self_cond=cond, label=label, key=key,
                 inference=inference)


def test_featured_defaults_are_zeros_and_null_class(featured):
    defaults = run(featured)
    assert defaults.shape == (1, 8, 8)
    explicit = run(featured, cond=jnp.zeros((1, 8, 8)), label=jnp.array(3), key=key(5))
    np.testing.assert_allclose(defaults, explicit, rtol=1e-6, atol=1e-6)


def test_timestep_and_label_may_be_numbers(featured):
    """A Python or NumPy timestep or label was a type-check error (the call is always checked), where JAX's own
    functions take them."""
    x = normal((1, 8, 8), 1)
    reference = featured(x, jnp.int32(7), label=jnp.int32(2))
    for t, label in ((7, 2), (np.int32(7), np.int64(2)), (7.0, 2)):
        np.testing.assert_array_equal(featured(x, t, label=label), reference)


def test_self_condition_and_label_change_the_output(featured):
    base = run(featured, cond=jnp.zeros((1, 8, 8)), label=jnp.array(0), key=key(5))
    assert not jnp.allclose(base, run(featured, cond=normal((1, 8, 8), 2), label=jnp.array(0), key=key(5)))
    assert not jnp.allclose(base, run(featured, cond=jnp.zeros((1, 8, 8)), label=jnp.array(1), key=key(5)))


def test_dropout_only_in_training(featured):
    args = dict(cond=jnp.zeros((1, 8, 8)), label=jnp.array(0))
    train1, train2 = (run(featured, **args, key=key(i), inference=False) for i in (1, 2))
    assert not jnp.allclose(train1, train2)
    np.testing.assert_array_equal(run(featured, **args, key=key(1)), run(featured, **args, key=key(2)))
    with pytest.raises(ValueError, match="needs key"):
        featured(normal((1, 8, 8)), jnp.array(7), inference=False)


def test_label_needs_a_class_conditional_model(plain):
    with pytest.raises(ValueError, match="without num_classes"):
        plain(normal((1, 8, 16)), jnp.array(7), label=jnp.array(0))


# --- runtime shape checks -------------------------------------------------------------------------
# Each of these fails before any computation, so they run eagerly.


def test_wrong_rank_input_raises(plain):
    with pytest.raises(TypeCheckError):
        plain(jnp.zeros((8, 8)), jnp.array(1))


def test_mismatched_self_condition_shape_raises(featured):
    with pytest.raises(TypeCheckError):
        featured(jnp.zeros((1, 8, 8)), jnp.array(1), x_self_cond=jnp.zeros((1, 8, 4)))


def test_wrong_channels_or_size_raises(plain):
    with pytest.raises(ValueError, match="channels"):
        plain(jnp.zeros((3, 8, 16)), jnp.array(1))
    with pytest.raises(ValueError, match="use 6 or 8"):
        plain(jnp.zeros((1, 7, 8)), jnp.array(1))


# --- closed-form layer properties -----------------------------------------------------------------


def test_weight_standardisation_zero_mean_unit_variance():
    # Per output channel: the last axis of an HWIO kernel.
    raw = 3.0 * normal((3, 3, 4, 5)) + jnp.arange(5.0)
    eps = 1e-5
    w = standardise_weight(raw, eps)
    raw_var = jnp.var(raw, axis=(0, 1, 2))
    np.testing.assert_allclose(jnp.mean(w, axis=(0, 1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(jnp.var(w, axis=(0, 1, 2)), raw_var / (raw_var + eps), rtol=1e-5)


def test_channels_last_group_norm_is_equinox_group_norm():
    # Per-channel-then-per-group statistics: the same function as eqx.nn.GroupNorm on (c, h, w), also
    # for inputs far from zero mean, where a one-pass variance would lose digits.
    norm = eqx.nn.GroupNorm(4, 12)
    norm = eqx.tree_at(lambda n: (n.weight, n.bias), norm, (normal((12,), 5), normal((12,), 6)))
    x = 0.5 * normal((12, 5, 7)) + 100.0 * jnp.arange(12.0)[:, None, None]
    np.testing.assert_allclose(to_chw(group_norm_hwc(norm, to_hwc(x))), norm(x), rtol=1e-4, atol=1e-4)
    # ... and its gradient too (the statistics are differentiated through, not stopped).
    g = normal((12, 5, 7), 7)
    grad_ours = jax.grad(lambda x: jnp.sum(to_chw(group_norm_hwc(norm, to_hwc(x))) * g))(x)
    grad_eqx = jax.grad(lambda x: jnp.sum(norm(x) * g))(x)
    np.testing.assert_allclose(grad_ours, grad_eqx, rtol=1e-3, atol=1e-3)


def test_upsample_gradient_sums_each_2x2_block():
    x, g = normal((3, 5, 4)), normal((6, 10, 4), 2)
    up, vjp = jax.vjp(upsample_nearest, x)
    np.testing.assert_array_equal(up, jnp.repeat(jnp.repeat(x, 2, axis=0), 2, axis=1))
    blocks = g.reshape(3, 2, 5, 2, 4)
    np.testing.assert_allclose(vjp(g)[0], blocks.sum(axis=(1, 3)), rtol=1e-6, atol=1e-6)
    # ... also batched, as the U-Net calls it.
    batched = jax.vmap(jax.grad(lambda x, g: jnp.sum(upsample_nearest(x) * g)))(x[None], g[None])[0]
    np.testing.assert_allclose(batched, blocks.sum(axis=(1, 3)), rtol=1e-6, atol=1e-6)
    # Forward mode works too (a custom_vjp would refuse jvp): the tangent is upsampled like the input.
    tangent = normal((3, 5, 4), 3)
    _, out_tangent = jax.jvp(upsample_nearest, (x,), (tangent,))
    np.testing.assert_array_equal(out_tangent, jnp.repeat(jnp.repeat(tangent, 2, axis=0), 2, axis=1))


@pytest.mark.parametrize("kernel,stride,padding,bias", [(1, 1, 0, True), (1, 1, 0, False), (3, 1, 1, True),
                                                         (4, 2, 1, True), (7, 1, 3, True)])
def test_conv2d_is_equinox_conv2d_with_the_kernel_stored_hwio(kernel, stride, padding, bias):
    conv = Conv2d(6, 5, kernel, stride=stride, padding=padding, use_bias=bias, key=key(0))
    conv = eqx.tree_at(lambda c: c.bias, conv, None if conv.bias is None else normal((5,), 1), is_leaf=lambda x: x is None)
    reference = eqx.nn.Conv2d(6, 5, kernel, stride=stride, padding=padding, use_bias=bias, key=key(1))
    oihw = kernels_as_oihw(conv)
    reference = eqx.tree_at(lambda c: (c.weight, c.bias), reference, (oihw.weight, oihw.bias), is_leaf=lambda x: x is None)
    x = normal((6, 8, 8), 2)
    np.testing.assert_allclose(conv(x), reference(x), rtol=1e-5, atol=1e-5)
    back = kernels_from_oihw(oihw)
    assert jax.tree.structure(back) == jax.tree.structure(conv)
    assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(conv)))


def test_conv2d_initialises_as_equinox_and_torch():
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias: std limit/sqrt(3).
    conv = Conv2d(64, 128, 3, key=key(0))
    limit = 1 / np.sqrt(64 * 9)
    assert conv.weight.shape == (3, 3, 64, 128) and conv.bias.shape == (128,)
    assert float(jnp.max(jnp.abs(conv.weight))) <= limit and float(jnp.max(jnp.abs(conv.bias))) <= limit
    assert float(jnp.std(conv.weight)) == pytest.approx(limit / np.sqrt(3), rel=0.02)
    assert float(jnp.min(conv.weight)) < -0.99 * limit and float(jnp.max(conv.weight)) > 0.99 * limit


@pytest.mark.parametrize("shape", [(), (1,), (7, 5), (3, 3, 64, 128), (1 << 16,), ((1 << 16) + 1,), (600, 700)])
def test_uniform_is_jax_random_uniform_bitwise(shape):
    # The prefix of a longer partitionable-Threefry draw, sizes 2**16, 2**18 and 2**20 here.
    k = jax.random.key(5)
    np.testing.assert_array_equal(uniform(k, shape, 0.3), jax.random.uniform(k, shape, minval=-0.3, maxval=0.3))
    raw = jax.random.PRNGKey(5)  # an old-style uint32 key draws the same way
    np.testing.assert_array_equal(uniform(raw, shape, 0.3), jax.random.uniform(raw, shape, minval=-0.3, maxval=0.3))
    with jax.enable_x64(True):  # the default dtype follows jax.random.uniform's: float64 here
        ours, theirs = uniform(k, shape, 0.3), jax.random.uniform(k, shape, minval=-0.3, maxval=0.3)
        assert ours.dtype == theirs.dtype == jnp.float64
        np.testing.assert_array_equal(ours, theirs)


def test_uniform_falls_back_for_other_keys_and_under_a_trace():
    k = key(2)  # rbg: no prefix property is promised, so jax.random.uniform itself
    np.testing.assert_array_equal(uniform(k, (9, 4), 1.0), jax.random.uniform(k, (9, 4), minval=-1.0, maxval=1.0))
    traced = jax.jit(lambda k: uniform(k, (9, 4), 1.0))(jax.random.key(3))
    np.testing.assert_array_equal(traced, jax.random.uniform(jax.random.key(3), (9, 4), minval=-1.0, maxval=1.0))
    assert eqx.filter_eval_shape(Conv2d, 4, 6, 3, key=jax.random.key(0)).weight.shape == (3, 3, 4, 6)
    with jax.threefry_partitionable(False):  # the old Threefry: a longer draw does not start with a shorter one
        k = jax.random.key(4)
        assert not np.array_equal(jax.random.uniform(k, (10,)), jax.random.uniform(k, (1000,))[:10])
        np.testing.assert_array_equal(uniform(k, (300, 7), 0.5), jax.random.uniform(k, (300, 7), minval=-0.5, maxval=0.5))


@pytest.mark.parametrize("features", [(3, 5), (256, 512)])
def test_linear_is_equinox_linear_bitwise(features):
    ours, theirs = linear(*features, key=jax.random.key(7)), eqx.nn.Linear(*features, key=jax.random.key(7))
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    assert (ours.in_features, ours.out_features, ours.use_bias) == (theirs.in_features, theirs.out_features, True)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_ws_conv_ignores_kernel_affine_rescaling():
    conv = WSConv2d(4, 5, 3, key=key(0))
    x = normal((4, 6, 6))
    scaled = eqx.tree_at(lambda c: c.conv.weight, conv, 7.0 * conv.conv.weight + 0.3)
    # Not exact: eps=1e-5 against a kernel variance of ~1e-2 leaves a ~0.05% difference.
    np.testing.assert_allclose(conv(x), scaled(x), rtol=2e-3, atol=2e-3)


def _permute_pixels(x: jax.Array, perm: jax.Array) -> jax.Array:
    c, h, w = x.shape
    return x.reshape(c, h * w)[:, perm].reshape(c, h, w)


@pytest.mark.parametrize("cls", [LinearAttention, Attention])
def test_attention_is_permutation_equivariant(cls):
    # Attention sees a set of pixels: permuting them permutes the output the same way.
    layer = PreNormResidual(ChannelLayerNorm(8), cls(8, heads=2, dim_head=4, key=key(0)))
    x, perm = normal((8, 4, 6)), jax.random.permutation(jax.random.key(3), 24)
    np.testing.assert_allclose(layer(_permute_pixels(x, perm)), _permute_pixels(layer(x), perm),
                               rtol=1e-5, atol=1e-5)


def test_linear_attention_matches_its_definition_head_by_head():
    # Shen et al.'s efficient attention written out per head in numpy (float64), against the layer, whose
    # output projection is folded into the context; random bias and LayerNorm gain so nothing is trivial.
    heads, d, c, hw = 3, 4, 6, (5, 7)
    layer = LinearAttention(c, heads=heads, dim_head=d, key=key(0))
    layer = eqx.tree_at(lambda m: (m.to_out.bias, m.norm.gain), layer, (normal((c,), 1), normal((c, 1, 1), 2)))
    x = normal((c, *hw), 3)
    n = hw[0] * hw[1]
    pixels = np.asarray(x, np.float64).reshape(c, n).T  # (n, c)
    w_qkv = np.asarray(layer.to_qkv.weight[0, 0], np.float64)  # (c, 3 * heads * d)
    q, k, v = (pixels @ w_qkv[:, i * heads * d:(i + 1) * heads * d] for i in range(3))

    def softmax(a, axis):
        e = np.exp(a - a.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    outs = []
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        qh, kh, vh = softmax(q[:, cols], 1) * d**-0.5, softmax(k[:, cols], 0), v[:, cols] / n
        outs.append(qh @ (kh.T @ vh))
    y = np.concatenate(outs, axis=1) @ np.asarray(layer.to_out.weight[0, 0], np.float64) + np.asarray(layer.to_out.bias)
    y = (y - y.mean(1, keepdims=True)) / np.sqrt(y.var(1, keepdims=True) + 1e-5) * np.asarray(layer.norm.gain).reshape(-1)
    np.testing.assert_allclose(layer(x), y.T.reshape(c, *hw), rtol=1e-4, atol=1e-5)


def test_full_attention_of_constant_image_is_value_projection():
    # Identical pixels: every softmax row averages identical values, whatever the weights.
    layer = Attention(8, heads=2, dim_head=4, key=key(0))
    x = jnp.broadcast_to(normal((8, 1, 1)), (8, 3, 5))
    v = layer.to_qkv(x)[16:]
    np.testing.assert_allclose(layer(x), layer.to_out(v), rtol=1e-5, atol=1e-5)


def test_pixel_unshuffle_moves_each_pixel_to_a_channel():
    down = Downsample(2, 8, kind="pixel_unshuffle", key=key(0))
    down = eqx.tree_at(lambda d: (d.conv.weight, d.conv.bias), down,
                       (jnp.eye(8)[None, None], jnp.zeros(8)))
    x = normal((2, 4, 6))
    out = down(x)
    for c, p1, p2 in np.ndindex(2, 2, 2):
        np.testing.assert_array_equal(out[4 * c + 2 * p1 + p2], x[c, p1::2, p2::2])


def test_random_fourier_features_are_frozen_and_not_counted():
    def weight_grad(features):
        emb = TimeEmbedding(8, features=features, fourier_dim=16, key=key(0))
        grads = eqx.filter_grad(lambda m: jnp.sum(m(jnp.array(3.0)) ** 2))(emb)
        return grads.fourier.weights

    assert jnp.all(weight_grad("random") == 0) and jnp.any(weight_grad("learned") != 0)
    shapes = {opt: eqx.filter_eval_shape(lambda k: small(**{opt: True}, key=k), key(0))
              for opt in ("random_fourier_features", "learned_sinusoidal_cond")}
    assert count_params(shapes["learned_sinusoidal_cond"]) - count_params(shapes["random_fourier_features"]) == 8


@pytest.mark.parametrize("option", ["random_fourier_features", "learned_sinusoidal_cond"])
def test_bfloat16_training_keeps_the_time_features_of_the_float32_model(option):
    """Mixed-precision training runs ``to_bfloat16(model)``, sampling the float32 model: both must see the same
    Fourier features of t (a bf16 ``w`` moves ``2 pi w t`` by radians at t ~ 1000); everything else is bf16."""
    model = small(**{option: True})
    half = to_bfloat16(model)
    t = jnp.arange(0, 1000, 37)
    features = jax.vmap(model.time_embedding.fourier)(t)
    np.testing.assert_array_equal(jax.vmap(half.time_embedding.fourier)(t), features)
    others = [leaf for leaf in jax.tree_util.tree_leaves(eqx.filter(half, eqx.is_inexact_array))
              if leaf is not half.time_embedding.fourier.weights]
    assert others and all(leaf.dtype == jnp.bfloat16 for leaf in others)
    emb, emb_half = model.time_embedding(jnp.array(999)), half.time_embedding(jnp.array(999))
    assert float(jnp.linalg.norm(emb_half - emb) / jnp.linalg.norm(emb)) < 0.02  # bf16's rounding, not other features
