"""U-Net building blocks: timestep embeddings, ResNet blocks, attention, down/upsampling.

The layers are those of the 2022 U-Net in lucidrains' denoising-diffusion-pytorch as ported by the seed
(yiyixuxu/denoising-diffusion-flax): the PixelCNN++/Wide-ResNet U-Net of Ho et al. 2020 (arXiv:2006.11239,
App. B) with weight-standardised convolutions, FiLM-style timestep conditioning and linear attention.
Every layer maps one image ``(c, h, w)``; callers batch with ``jax.vmap``.

Layout: each layer also has ``hwc``, the same function on a channels-last image ``(h, w, c)``; the U-Net
runs on those and transposes once at entry and exit. On XLA:CPU a vmapped channels-last network is ~2x
faster (its convolutions are Eigen's NHWC kernels, and every 1x1 convolution and attention projection
becomes one ``(b*h*w, c) @ (c, o)`` matmul instead of a slow small-K dot over an NCHW array; see
benchmarks/RESULTS.md). Convolution kernels are stored HWIO (``Conv2d``), the layout those kernels take.
"""

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree

from ddpm_eqx._types import Key, Timestep

Fourier = Literal["sinusoidal", "random", "learned"]


def _eps(x: Array) -> float:
    # The seed/lucidrains use a larger epsilon below float32 so bf16 statistics stay finite.
    return 1e-5 if x.dtype == jnp.float32 else 1e-3


_MIN_DRAW = 1 << 16
"""The smallest draw of :func:`uniform`; draws grow by 4x, so a model needs only a few of them."""


@functools.cache
def _uniform_draw(size: int, dtype: Any) -> Callable[..., Array]:
    return jax.jit(lambda key, lo, hi: jax.random.uniform(key, (size,), dtype, lo, hi))


def uniform(key: Key, shape: tuple[int, ...], limit: float, dtype: Any = float) -> Float[Array, "..."]:
    """``jax.random.uniform(key, shape, dtype, -limit, limit)``, bitwise, without a compile per shape.

    Eagerly, each new ``shape`` is a new XLA program: ~0.3-0.5 s of compile on a CPU core for a few
    microseconds of work, 14 of the 21 s it took to build the seed's model (29 shapes). With JAX's
    partitionable Threefry (its default) element ``i`` of a draw depends on the key and ``i`` only, so
    the first ``prod(shape)`` values of a longer draw *are* the draw of ``shape``: this draws one of a
    few fixed sizes (``_MIN_DRAW`` times a power of 4, each compiled once per process) and keeps the
    prefix. Under a trace (``eqx.filter_eval_shape``, ``jit``), for other key implementations (``rbg``) and
    with the old non-partitionable Threefry it is ``jax.random.uniform`` itself.
    """
    if (isinstance(key, jax.core.Tracer) or not getattr(jax.config, "jax_threefry_partitionable")
            or str(jax.random.key_impl(key)) != "threefry2x32"):
        return jax.random.uniform(key, shape, dtype, -limit, limit)
    n, size = math.prod(shape), _MIN_DRAW
    while size < n:
        size *= 4
    # `float` is float32, or float64 with jax_enable_x64: jax.random.uniform's own default.
    drawn = np.asarray(_uniform_draw(size, jax.dtypes.canonicalize_dtype(dtype))(key, -limit, limit))
    # A host copy of the prefix (the rest of the draw is not kept alive), then a transfer: `jnp.array` of a
    # host array would compile a copy program per shape again.
    return jax.device_put(drawn[:n].reshape(shape).copy())


def linear(in_features: int, out_features: int, *, key: Key) -> eqx.nn.Linear:
    """``eqx.nn.Linear(in_features, out_features, key=key)``, bitwise, its weights drawn by :func:`uniform`."""
    abstract = eqx.filter_eval_shape(eqx.nn.Linear, in_features, out_features, key=key)
    wkey, bkey = jax.random.split(key)  # as eqx.nn.Linear splits and scales (checked in tests/test_unet.py)
    limit = 1 / math.sqrt(in_features)
    weight = uniform(wkey, (out_features, in_features), limit, abstract.weight.dtype)
    bias = uniform(bkey, (out_features,), limit, weight.dtype)
    return eqx.tree_at(lambda m: (m.weight, m.bias), abstract, (weight, bias))


