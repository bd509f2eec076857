"""The denoising U-Net (Ronneberger et al. 2015) of DDPM (Ho et al. 2020, App. B), lucidrains' 2022 layout.

Per resolution the encoder has two ResNet blocks, a linear-attention block and a downsample (a 3x3 conv at
the last level); the middle is ResNet, full attention, ResNet; the decoder mirrors the encoder and
concatenates two skips per level. With ``dim=64, dim_mults=(1, 2, 4), channels=1`` it has exactly the
seed's 10,042,753 parameters. One image in, one image out: batch with ``jax.vmap``.
Inside, the network runs channels-last (``h w c``; see ``ddpm_eqx.layers``): one transpose in, one out.
"""

from collections.abc import Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from beartype import beartype
from jaxtyping import Array, Float, jaxtyped

from ddpm_eqx._types import ImageLike, Key, Label, LabelLike, Timestep
from ddpm_eqx.config import ModelConfig
from ddpm_eqx.layers import (
    Attention,
    ChannelLayerNorm,
    Conv2d,
    Downsample,
    Fourier,
    FourierFeatures,
    LinearAttention,
    PreNormResidual,
    ResnetBlock,
    TimeEmbedding,
    Upsample,
    to_chw,
    to_hwc,
)


def _check_widths(*, dim: int, channels: int, init_dim: int, out_dim: int | None, dim_mults: tuple[int, ...],
                  groups: int, num_classes: int | None, downsample: str) -> None:
    """One-line errors for widths the blocks would reject deep inside (GroupNorm's "groups must divide the
    channels") or silently take (an unknown ``downsample``)."""
    for name, value in (("dim", dim), ("channels", channels), ("init_dim", init_dim), ("resnet_block_groups", groups)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if out_dim is not None and out_dim < 1:
        raise ValueError(f"out_dim must be positive, got {out_dim}")
    if not dim_mults or min(dim_mults) < 1:
        raise ValueError(f"dim_mults must be positive multipliers, got {dim_mults}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be positive (or None: unconditional), got {num_classes}")
    if downsample not in ("conv", "pixel_unshuffle"):
        raise ValueError(f"downsample must be 'conv' or 'pixel_unshuffle', got {downsample!r}")
    widths = {"dim": dim, "init_dim": init_dim, **{f"dim * {m}": dim * m for m in dim_mults if m != 1}}
    bad = [f"{name} = {width}" for name, width in widths.items() if width % groups]
    if bad:
        raise ValueError(f"resnet_block_groups={groups} must divide every block's width ({', '.join(bad)}): pick dim "
                         f"and init_dim as multiples of {groups}, or another resnet_block_groups")


def _check_image_size(image_size: int | tuple[int, int], num_levels: int) -> tuple[int, int]:
    """Each of the ``num_levels - 1`` downsamples halves H and W exactly, or the skips would not line up."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    factor = 2 ** (num_levels - 1)
    for side in (h, w):
        if side <= 0:
            raise ValueError(f"image_size must be positive, got {side}; use a multiple of {factor}")
        if side % factor:
            lower, upper = side // factor * factor, (side // factor + 1) * factor
            fixes = f"{lower} or {upper}" if lower > 0 else str(upper)
            raise ValueError(
                f"image_size {side} is not divisible by {factor} (2**(len(dim_mults)-1)); use {fixes}"
            )
    return h, w


class DownLevel(eqx.Module):
    """One encoder resolution: ResNet, ResNet, linear attention, then downsample."""

    block1: ResnetBlock
    block2: ResnetBlock
    attn: PreNormResidual
    down: Downsample | Conv2d


class UpLevel(eqx.Module):
    """One decoder resolution: two ResNet blocks on [x, skip], linear attention, then upsample."""

    block1: ResnetBlock
    block2: ResnetBlock
    attn: PreNormResidual
    up: Upsample | Conv2d


class UNet(eqx.Module):
    """Noise-prediction U-Net ``eps_theta(x_t, t)`` of Ho et al. 2020 (eq. 11), with the options of
    lucidrains' Unet: self-conditioning (Chen et al. 2022, "Analog Bits"), random/learned Fourier time
    features, dropout, and class labels with a null class for classifier-free guidance (Ho & Salimans 2022).
    """

    init_conv: Conv2d
    time_embedding: TimeEmbedding
    class_embedding: eqx.nn.Embedding | None
    downs: tuple[DownLevel, ...]
    mid_block1: ResnetBlock
    mid_attn: PreNormResidual
    mid_block2: ResnetBlock
    ups: tuple[UpLevel, ...]
    final_block: ResnetBlock
    final_conv: Conv2d
    channels: int = eqx.field(static=True)
    out_dim: int = eqx.field(static=True)
    image_size: tuple[int, int] = eqx.field(static=True)
    dim_mults: tuple[int, ...] = eqx.field(static=True)
    self_condition: bool = eqx.field(static=True)
    num_classes: int | None = eqx.field(static=True)
    dropout: float = eqx.field(static=True)

    def __init__(
        self,
        *,
        dim: int,
        channels: int,
        image_size: int | tuple[int, int],
        key: Key,
        init_dim: int | None = None,
        out_dim: int | None = None,
        dim_mults: Sequence[int] = (1, 2, 4),
        resnet_block_groups: int = 8,
        attn_heads: int = 4,
        attn_dim_head: int = 32,
        downsample: Literal["conv", "pixel_unshuffle"] = "conv",
        self_condition: bool = False,
        random_fourier_features: bool = False,
        learned_sinusoidal_cond: bool = False,
        learned_sinusoidal_dim: int = 16,
        dropout: float = 0.0,
        num_classes: int | None = None,
    ):
        dim_mults = tuple(dim_mults)
        init_dim = dim if init_dim is None else init_dim
        _check_widths(dim=dim, channels=channels, init_dim=init_dim, out_dim=out_dim, dim_mults=dim_mults,
                      groups=resnet_block_groups, num_classes=num_classes, downsample=downsample)
        self.image_size = _check_image_size(image_size, len(dim_mults))
        self.channels, self.dim_mults, self.dropout = channels, dim_mults, dropout
        self.self_condition, self.num_classes = self_condition, num_classes
        self.out_dim = channels if out_dim is None else out_dim
        time_dim = 4 * dim
        keys = iter(jax.random.split(key, 8 + 8 * len(dim_mults)))

        def resnet(d_in: int, d_out: int) -> ResnetBlock:
            return ResnetBlock(
                d_in, d_out, time_dim=time_dim, groups=resnet_block_groups, dropout=dropout, key=next(keys)
            )

        def attention(d: int, *, linear: bool) -> PreNormResidual:
            cls = LinearAttention if linear else Attention
            layer = cls(d, heads=attn_heads, dim_head=attn_dim_head, key=next(keys))
            return PreNormResidual(ChannelLayerNorm(d), layer)

        in_channels = channels * (2 if self_condition else 1)
        self.init_conv = Conv2d(in_channels, init_dim, 7, padding=3, key=next(keys))
        features: Fourier = (
            "random" if random_fourier_features else "learned" if learned_sinusoidal_cond else "sinusoidal"
        )
        self.time_embedding = TimeEmbedding(
            dim, features=features, fourier_dim=learned_sinusoidal_dim, key=next(keys)
        )
        # Row num_classes is the null class: classifier-free guidance drops labels to it.
        self.class_embedding = (
            None if num_classes is None else eqx.nn.Embedding(num_classes + 1, time_dim, key=next(keys))
        )

        dims = [init_dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        last = len(in_out) - 1
        # lucidrains' layout: the encoder works at d_in and changes width in its downsample; the last
        # level changes width with a 3x3 conv at full resolution (same for the decoder, mirrored).
        self.downs = tuple(
            DownLevel(
                resnet(d_in, d_in),
                resnet(d_in, d_in),
                attention(d_in, linear=True),
                Conv2d(d_in, d_out, 3, padding=1, key=next(keys)) if i == last
                else Downsample(d_in, d_out, kind=downsample, key=next(keys)),
            )
            for i, (d_in, d_out) in enumerate(in_out)
        )
        mid = dims[-1]
        self.mid_block1 = resnet(mid, mid)
        self.mid_attn = attention(mid, linear=False)
        self.mid_block2 = resnet(mid, mid)
        self.ups = tuple(
            UpLevel(
                resnet(d_out + d_in, d_out),
                resnet(d_out + d_in, d_out),
                attention(d_out, linear=True),
                Conv2d(d_out, d_in, 3, padding=1, key=next(keys)) if i == last
                else Upsample(d_out, d_in, key=next(keys)),
            )
            for i, (d_in, d_out) in enumerate(reversed(in_out))
        )
        self.final_block = resnet(2 * init_dim, dim)
        self.final_conv = Conv2d(dim, self.out_dim, 1, key=next(keys))

    @jaxtyped(typechecker=beartype)
    def __call__(
        self,
        x: ImageLike,
        t: Timestep,
        *,
        x_self_cond: ImageLike | None = None,
        label: LabelLike | None = None,
        key: Key | None = None,
        inference: bool = True,
    ) -> Float[Array, "c_out h w"]:
        """Predict from one noisy image ``x`` at timestep ``t`` (an array or a number); dropout only with
        ``inference=False``."""
        x, t, label = jnp.asarray(x), jnp.asarray(t), None if label is None else jnp.asarray(label)
        x_self_cond = None if x_self_cond is None else jnp.asarray(x_self_cond)
        self._check_call(x, label, key, inference)
        if self.self_condition:
            x_self_cond = jnp.zeros_like(x) if x_self_cond is None else x_self_cond
            x = jnp.concatenate([x_self_cond, x])
        # The embedding starts from float32 timesteps: cast it so a bfloat16 network stays bfloat16.
        emb = self._embedding(t, label).astype(x.dtype)
        n_blocks = 4 * len(self.dim_mults) + 3  # each ResNet block draws its own dropout key
        block_keys = iter([None] * n_blocks if key is None else jax.random.split(key, n_blocks))

        def resnet(block: ResnetBlock, h: Float[Array, "h w c"]) -> Float[Array, "h w o"]:
            return block.hwc(h, emb, key=next(block_keys), inference=inference)

        def cat(a: Float[Array, "h w c1"], b: Float[Array, "h w c2"]) -> Float[Array, "h w c"]:
            return jnp.concatenate([a, b], axis=-1)

        x = self.init_conv.hwc(to_hwc(x))
        skips = [x]
        for level in self.downs:
            x = resnet(level.block1, x)
            skips.append(x)
            x = level.attn.hwc(resnet(level.block2, x))
            skips.append(x)
            x = level.down.hwc(x)

        x = resnet(self.mid_block2, self.mid_attn.hwc(resnet(self.mid_block1, x)))

        for up in self.ups:
            x = resnet(up.block1, cat(x, skips.pop()))
            x = resnet(up.block2, cat(x, skips.pop()))
            x = up.attn.hwc(x)
            x = up.up.hwc(x)

        x = resnet(self.final_block, cat(x, skips.pop()))
        return to_chw(self.final_conv.hwc(x))

    def _check_call(self, x: Array, label: Array | None, key: Key | None, inference: bool) -> None:
        # Shapes are static under jit, so these checks cost nothing after tracing.
        if x.shape[0] != self.channels:
            raise ValueError(f"x has {x.shape[0]} channels; this UNet was built for {self.channels}")
        _check_image_size((x.shape[1], x.shape[2]), len(self.dim_mults))
        if label is not None and self.num_classes is None:
            raise ValueError("label given to a UNet built without num_classes")
        if self.dropout > 0 and not inference and key is None:
            raise ValueError("dropout > 0 with inference=False needs key=...")

    def _embedding(self, t: Timestep, label: Label | None) -> Float[Array, " e"]:
        emb = self.time_embedding(t)
        if self.class_embedding is not None:
            # label None is the null class (the unconditional model of classifier-free guidance).
            index = jnp.asarray(self.num_classes) if label is None else label
            emb = emb + self.class_embedding(index)
        return emb


def make_unet(
    model_cfg: ModelConfig, *, channels: int, image_size: int | tuple[int, int], self_condition: bool, key: Key
) -> UNet:
    """Build the U-Net that ``config.model`` describes for data of the given shape."""
    return UNet(
        dim=model_cfg.dim,
        channels=channels,
        image_size=image_size,
        key=key,
        init_dim=model_cfg.init_dim,
        out_dim=model_cfg.out_dim,
        dim_mults=tuple(model_cfg.dim_mults),
        resnet_block_groups=model_cfg.resnet_block_groups,
        attn_heads=model_cfg.attn_heads,
        attn_dim_head=model_cfg.attn_dim_head,
        downsample=model_cfg.downsample,
        self_condition=self_condition,
        random_fourier_features=model_cfg.random_fourier_features,
        learned_sinusoidal_cond=model_cfg.learned_sinusoidal_cond,
        learned_sinusoidal_dim=model_cfg.learned_sinusoidal_dim,
        dropout=model_cfg.dropout,
        num_classes=model_cfg.num_classes,
    )


def _is_param(x: object) -> bool:
    # ShapeDtypeStruct too, so an eqx.filter_eval_shape skeleton counts without allocating.
    if not isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
        return False
    return bool(jnp.issubdtype(x.dtype, jnp.inexact))


def count_params(model: eqx.Module) -> int:
    """Trainable parameters: floating-point array leaves, less frozen random Fourier features."""
    is_frozen = lambda node: isinstance(node, FourierFeatures) and node.frozen  # noqa: E731
    leaves = jax.tree.leaves(model, is_leaf=is_frozen)
    return sum(int(np.prod(leaf.shape)) for leaf in leaves if not is_frozen(leaf) and _is_param(leaf))
