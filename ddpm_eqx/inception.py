"""The FID Inception-v3 network in Equinox: pool3 (2048-d) features as TTUR and pytorch-fid compute them.

The architecture is Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer
Vision") as frozen in TensorFlow's 2015-12-05 graph, which FID is defined on (Heusel et al. 2017). It differs from
the usual Inception-v3 in two places, both reproduced here: the 3x3 average pools in the A, C and E blocks ignore
the zero padding (TF's 'SAME' pooling, torch's count_include_pad=False), and the last E block (Mixed_7c) pools
with a max, not an average.

Inference only: each BatchNorm (eps=1e-3, running statistics) is folded into its convolution's scale and bias.
Weights come from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` state dict, read from a `.npz` of the same
named arrays (the canonical format here) or, where torch is importable, from the `.pth` itself.
"""

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV_VAR = "DDPM_EQX_FID_WEIGHTS"
WEIGHTS_FLAG = "--fid-weights"
BN_EPS = 1e-3
INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_SUFFIXES = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
"""The five tensors of one torchvision BasicConv2d in a state dict (plus an ignored bn.num_batches_tracked)."""


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


class BasicConv2d(eqx.Module):
    """conv (no bias) -> BatchNorm(eps=1e-3, inference) -> ReLU, the BN folded into `weight` and `bias`."""

    weight: Float[Array, "o i kh kw"]
    bias: Float[Array, " o"]
    stride: int = eqx.field(static=True)
    padding: tuple[int, int] = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        key: PRNGKeyArray,
    ):
        kh, kw = _pair(kernel_size)
        # He-normal random weights keep activations O(1) through 94 layers (tests); real weights replace them.
        scale = np.sqrt(2.0 / (in_channels * kh * kw))
        self.weight = scale * jr.normal(key, (out_channels, in_channels, kh, kw))
        self.bias = jnp.zeros(out_channels)
        self.stride = stride
        self.padding = _pair(padding)

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "o h2 w2"]:
        ph, pw = self.padding
        # HIGHEST: no TF32 on GPUs, so features match the float32 reference network.
        y = lax.conv_general_dilated(
            x[None],
            self.weight,
            window_strides=(self.stride, self.stride),
            padding=((ph, ph), (pw, pw)),
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
            precision=lax.Precision.HIGHEST,
        )[0]
        return jax.nn.relu(y + self.bias[:, None, None])


def max_pool(x: Float[Array, "c h w"], *, stride: int, padding: int = 0) -> Float[Array, "c h2 w2"]:
    """3x3 max pool (padding never wins: it is -inf)."""
    pad = ((0, 0), (padding, padding), (padding, padding))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3), (1, stride, stride), pad)


def avg_pool_same(x: Float[Array, "c h w"]) -> Float[Array, "c h w"]:
    """3x3 stride-1 average pool that divides by the number of real pixels in the window (TF 'SAME' pooling)."""
    pad = ((0, 0), (1, 1), (1, 1))
    sums = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3), (1, 1, 1), pad)
    counts = lax.reduce_window(jnp.ones((1, *x.shape[1:]), x.dtype), 0.0, lax.add, (1, 3, 3), (1, 1, 1), pad)
    return sums / counts


class InceptionA(eqx.Module):
    """35x35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and pool branches (pytorch-fid's FIDInceptionA)."""

    branch1x1: BasicConv2d
    branch5x5_1: BasicConv2d
    branch5x5_2: BasicConv2d
    branch3x3dbl_1: BasicConv2d
    branch3x3dbl_2: BasicConv2d
    branch3x3dbl_3: BasicConv2d
    branch_pool: BasicConv2d

    def __init__(self, in_channels: int, pool_features: int, *, key: PRNGKeyArray):
        k = jr.split(key, 7)
        self.branch1x1 = BasicConv2d(in_channels, 64, 1, key=k[0])
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1, key=k[1])
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, key=k[2])
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, key=k[3])
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, key=k[4])
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, key=k[5])
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1, key=k[6])

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c2 h w"]:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(avg_pool_same(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, pool])


class InceptionB(eqx.Module):
    """Grid reduction 35 -> 17 (Mixed_6a)."""

    branch3x3: BasicConv2d
    branch3x3dbl_1: BasicConv2d
    branch3x3dbl_2: BasicConv2d
    branch3x3dbl_3: BasicConv2d

    def __init__(self, in_channels: int, *, key: PRNGKeyArray):
        k = jr.split(key, 4)
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2, key=k[0])
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, key=k[1])
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, key=k[2])
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, key=k[3])

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c2 h2 w2"]:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, max_pool(x, stride=2)])


