"""Samplers: DDPM ancestral sampling (Ho et al. 2020, Alg. 2) and DDIM (Song et al. 2021, eq. 12).

Each sampler is one ``lax.scan`` over the timesteps for one image; ``sample`` vmaps it over a batch
of keys and compiles the whole loop as one program. The network enters through a ``Guided``
callable ``(x_t, t, x_self_cond) -> model output``, built by ``guided`` with classifier-free
guidance (Ho & Salimans 2022) for class-conditional models.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, overload

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ddpm_eqx._types import Image, Images, KeysLike, Label
from ddpm_eqx.diffusion import Denoiser, GaussianDiffusion, check_model

Sampler = Literal["ddpm", "ddim"]
Guided = Callable[[Image, Int[Array, ""], "Image | None"], Image]


def guided(model: Denoiser, label: Label | None, guidance: float | Float[Array, ""] | None) -> Guided:
    """The network as the samplers call it.

    For a class-conditional model with ``label`` set, the output is
    ``uncond + guidance * (cond - uncond)`` (Ho & Salimans 2022, eq. 6 with w = guidance - 1):
    1 is plain conditional sampling, larger values trade diversity for fidelity. ``guidance`` may be an
    array (one program for every value); None, like 1, is no guidance (one network call per step).
    """

    def call(x: Image, t: Int[Array, ""], x_self_cond: Image | None) -> Image:
        cond = model(x, t, x_self_cond=x_self_cond, label=label)
        if label is None or guidance is None or (isinstance(guidance, (int, float)) and guidance == 1.0):
            return cond
        uncond = model(x, t, x_self_cond=x_self_cond, label=None)
        return uncond + guidance * (cond - uncond)

    return call


def ddpm_step(
    process: GaussianDiffusion, denoise: Guided, x: Image, x_self_cond: Image, t: Int[Array, ""], key: PRNGKeyArray
) -> tuple[Image, Image]:
    """One step of Ho et al. Alg. 2: x_{t-1} ~ q(x_{t-1} | x_t, x_0 = clip(x_0_hat)); no noise at t = 0."""
    out = denoise(x, t, x_self_cond if process.self_condition else None)
    pred = process.predictions(out, x, t, clip_x0=True)
    mean, _, log_variance = process.q_posterior(pred.pred_x0, x, t)
    noise = jax.random.normal(key, x.shape, x.dtype)
    return mean + jnp.where(t > 0, jnp.exp(0.5 * log_variance), 0.0) * noise, pred.pred_x0


def ddim_sigma(process: GaussianDiffusion, t: Int[Array, ""], t_prev: Int[Array, ""], eta: float) -> Float[Array, ""]:
    """sigma_t of Song et al. (2021, eq. 16); eta = 1 over all T steps is DDPM's posterior std."""
    ab = process.alphas_cumprod[t]
    ab_prev = jnp.where(t_prev >= 0, process.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
    return eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))