def sinusoidal_embedding(t: Timestep, dim: int) -> Float[Array, " d"]:
    """Transformer position encoding of a timestep (Vaswani et al. 2017, sec. 3.5; Ho et al. 2020, App. B).

    ``dim // 2`` sines then as many cosines, with frequencies geometric from 1 down to 1/10000.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / (half - 1))
    # float32 whatever the model dtype: t runs to ~1000, where bf16 cannot tell neighbours apart.
    angles = jnp.asarray(t, jnp.float32) * freqs
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])


class FourierFeatures(eqx.Module):
    """Random (Tancik et al. 2020) or learned (Kingma et al. 2021, VDM) Fourier features of ``t``.

    Returns ``[t, sin(2 pi w t), cos(2 pi w t)]`` with ``w ~ N(0, I)``, so ``dim + 1`` features. Random
    features stay an array (checkpoints keep them) but are frozen: the forward pass stops their gradient
    and ``unet.count_params`` leaves them out. An optimiser with weight decay should mask them too.
    """

    weights: Float[Array, " half"]
    frozen: bool = eqx.field(static=True)

    def __init__(self, dim: int, *, frozen: bool, key: Key):
        if dim % 2:
            raise ValueError(f"learned_sinusoidal_dim must be even, got {dim}")
        self.weights = jax.random.normal(key, (dim // 2,))
        self.frozen = frozen

    def __call__(self, t: Timestep) -> Float[Array, " d"]:
        weights = jax.lax.stop_gradient(self.weights) if self.frozen else self.weights
        t = jnp.asarray(t, jnp.float32)
        angles = 2 * math.pi * t * weights
        return jnp.concatenate([t[None], jnp.sin(angles), jnp.cos(angles)])


class TimeEmbedding(eqx.Module):
    """``t -> features -> Linear -> GELU -> Linear`` to ``4 * dim`` (Ho et al. 2020, App. B)."""

    fourier: FourierFeatures | None
    linear1: eqx.nn.Linear
    linear2: eqx.nn.Linear
    dim: int = eqx.field(static=True)

    def __init__(self, dim: int, *, features: Fourier, fourier_dim: int, key: Key):
        kf, k1, k2 = jax.random.split(key, 3)
        if features == "sinusoidal":
            if dim < 4:  # one frequency: its geometric spacing divides by zero, every output NaN
                raise ValueError(f"dim must be at least 4 for the sinusoidal time embedding (two frequencies), got "
                                 f"{dim}")
            self.fourier, in_dim = None, 2 * (dim // 2)
        else:
            self.fourier = FourierFeatures(fourier_dim, frozen=features == "random", key=kf)
            in_dim = fourier_dim + 1  # [t, sin, cos]
        self.linear1 = linear(in_dim, 4 * dim, key=k1)
        self.linear2 = linear(4 * dim, 4 * dim, key=k2)
        self.dim = dim

    def __call__(self, t: Timestep) -> Float[Array, " e"]:
        emb = sinusoidal_embedding(t, self.dim) if self.fourier is None else self.fourier(t)
        # tanh-approximate GELU (Hendrycks & Gimpel 2016), flax's default, as in the seed.
        return self.linear2(jax.nn.gelu(self.linear1(emb), approximate=True))


def to_hwc(x: Float[Array, "c h w"]) -> Float[Array, "h w c"]:
    return jnp.transpose(x, (1, 2, 0))


def to_chw(x: Float[Array, "h w c"]) -> Float[Array, "c h w"]:
    return jnp.transpose(x, (2, 0, 1))


class Conv2d(eqx.Module):
    """A 2-D convolution (zero padding) whose kernel is stored ``(kh, kw, in, out)``: HWIO.

    HWIO is the layout XLA:CPU's convolutions (Eigen) take, and Flax's. ``eqx.nn.Conv2d`` stores OIHW,
    which costs a kernel transpose per call and, worse, the transpose of each kernel gradient back to
    OIHW fused into every optimizer and EMA update that reads it: strided reads of ``(o, i, 3, 3)``
    arrays, 0.24 s of thread time per step for the seed's model against 0.10 s stored HWIO
    (benchmarks/RESULTS.md). Initialised as ``eqx.nn.Conv2d`` and torch: weight and bias uniform in
    +-1/sqrt(fan_in). Checkpoints written with OIHW kernels are converted on restore
    (``kernels_as_oihw`` / ``kernels_from_oihw``).
    """

    weight: Float[Array, "kh kw i o"]
    bias: Float[Array, " o"] | None
    stride: int = eqx.field(static=True)
    padding: int = eqx.field(static=True)

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
        use_bias: bool = True, key: Key,
    ):
        wkey, bkey = jax.random.split(key)
        limit = 1 / math.sqrt(in_channels * kernel_size**2)
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.weight = uniform(wkey, shape, limit)
        self.bias = uniform(bkey, (out_channels,), limit) if use_bias else None
        self.stride, self.padding = stride, padding

    @property
    def in_channels(self) -> int:
        return self.weight.shape[2]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[3]

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "o h2 w2"]:
        return to_chw(self.hwc(to_hwc(x)))

    def hwc(self, x: Float[Array, "h w c"], weight: Float[Array, "kh kw i o"] | None = None) -> Float[Array, "h2 w2 o"]:
        """``self(x)`` on a channels-last image, optionally with another kernel (a standardised one)."""
        weight = self.weight if weight is None else weight
        if weight.shape[:2] == (1, 1) and self.stride == 1 and self.padding == 0:
            out = x @ weight[0, 0]  # a 1x1 convolution is a matmul over pixels
        else:
            p = self.padding
            out = jax.lax.conv_general_dilated(
                x[None], weight, window_strides=(self.stride, self.stride), padding=((p, p), (p, p)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )[0]
        return out if self.bias is None else out + self.bias


def _relayout_convs(tree: PyTree, weight: Callable[[Any], Any], bias: Callable[[Any], Any]) -> PyTree:
    def convert(node: Any) -> Any:
        if not isinstance(node, Conv2d):
            return node
        return eqx.tree_at(lambda c: (c.weight, c.bias), node, (weight(node.weight), bias(node.bias)),
                           is_leaf=lambda x: x is None)

    return jax.tree_util.tree_map(convert, tree, is_leaf=lambda x: isinstance(x, Conv2d))


def _reshaped(x: Any, shape: tuple[int, ...], perm: tuple[int, ...] | None = None) -> Any:
    """``x`` (array, ``jax.ShapeDtypeStruct`` or None) transposed by ``perm``, then reshaped to ``shape``."""
    if x is None:
        return None
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(shape, x.dtype, sharding=x.sharding)
    return (x if perm is None else jnp.transpose(x, perm)).reshape(shape)


def kernels_as_oihw(tree: PyTree) -> PyTree:
    """``tree`` with every ``Conv2d`` as ``eqx.nn.Conv2d`` stores one (weight ``o i kh kw``, bias ``o 1 1``):
    the layout of checkpoints written before ddpm-eqx stored kernels HWIO. Works on any pytree holding
    the modules (a train state, its optimizer state) with array or ``jax.ShapeDtypeStruct`` leaves."""
    return _relayout_convs(
        tree,
        lambda w: _reshaped(w, (w.shape[3], w.shape[2], w.shape[0], w.shape[1]), (3, 2, 0, 1)),
        lambda b: _reshaped(b, (b.shape[0], 1, 1)) if b is not None else None,
    )


def kernels_from_oihw(tree: PyTree) -> PyTree:
    """The inverse of ``kernels_as_oihw``: OIHW weights and ``o 1 1`` biases back to ``Conv2d``'s layout."""
    return _relayout_convs(
        tree,
        lambda w: _reshaped(w, (w.shape[2], w.shape[3], w.shape[1], w.shape[0]), (2, 3, 1, 0)),
        lambda b: _reshaped(b, (b.shape[0],)) if b is not None else None,
    )