class InceptionC(eqx.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..e; pytorch-fid's FIDInceptionC)."""

    branch1x1: BasicConv2d
    branch7x7_1: BasicConv2d
    branch7x7_2: BasicConv2d
    branch7x7_3: BasicConv2d
    branch7x7dbl_1: BasicConv2d
    branch7x7dbl_2: BasicConv2d
    branch7x7dbl_3: BasicConv2d
    branch7x7dbl_4: BasicConv2d
    branch7x7dbl_5: BasicConv2d
    branch_pool: BasicConv2d

    def __init__(self, in_channels: int, channels_7x7: int, *, key: PRNGKeyArray):
        k = jr.split(key, 10)
        c7, row, col = channels_7x7, (0, 3), (3, 0)  # paddings of the 1x7 and 7x1 convs
        self.branch1x1 = BasicConv2d(in_channels, 192, 1, key=k[0])
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, key=k[1])
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=row, key=k[2])
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=col, key=k[3])
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, key=k[4])
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=col, key=k[5])
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=row, key=k[6])
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=col, key=k[7])
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=row, key=k[8])
        self.branch_pool = BasicConv2d(in_channels, 192, 1, key=k[9])

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "768 h w"]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_2(self.branch7x7dbl_1(x))
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(d)))
        return jnp.concatenate([self.branch1x1(x), b7, d, self.branch_pool(avg_pool_same(x))])


class InceptionD(eqx.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    branch3x3_1: BasicConv2d
    branch3x3_2: BasicConv2d
    branch7x7x3_1: BasicConv2d
    branch7x7x3_2: BasicConv2d
    branch7x7x3_3: BasicConv2d
    branch7x7x3_4: BasicConv2d

    def __init__(self, in_channels: int, *, key: PRNGKeyArray):
        k = jr.split(key, 6)
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1, key=k[0])
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, key=k[1])
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1, key=k[2])
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), key=k[3])
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), key=k[4])
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, key=k[5])

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c2 h2 w2"]:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool(x, stride=2)])


class InceptionE(eqx.Module):
    """8x8 block with split 1x3/3x1 branches (Mixed_7b: avg pool, FIDInceptionE_1; Mixed_7c: max pool, _2)."""

    branch1x1: BasicConv2d
    branch3x3_1: BasicConv2d
    branch3x3_2a: BasicConv2d
    branch3x3_2b: BasicConv2d
    branch3x3dbl_1: BasicConv2d
    branch3x3dbl_2: BasicConv2d
    branch3x3dbl_3a: BasicConv2d
    branch3x3dbl_3b: BasicConv2d
    branch_pool: BasicConv2d
    pool: Literal["avg", "max"] = eqx.field(static=True)

    def __init__(self, in_channels: int, *, pool: Literal["avg", "max"], key: PRNGKeyArray):
        k = jr.split(key, 9)
        row, col = (0, 1), (1, 0)  # paddings of the 1x3 and 3x1 convs
        self.branch1x1 = BasicConv2d(in_channels, 320, 1, key=k[0])
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1, key=k[1])
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=row, key=k[2])
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=col, key=k[3])
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1, key=k[4])
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, key=k[5])
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=row, key=k[6])
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=col, key=k[7])
        self.branch_pool = BasicConv2d(in_channels, 192, 1, key=k[8])
        self.pool = pool

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "2048 h w"]:
        s = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # The 2015 graph max-pools in its last block; pytorch-fid keeps that quirk (FIDInceptionE_2).
        pooled = max_pool(x, stride=1, padding=1) if self.pool == "max" else avg_pool_same(x)
        branches = [self.branch1x1(x), self.branch3x3_2a(s), self.branch3x3_2b(s)]
        branches += [self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)]
        return jnp.concatenate(branches)