def ddim_step(
    process: GaussianDiffusion,
    denoise: Guided,
    x: Image,
    x_self_cond: Image,
    t: Int[Array, ""],
    t_prev: Int[Array, ""],
    eta: float,
    key: PRNGKeyArray,
) -> tuple[Image, Image]:
    """One step of Song et al. (2021, eq. 12) from t to t_prev (t_prev = -1: the clean image)."""
    out = denoise(x, t, x_self_cond if process.self_condition else None)
    pred = process.predictions(out, x, t, clip_x0=True)
    ab_prev = jnp.where(t_prev >= 0, process.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
    sigma = ddim_sigma(process, t, t_prev, eta)
    direction = jnp.sqrt(1.0 - ab_prev - sigma**2) * pred.pred_noise
    noise = jax.random.normal(key, x.shape, x.dtype)
    return jnp.sqrt(ab_prev) * pred.pred_x0 + direction + sigma * noise, pred.pred_x0


def ddim_timesteps(timesteps: int, steps: int) -> tuple[Int[Array, " n"], Int[Array, " n"]]:
    """The (t, t_prev) pairs of a DDIM pass: ``steps`` evenly spaced times from T-1 down to -1."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"DDIM steps must be in 1..{timesteps}, got {steps}")
    times = jnp.linspace(-1, timesteps - 1, steps + 1).round().astype(jnp.int32)[::-1]
    return times[:-1], times[1:]


def sample_image(
    process: GaussianDiffusion,
    denoise: Guided,
    shape: tuple[int, int, int],
    *,
    key: PRNGKeyArray,
    sampler: Sampler = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
) -> tuple[Image, Float[Array, "n c h w"]]:
    """Draw one image from x_T ~ N(0, I); returns it (clipped to [-1, 1]) and the path x_T..x_0."""
    if isinstance(eta, (int, float)) and not 0 <= eta <= 1:  # above 1, sqrt(1 - ab_prev - sigma^2) is NaN
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM's noise), got {eta}")
    init_key, loop_key = jax.random.split(key)
    x_T = jax.random.normal(init_key, shape)
    if sampler == "ddpm":
        ts = jnp.arange(process.timesteps - 1, -1, -1, dtype=jnp.int32)
        t_prevs = ts - 1
    else:
        ts, t_prevs = ddim_timesteps(process.timesteps, process.timesteps if steps is None else steps)

    def body(carry: tuple[Image, Image], inputs: tuple[Array, Array, Array]) -> tuple[tuple[Image, Image], Image]:
        x, x0 = carry
        t, t_prev, i = inputs
        step_key = jax.random.fold_in(loop_key, i)
        if sampler == "ddpm":
            x, x0 = ddpm_step(process, denoise, x, x0, t, step_key)
        else:
            x, x0 = ddim_step(process, denoise, x, x0, t, t_prev, eta, step_key)
        return (x, x0), x

    index = jnp.arange(ts.shape[0])
    (x, _), path = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T)), (ts, t_prevs, index))
    path = jnp.concatenate([x_T[None], path])
    return jnp.clip(x, -1.0, 1.0), path


def check_labels(model: Any, labels: Int[Array | np.ndarray, " b"] | None, *, null_class: bool = False) -> None:
    """A ``ValueError`` for concrete labels outside the model's classes (``null_class``: its null class, the
    label ``num_classes``, too): the embedding would clamp them to the null class, an unconditional draw."""
    num_classes = getattr(model, "num_classes", None)
    if labels is None or not isinstance(num_classes, int) or isinstance(labels, jax.core.Tracer):
        return
    values, top = np.asarray(labels), num_classes if null_class else num_classes - 1
    if values.size and (values.min() < 0 or values.max() > top):
        unconditional = f"the null class {num_classes}" if null_class else "None"
        raise ValueError(f"labels must be classes 0..{top} ({unconditional}: unconditional), got "
                         f"{values.min()}..{values.max()}")


@overload
def sample(
    process: GaussianDiffusion, model: Denoiser, keys: KeysLike, shape: tuple[int, int, int], *,
    sampler: Sampler = ..., steps: int | None = ..., eta: float = ..., labels: Int[Array | np.ndarray, " b"] | None = ...,
    guidance: float | Float[Array, ""] = ..., return_path: Literal[False] = ...,
) -> Images: ...


@overload
def sample(
    process: GaussianDiffusion, model: Denoiser, keys: KeysLike, shape: tuple[int, int, int], *,
    sampler: Sampler = ..., steps: int | None = ..., eta: float = ..., labels: Int[Array | np.ndarray, " b"] | None = ...,
    guidance: float | Float[Array, ""] = ..., return_path: Literal[True],
) -> tuple[Images, Float[Array, "b n c h w"]]: ...


@overload
def sample(
    process: GaussianDiffusion, model: Denoiser, keys: KeysLike, shape: tuple[int, int, int], *,
    sampler: Sampler = ..., steps: int | None = ..., eta: float = ..., labels: Int[Array | np.ndarray, " b"] | None = ...,
    guidance: float | Float[Array, ""] = ..., return_path: bool = ...,
) -> Images | tuple[Images, Float[Array, "b n c h w"]]: ...


def sample(
    process: GaussianDiffusion,
    model: Denoiser,
    keys: KeysLike,
    shape: tuple[int, int, int],
    *,
    sampler: Sampler = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    labels: Int[Array | np.ndarray, " b"] | None = None,
    guidance: float | Float[Array, ""] = 1.0,
    return_path: bool = False,
) -> Images | tuple[Images, Float[Array, "b n c h w"]]:
    """Draw ``len(keys)`` images, one per key (the same key gives the same image in any batch, up to float
    rounding: XLA may order a batch's arithmetic differently). Compiled once per shapes and options.

    ``labels`` (class-conditional models) picks each image's class, with ``guidance`` as in ``guided``: another
    guidance value reuses the compiled program. ``steps`` is DDIM's (None: all T); ``eta`` DDIM's noise.
    ``return_path`` also returns every intermediate x_t (memory: steps x image size per image).
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    if sampler == "ddpm" and (steps not in (None, process.timesteps) or eta != 0.0):
        raise ValueError("steps and eta are DDIM's: DDPM runs all the process's timesteps with its own noise; "
                         "pass sampler='ddim'")
    check_model(process, model)  # DDIM's steps are checked by ddim_timesteps, as the program is traced
    check_labels(model, labels)
    number = isinstance(guidance, (int, float))
    if number and guidance < 0:
        raise ValueError(f"guidance must be >= 0 (0: unconditional, 1: conditional, above: guided), got {guidance}")
    if labels is None and not (number and guidance == 1.0):  # it would be ignored
        raise ValueError("guidance needs labels: it mixes the class-conditional and the unconditional output; pass "
                         "labels, or leave guidance at 1.0")
    guide = None if labels is None or (number and guidance == 1.0) else guidance
    labels = None if labels is None else jnp.asarray(labels)
    return _sample(process, model, keys, shape, sampler=sampler, steps=steps, eta=eta, labels=labels,
                   guidance=None if guide is None else jnp.asarray(guide, jnp.float32), return_path=return_path)


@eqx.filter_jit
def _sample(
    process: GaussianDiffusion,
    model: Denoiser,
    keys: KeysLike,
    shape: tuple[int, int, int],
    *,
    sampler: Sampler,
    steps: int | None,
    eta: float,
    labels: Int[Array, " b"] | None,
    guidance: Float[Array, ""] | None,
    return_path: bool,
) -> Images | tuple[Images, Float[Array, "b n c h w"]]:
    def one(key: PRNGKeyArray, label: Label | None) -> tuple[Image, Float[Array, "n c h w"]]:
        denoise = guided(model, label, guidance)
        return sample_image(process, denoise, shape, key=key, sampler=sampler, steps=steps, eta=eta)

    if labels is None:
        images, paths = jax.vmap(lambda k: one(k, None))(keys)
    else:
        images, paths = jax.vmap(one)(keys, labels)
    return (images, paths) if return_path else images