def group_norm_hwc(norm: eqx.nn.GroupNorm, x: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
    """``eqx.nn.GroupNorm`` (contiguous channel groups, biased variance) on a channels-last image.

    Two-pass statistics, each summed over the pixels per channel first and then over a group's channels.
    The same function as reducing a ``(h, w, groups, c/g)`` view over three axes, but on XLA:CPU that
    reduction's gradient is a strided sum ~2x slower (fwd+bwd at 28x28x64, batch 32: 9.7 -> 5.1 ms).
    """
    h, w, c = x.shape
    size = c // norm.groups
    y = x.astype(jnp.result_type(x.dtype, jnp.float32))

    def group_mean(per_channel: Float[Array, " c"]) -> Float[Array, " c"]:
        return jnp.repeat(jnp.sum(per_channel.reshape(norm.groups, size), axis=1), size) / (h * w * size)

    mean = group_mean(jnp.sum(y, axis=(0, 1)))
    centred = y - mean
    var = group_mean(jnp.sum(centred * centred, axis=(0, 1)))
    out = centred * jax.lax.rsqrt(var + norm.eps)
    if norm.channelwise_affine:
        assert norm.weight is not None and norm.bias is not None
        out = norm.weight.astype(out.dtype) * out + norm.bias.astype(out.dtype)
    return out.astype(x.dtype)


def standardise_weight(weight: Float[Array, "kh kw i o"], eps: float) -> Float[Array, "kh kw i o"]:
    """Weight standardisation (Qiao et al. 2019, eq. 5): zero mean, unit variance per output channel
    (the last axis of an HWIO kernel)."""
    axes = tuple(range(weight.ndim - 1))
    mean = jnp.mean(weight, axis=axes, keepdims=True)
    var = jnp.var(weight, axis=axes, keepdims=True)  # biased, as torch.var(unbiased=False)
    return (weight - mean) * jax.lax.rsqrt(var + eps)


class WSConv2d(eqx.Module):
    """A convolution whose kernel is standardised on every call; pairs with GroupNorm (Qiao et al. 2019)."""

    conv: Conv2d

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, key: Key):
        self.conv = Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, key=key)

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "o h w"]:
        return to_chw(self.hwc(to_hwc(x)))

    def hwc(self, x: Float[Array, "h w c"]) -> Float[Array, "h w o"]:
        return self.conv.hwc(x, standardise_weight(self.conv.weight, _eps(x)))