class FIDInceptionV3(eqx.Module):
    """FID Inception-v3 up to pool3. Field names follow torchvision/pytorch-fid, so state-dict keys map 1:1."""

    Conv2d_1a_3x3: BasicConv2d
    Conv2d_2a_3x3: BasicConv2d
    Conv2d_2b_3x3: BasicConv2d
    Conv2d_3b_1x1: BasicConv2d
    Conv2d_4a_3x3: BasicConv2d
    Mixed_5b: InceptionA
    Mixed_5c: InceptionA
    Mixed_5d: InceptionA
    Mixed_6a: InceptionB
    Mixed_6b: InceptionC
    Mixed_6c: InceptionC
    Mixed_6d: InceptionC
    Mixed_6e: InceptionC
    Mixed_7a: InceptionD
    Mixed_7b: InceptionE
    Mixed_7c: InceptionE

    def __init__(self, *, key: PRNGKeyArray):
        k = jr.split(key, 16)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, key=k[0])
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, key=k[1])
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, key=k[2])
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, key=k[3])
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, key=k[4])
        self.Mixed_5b = InceptionA(192, pool_features=32, key=k[5])
        self.Mixed_5c = InceptionA(256, pool_features=64, key=k[6])
        self.Mixed_5d = InceptionA(288, pool_features=64, key=k[7])
        self.Mixed_6a = InceptionB(288, key=k[8])
        self.Mixed_6b = InceptionC(768, channels_7x7=128, key=k[9])
        self.Mixed_6c = InceptionC(768, channels_7x7=160, key=k[10])
        self.Mixed_6d = InceptionC(768, channels_7x7=160, key=k[11])
        self.Mixed_6e = InceptionC(768, channels_7x7=192, key=k[12])
        self.Mixed_7a = InceptionD(768, key=k[13])
        self.Mixed_7b = InceptionE(1280, pool="avg", key=k[14])
        self.Mixed_7c = InceptionE(2048, pool="max", key=k[15])

    def pool3(self, x: Float[Array, "3 299 299"]) -> Float[Array, "2048"]:
        """Network body on an image already resized and in [-1, 1]: 299 -> 35 -> 17 -> 8 -> global mean."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(max_pool(x, stride=2)))
        x = max_pool(x, stride=2)
        blocks: tuple[Callable[[Array], Array], ...] = (
            *(self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a),
            *(self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e),
            *(self.Mixed_7a, self.Mixed_7b, self.Mixed_7c),
        )
        for block in blocks:
            x = block(x)
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, x: Float[Array, "3 h w"]) -> Float[Array, "2048"]:
        """pool3 features of one RGB image in [0, 1] of any size, as pytorch-fid's InceptionV3 (block 3).

        Bilinear resize to 299x299 (half-pixel centres, no antialiasing: torch's align_corners=False), then
        scaled to [-1, 1].
        """
        x = jax.image.resize(x, (3, INPUT_SIZE, INPUT_SIZE), method="bilinear", antialias=False)
        return self.pool3(2.0 * x - 1.0)


# ---------------------------------------------------------------------------------------------------------------
# State dict <-> module


def named_convs(model: FIDInceptionV3) -> list[tuple[str, BasicConv2d]]:
    """Every BasicConv2d with its dotted torch name ("Mixed_5b.branch1x1"), in definition order."""
    is_conv = lambda node: isinstance(node, BasicConv2d)  # noqa: E731
    flat, _ = jax.tree_util.tree_flatten_with_path(model, is_leaf=is_conv)
    # Paths are GetAttrKey entries: their .name is the field name, hence the torch name.
    names = [".".join(k.name for k in path) for path, _ in flat]
    return [(name, conv) for name, (_, conv) in zip(names, flat, strict=True) if is_conv(conv)]


def _skeleton() -> FIDInceptionV3:
    """The module's structure with ShapeDtypeStruct leaves: no weights are initialised."""
    return eqx.filter_eval_shape(FIDInceptionV3, key=jr.key(0))


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the loader needs, in pytorch-fid naming (fc.* and counters not needed)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, conv in named_convs(_skeleton()):
        out_channels = conv.weight.shape[0]
        shapes[f"{name}.conv.weight"] = tuple(conv.weight.shape)
        for suffix in BN_SUFFIXES[1:]:
            shapes[f"{name}.{suffix}"] = (out_channels,)
    return shapes


def _is_ignored_key(key: str) -> bool:
    """Keys of pt_inception that pool3 does not use: the 1008-way classifier and BN step counters."""
    return key.startswith("fc.") or key.endswith(".num_batches_tracked")


def _fold_batch_norm(sd: Mapping[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
    """conv weight * gamma / sqrt(var + eps), beta - mean * gamma / sqrt(var + eps), computed in float64."""
    w, gamma, beta, mean, var = (np.asarray(sd[f"{name}.{s}"], np.float64) for s in BN_SUFFIXES)
    scale = gamma / np.sqrt(var + BN_EPS)
    return (w * scale[:, None, None, None]).astype(np.float32), (beta - mean * scale).astype(np.float32)


def _check_state_dict(sd: Mapping[str, np.ndarray]) -> None:
    expected = state_dict_shapes()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(k for k in set(sd) - set(expected) if not _is_ignored_key(k))
    if missing or unexpected:
        raise ValueError(f"not an FID Inception state dict: missing {missing[:5]}, unexpected {unexpected[:5]}")
    bad = [(k, tuple(np.shape(sd[k])), s) for k, s in expected.items() if tuple(np.shape(sd[k])) != s]
    if bad:
        raise ValueError(f"FID Inception state dict has wrong shapes (name, got, expected): {bad[:5]}")


def inception_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> FIDInceptionV3:
    """Build the network from pytorch-fid-named arrays (conv.weight, bn.weight/bias/running_mean/running_var)."""
    _check_state_dict(state_dict)
    skeleton = _skeleton()
    folded = {name: _fold_batch_norm(state_dict, name) for name, _ in named_convs(skeleton)}
    is_conv = lambda node: isinstance(node, BasicConv2d)  # noqa: E731
    convs = [
        eqx.tree_at(lambda c: (c.weight, c.bias), conv, tuple(jnp.asarray(a) for a in folded[name]))
        for name, conv in named_convs(skeleton)
    ]
    treedef = jax.tree_util.tree_structure(skeleton, is_leaf=is_conv)
    return jax.tree_util.tree_unflatten(treedef, convs)


# ---------------------------------------------------------------------------------------------------------------
# Weight files


def missing_weights_message(where: str) -> str:
    """One line: what is missing, where to get it, and how to point ddpm-eqx at it."""
    return (
        f"FID Inception weights not found ({where}): download {FID_WEIGHTS_URL} and pass its path with "
        f"{WEIGHTS_FLAG} or set {WEIGHTS_ENV_VAR} (a .npz from ddpm_eqx.inception.convert_pth_to_npz works too)"
    )


def resolve_weights_path(path: str | os.PathLike[str] | None = None) -> Path:
    """`path`, else $DDPM_EQX_FID_WEIGHTS; FileNotFoundError (one line) when neither names an existing file."""
    if path is None:
        path = os.environ.get(WEIGHTS_ENV_VAR) or None
    if path is None:
        raise FileNotFoundError(missing_weights_message(f"no path given and {WEIGHTS_ENV_VAR} is unset"))
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(missing_weights_message(f"no file at {resolved}"))
    return resolved


def convert_pth_to_npz(pth: str | os.PathLike[str], npz: str | os.PathLike[str]) -> Path:
    """Rewrite pytorch-fid's .pth state dict as a .npz of the same named float32 arrays (needs torch)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {pth} needs torch; convert it once with convert_pth_to_npz where torch is") from e
    state_dict = torch.load(Path(pth), map_location="cpu", weights_only=True)
    arrays = {k: v.detach().cpu().numpy() for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    out = Path(npz)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(out)  # atomic: a killed conversion never leaves a truncated cache behind
    return out


def load_inception(path: str | os.PathLike[str] | None = None) -> FIDInceptionV3:
    """The FID network with weights from `path` or $DDPM_EQX_FID_WEIGHTS: a .npz, or a .pth (cached as .npz)."""
    resolved = resolve_weights_path(path)
    if resolved.suffix == ".pth":
        cached = resolved.with_suffix(".npz")
        resolved = cached if cached.is_file() else convert_pth_to_npz(resolved, cached)
    with np.load(resolved) as data:
        return inception_from_state_dict({k: data[k] for k in data.files})


def download_inception_weights(cache_dir: str | os.PathLike[str], *, timeout_s: float = 15.0) -> Path:
    """Fetch the .pth into `cache_dir` once (checking the sha256 prefix in its name); offline: FileNotFoundError."""
    target = Path(cache_dir) / WEIGHTS_FILENAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(FID_WEIGHTS_URL, timeout=timeout_s) as response:
            payload = response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise FileNotFoundError(missing_weights_message(f"download failed: {e}")) from None
    digest = hashlib.sha256(payload).hexdigest()
    if not digest.startswith(WEIGHTS_FILENAME.rsplit("-", 1)[1].split(".")[0]):
        raise ValueError(f"downloaded {FID_WEIGHTS_URL} has sha256 {digest}, which does not match its file name")
    target.write_bytes(payload)
    return target


# ---------------------------------------------------------------------------------------------------------------
# Batched features


@eqx.filter_jit
def _features_batch(model: FIDInceptionV3, images01: Float[Array, "b 3 h w"]) -> Float[Array, "b 2048"]:
    return jax.vmap(model)(images01)


def inception_features(
    model: FIDInceptionV3, images: Float[np.ndarray, "n c h w"], *, batch_size: int = 50
) -> Float[np.ndarray, "n 2048"]:
    """pool3 features of images in [-1, 1] (the diffusion model's layout); grayscale is repeated to RGB.

    The last batch is padded to `batch_size` so one compilation serves every batch.
    """
    if images.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {images.shape[1]}")
    out = np.empty((images.shape[0], FEATURE_DIM), np.float32)
    for start in range(0, images.shape[0], batch_size):
        chunk = np.asarray(images[start : start + batch_size], np.float32)
        n = chunk.shape[0]
        chunk = np.pad(chunk, ((0, batch_size - n), (0, 0), (0, 0), (0, 0)))
        chunk01 = np.broadcast_to((chunk + 1.0) / 2.0, (batch_size, 3, *chunk.shape[2:]))
        out[start : start + n] = np.asarray(_features_batch(model, jnp.asarray(chunk01)))[:n]
    return out