ScaleShift = tuple[Float[Array, "o *_"], Float[Array, "o *_"]]


class Block(eqx.Module):
    """WS-conv 3x3 -> GroupNorm (Wu & He 2018) -> optional scale/shift -> SiLU -> optional dropout."""

    conv: WSConv2d
    norm: eqx.nn.GroupNorm
    dropout: eqx.nn.Dropout | None

    def __init__(self, dim_in: int, dim_out: int, *, groups: int, dropout: float, key: Key):
        self.conv = WSConv2d(dim_in, dim_out, 3, key=key)
        self.norm = eqx.nn.GroupNorm(groups, dim_out)
        self.dropout = eqx.nn.Dropout(dropout) if dropout > 0 else None

    def __call__(
        self,
        x: Float[Array, "c h w"],
        scale_shift: ScaleShift | None = None,
        *,
        key: Key | None = None,
        inference: bool = True,
    ) -> Float[Array, "o h w"]:
        return to_chw(self.hwc(to_hwc(x), scale_shift, key=key, inference=inference))

    def hwc(
        self,
        x: Float[Array, "h w c"],
        scale_shift: ScaleShift | None = None,
        *,
        key: Key | None = None,
        inference: bool = True,
    ) -> Float[Array, "h w o"]:
        x = group_norm_hwc(self.norm, self.conv.hwc(x))
        if scale_shift is not None:
            scale, shift = (u.reshape(-1) for u in scale_shift)  # (o,) or the channels-first (o, 1, 1)
            x = x * (scale + 1) + shift  # "+1": a zero projection leaves the block unconditioned
        x = jax.nn.silu(x)
        if self.dropout is not None:
            x = self.dropout(x, key=key, inference=inference)
        return x


class ResnetBlock(eqx.Module):
    """Wide-ResNet block (Zagoruyko & Komodakis 2016) conditioned on the time embedding by scale and
    shift after the first norm (FiLM, Perez et al. 2018); 1x1 residual conv when channels change."""

    time_proj: eqx.nn.Linear
    block1: Block
    block2: Block
    res_conv: Conv2d | None

    def __init__(
        self, dim_in: int, dim_out: int, *, time_dim: int, groups: int, dropout: float = 0.0, key: Key
    ):
        kt, k1, k2, kr = jax.random.split(key, 4)
        self.time_proj = linear(time_dim, 2 * dim_out, key=kt)
        # Dropout sits between the two convolutions (lucidrains; Ho et al. 2020 App. B).
        self.block1 = Block(dim_in, dim_out, groups=groups, dropout=dropout, key=k1)
        self.block2 = Block(dim_out, dim_out, groups=groups, dropout=0.0, key=k2)
        self.res_conv = Conv2d(dim_in, dim_out, 1, key=kr) if dim_in != dim_out else None

    def __call__(
        self,
        x: Float[Array, "c h w"],
        t_emb: Float[Array, " e"],
        *,
        key: Key | None = None,
        inference: bool = True,
    ) -> Float[Array, "o h w"]:
        return to_chw(self.hwc(to_hwc(x), t_emb, key=key, inference=inference))

    def hwc(
        self,
        x: Float[Array, "h w c"],
        t_emb: Float[Array, " e"],
        *,
        key: Key | None = None,
        inference: bool = True,
    ) -> Float[Array, "h w o"]:
        scale, shift = jnp.split(self.time_proj(jax.nn.silu(t_emb)), 2)
        h = self.block1.hwc(x, (scale, shift), key=key, inference=inference)
        h = self.block2.hwc(h)
        return h + (x if self.res_conv is None else self.res_conv.hwc(x))


class ChannelLayerNorm(eqx.Module):
    """LayerNorm over the channels of each pixel with a gain and no bias (Ba et al. 2016; lucidrains)."""

    gain: Float[Array, "c 1 1"]

    def __init__(self, channels: int):
        self.gain = jnp.ones((channels, 1, 1))

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c h w"]:
        return to_chw(self.hwc(to_hwc(x)))

    def hwc(self, x: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.var(x, axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + _eps(x)) * self.gain.reshape(-1)


QKV = tuple[Float[Array, "n heads d"], Float[Array, "n heads d"], Float[Array, "n heads d"]]


def project_qkv(to_qkv: Conv2d, x: Float[Array, "h w c"], heads: int) -> QKV:
    """Queries, keys and values ``(pixels, heads, d)`` of the 1x1 convolution ``to_qkv`` (no bias).

    Three ``(pixels, c) @ (c, heads * d)`` matmuls on slices of the one weight rather than one matmul
    split afterwards: the split's backward pads and adds three pixel-sized gradients into one, which
    XLA:CPU then transposes for the weight gradient (~0.25 s per 28x28 layer, seed model, batch 32).
    """
    h, w, c = x.shape
    pixels = x.reshape(h * w, c)
    weight = to_qkv.weight[0, 0]
    n = weight.shape[1] // 3
    q, k, v = ((pixels @ weight[:, i * n : (i + 1) * n]).reshape(h * w, heads, n // heads) for i in range(3))
    return q, k, v


class LinearAttention(eqx.Module):
    """Linear attention (Shen et al. 2018, "efficient attention"; cf. Katharopoulos et al. 2020).

    Softmax normalises q over its features and k over positions, so the (d x d) context ``k v^T`` is
    built first and the cost is linear in the number of pixels. Output: 1x1 conv then LayerNorm.
    """

    to_qkv: Conv2d
    to_out: Conv2d
    norm: ChannelLayerNorm
    heads: int = eqx.field(static=True)
    dim_head: int = eqx.field(static=True)

    def __init__(self, dim: int, *, heads: int, dim_head: int, key: Key):
        kq, ko = jax.random.split(key)
        self.to_qkv = Conv2d(dim, 3 * heads * dim_head, 1, use_bias=False, key=kq)
        self.to_out = Conv2d(heads * dim_head, dim, 1, key=ko)
        self.norm = ChannelLayerNorm(dim)
        self.heads, self.dim_head = heads, dim_head

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c h w"]:
        return to_chw(self.hwc(to_hwc(x)))

    def hwc(self, x: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
        h, w, _ = x.shape
        q, k, v = project_qkv(self.to_qkv, x, self.heads)
        q = jax.nn.softmax(q, axis=-1) * self.dim_head**-0.5
        k = jax.nn.softmax(k, axis=0)
        v = v / (h * w)  # the seed's (and lucidrains 2022) rescaling; keeps the context O(1)
        context = jnp.einsum("nhd,nhe->hde", k, v)
        # to_out folded into the context: sum_e context[h,d,e] W_out[(h,e),c] is a tiny (heads*d, c) matrix,
        # so the output is one (pixels, heads*d) @ (heads*d, c) matmul. Same function; it skips a per-head
        # batched matmul whose operands XLA:CPU transposes (train step 2-4% faster, interleaved A/B).
        w_out = self.to_out.weight[0, 0].reshape(self.heads, self.dim_head, -1)
        folded = jnp.einsum("hde,hec->hdc", context, w_out).reshape(self.heads * self.dim_head, -1)
        out = q.reshape(h * w, -1) @ folded
        out = out if self.to_out.bias is None else out + self.to_out.bias
        return self.norm.hwc(out.reshape(h, w, -1))


class Attention(eqx.Module):
    """Full softmax self-attention over pixels (Vaswani et al. 2017) with l2-normalised queries and keys
    and a fixed temperature of 10 (query-key normalisation, Henry et al. 2020), as in the seed."""

    to_qkv: Conv2d
    to_out: Conv2d
    heads: int = eqx.field(static=True)
    dim_head: int = eqx.field(static=True)
    scale: float = eqx.field(static=True)

    def __init__(self, dim: int, *, heads: int, dim_head: int, key: Key, scale: float = 10.0):
        kq, ko = jax.random.split(key)
        self.to_qkv = Conv2d(dim, 3 * heads * dim_head, 1, use_bias=False, key=kq)
        self.to_out = Conv2d(heads * dim_head, dim, 1, key=ko)
        self.heads, self.dim_head, self.scale = heads, dim_head, scale

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c h w"]:
        return to_chw(self.hwc(to_hwc(x)))

    def hwc(self, x: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
        h, w, _ = x.shape
        q, k, v = project_qkv(self.to_qkv, x, self.heads)
        q, k = (u / jnp.maximum(jnp.linalg.norm(u, axis=-1, keepdims=True), 1e-12) for u in (q, k))
        attn = jax.nn.softmax(jnp.einsum("ihd,jhd->hij", q, k) * self.scale, axis=-1)
        out = jnp.einsum("hij,jhd->ihd", attn, v)
        return self.to_out.hwc(out.reshape(h, w, -1))


class PreNormResidual(eqx.Module):
    """``x + fn(LayerNorm(x))``: the pre-norm residual of Xiong et al. 2020 around an attention layer."""

    norm: ChannelLayerNorm
    fn: LinearAttention | Attention

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c h w"]:
        return to_chw(self.hwc(to_hwc(x)))

    def hwc(self, x: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
        return x + self.fn.hwc(self.norm.hwc(x))


class Downsample(eqx.Module):
    """Halve the resolution: a 4x4 stride-2 conv, or pixel-unshuffle (Shi et al. 2016) + a 1x1 conv,
    which loses no information before the projection."""

    conv: Conv2d
    pixel_unshuffle: bool = eqx.field(static=True)

    def __init__(self, dim_in: int, dim_out: int, *, kind: Literal["conv", "pixel_unshuffle"], key: Key):
        self.pixel_unshuffle = kind == "pixel_unshuffle"
        if self.pixel_unshuffle:
            self.conv = Conv2d(4 * dim_in, dim_out, 1, key=key)
        else:
            self.conv = Conv2d(dim_in, dim_out, 4, stride=2, padding=1, key=key)

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "o h2 w2"]:
        return to_chw(self.hwc(to_hwc(x)))

    def hwc(self, x: Float[Array, "h w c"]) -> Float[Array, "h2 w2 o"]:
        if self.pixel_unshuffle:
            h, w, c = x.shape
            # (h p1) (w p2) c -> h w (c p1 p2): the channel order of the channels-first version
            x = x.reshape(h // 2, 2, w // 2, 2, c).transpose(0, 2, 4, 1, 3).reshape(h // 2, w // 2, 4 * c)
        return self.conv.hwc(x)


def upsample_nearest(x: Float[Array, "h w c"]) -> Float[Array, "h2 w2 c"]:
    """Nearest-neighbour 2x upsampling of a channels-last image (``jnp.repeat`` along h and w).

    Written as copies concatenated along contiguous axes, so that its gradient (the sum of each 2x2
    block) is two adds of contiguous halves. Autodiff of ``jnp.repeat`` gives a reduction over two
    strided axes instead, which XLA:CPU runs slowly: the Upsample layer's fwd+bwd at batch 32 goes from
    91 to 48 ms at 14x14x128. Plain JAX rather than a ``custom_vjp``, so forward-mode AD still works.
    """
    h, w, c = x.shape
    columns = jnp.concatenate([x, x], axis=-1)  # (h, w, 2c) is (h, 2w, c) with every pixel twice
    return jnp.stack([columns, columns], axis=1).reshape(2 * h, 2 * w, c)


class Upsample(eqx.Module):
    """Double the resolution: nearest-neighbour then a 3x3 conv (Odena et al. 2016: no checkerboard;
    also ~3x faster than a transposed conv on XLA:CPU)."""

    conv: Conv2d

    def __init__(self, dim_in: int, dim_out: int, *, key: Key):
        self.conv = Conv2d(dim_in, dim_out, 3, padding=1, key=key)

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "o h2 w2"]:
        return to_chw(self.hwc(to_hwc(x)))

    def hwc(self, x: Float[Array, "h w c"]) -> Float[Array, "h2 w2 o"]:
        return self.conv.hwc(upsample_nearest(x))
