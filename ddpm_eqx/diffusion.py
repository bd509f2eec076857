"""The Gaussian diffusion process of Ho et al. (2020) as an Equinox module, and its training loss.

The network is passed in (EDM, improved-diffusion): this module never imports the U-Net, only the
``Denoiser`` protocol below. Everything here is per example; callers ``vmap`` over the batch.

Notation follows the paper: ``alphas_cumprod`` is alpha_bar_t, ``posterior_*`` are the moments of
q(x_{t-1} | x_t, x_0) (eqs. 6-7). Index t runs over 0..T-1 (the paper's 1..T).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from ddpm_eqx._types import Image, ImageLike, LabelLike, Scalar
from ddpm_eqx.config import DDPMConfig, LossType, Objective
from ddpm_eqx.schedule import beta_schedule


@runtime_checkable
class Denoiser(Protocol):
    """What the process needs of a network: the U-Net's per-image call."""

    def __call__(
        self,
        x: Image,
        t: Int[Array, ""],
        *,
        x_self_cond: Image | None = None,
        label: LabelLike | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool = True,
    ) -> Image: ...


class Predictions(NamedTuple):
    pred_noise: Image
    pred_x0: Image


def _f32(x: np.ndarray) -> Float[Array, " T"]:
    return jnp.asarray(x, dtype=jnp.float32)


class GaussianDiffusion(eqx.Module):
    """Forward process, posterior, parameterisations and loss weights for T steps."""

    timesteps: int = eqx.field(static=True)
    objective: Objective = eqx.field(static=True)
    loss_type: LossType = eqx.field(static=True)
    self_condition: bool = eqx.field(static=True)
    offset_noise_strength: float = eqx.field(static=True)
    betas: Float[Array, " T"]
    alphas_cumprod: Float[Array, " T"]
    alphas_cumprod_prev: Float[Array, " T"]
    sqrt_alphas_cumprod: Float[Array, " T"]
    sqrt_one_minus_alphas_cumprod: Float[Array, " T"]
    posterior_variance: Float[Array, " T"]
    posterior_log_variance_clipped: Float[Array, " T"]
    posterior_mean_coef1: Float[Array, " T"]
    posterior_mean_coef2: Float[Array, " T"]
    loss_weight: Float[Array, " T"]

    def __init__(
        self,
        *,
        timesteps: int = 1000,
        beta_schedule_name: str = "linear",
        objective: Objective = "pred_noise",
        loss_type: LossType = "l1",
        self_condition: bool = False,
        p2_loss_weight_gamma: float = 0.0,
        p2_loss_weight_k: float = 1.0,
        min_snr_gamma: float | None = None,
        offset_noise_strength: float = 0.0,
    ):
        _check_process(timesteps=timesteps, objective=objective, loss_type=loss_type, min_snr_gamma=min_snr_gamma,
                       offset_noise_strength=offset_noise_strength)
        self.timesteps = timesteps
        self.objective = objective
        self.loss_type = loss_type
        self.self_condition = self_condition
        self.offset_noise_strength = offset_noise_strength
        # Everything is derived in float64, then stored as float32.
        betas = beta_schedule(beta_schedule_name, timesteps)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        # alpha_bar_{-1} = 1: at t = 0 the posterior is a point mass on x_0 (the seed wrapped to t = T-1).
        alphas_cumprod_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.betas = _f32(betas)
        self.alphas_cumprod = _f32(alphas_cumprod)
        self.alphas_cumprod_prev = _f32(alphas_cumprod_prev)
        # Taken here, not from the float32 alpha_bar: 1 - alpha_bar near t = 0 would keep few float32 digits.
        self.sqrt_alphas_cumprod = _f32(np.sqrt(alphas_cumprod))
        self.sqrt_one_minus_alphas_cumprod = _f32(np.sqrt(1.0 - alphas_cumprod))
        self.posterior_variance = _f32(posterior_variance)
        # The variance is 0 at t = 0: clipped before the log, as lucidrains' code does (Ho et al.'s takes t = 1's);
        # the samplers add no noise at t = 0, so only the log is affected.
        self.posterior_log_variance_clipped = _f32(np.log(np.maximum(posterior_variance, 1e-20)))
        self.posterior_mean_coef1 = _f32(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod))
        self.posterior_mean_coef2 = _f32((1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod))
        self.loss_weight = _f32(
            loss_weights(alphas_cumprod, objective, p2_loss_weight_gamma, p2_loss_weight_k, min_snr_gamma)
        )

    # --- the forward process and the parameterisations -------------------------------------------

    def q_sample(self, x0: Image, t: Int[Array, ""], noise: Image) -> Image:
        """x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Ho et al. eq. 4)."""
        return self.sqrt_alphas_cumprod[t] * x0 + self.sqrt_one_minus_alphas_cumprod[t] * noise

    def predict_start_from_noise(self, x_t: Image, t: Int[Array, ""], noise: Image) -> Image:
        return (x_t - self.sqrt_one_minus_alphas_cumprod[t] * noise) / self.sqrt_alphas_cumprod[t]

    def predict_noise_from_start(self, x_t: Image, t: Int[Array, ""], x0: Image) -> Image:
        return (x_t - self.sqrt_alphas_cumprod[t] * x0) / self.sqrt_one_minus_alphas_cumprod[t]

    def predict_v(self, x0: Image, t: Int[Array, ""], noise: Image) -> Image:
        """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022, sec. 4)."""
        return self.sqrt_alphas_cumprod[t] * noise - self.sqrt_one_minus_alphas_cumprod[t] * x0

    def predict_start_from_v(self, x_t: Image, t: Int[Array, ""], v: Image) -> Image:
        return self.sqrt_alphas_cumprod[t] * x_t - self.sqrt_one_minus_alphas_cumprod[t] * v

    def q_posterior(self, x0: Image, x_t: Image, t: Int[Array, ""]) -> tuple[Image, Scalar, Scalar]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7)."""
        mean = self.posterior_mean_coef1[t] * x0 + self.posterior_mean_coef2[t] * x_t
        return mean, self.posterior_variance[t], self.posterior_log_variance_clipped[t]

    def predictions(self, model_output: Image, x_t: Image, t: Int[Array, ""], *, clip_x0: bool) -> Predictions:
        """Turn the network's output (per ``objective``) into (eps, x_0) estimates.

        With ``clip_x0`` the x_0 estimate is clipped to the data range [-1, 1] and eps is re-derived
        from it, so the two stay consistent (as DDIM sampling needs).
        """
        check_output(model_output, x_t)
        if self.objective == "pred_noise":
            pred_noise = model_output
            pred_x0 = self.predict_start_from_noise(x_t, t, pred_noise)
        elif self.objective == "pred_x0":
            pred_x0 = model_output
            pred_noise = self.predict_noise_from_start(x_t, t, pred_x0)
        else:
            pred_x0 = self.predict_start_from_v(x_t, t, model_output)
            pred_noise = self.predict_noise_from_start(x_t, t, pred_x0)
        if clip_x0:
            pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
            pred_noise = self.predict_noise_from_start(x_t, t, pred_x0)
        return Predictions(pred_noise, pred_x0)

    def target(self, x0: Image, t: Int[Array, ""], noise: Image) -> Image:
        """What the network is trained to output, per ``objective``."""
        if self.objective == "pred_noise":
            return noise
        if self.objective == "pred_x0":
            return x0
        return self.predict_v(x0, t, noise)


_OBJECTIVES, _LOSS_TYPES = ("pred_noise", "pred_x0", "pred_v"), ("l1", "l2")


def _check_process(*, timesteps: int, objective: str, loss_type: str, min_snr_gamma: float | None,
                   offset_noise_strength: float) -> None:
    """One-line errors for arguments that would otherwise fall through to another branch (an unknown objective
    trained as pred_v, an unknown loss as l2) or divide by zero."""
    if objective not in _OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(_OBJECTIVES)}, got {objective!r}")
    if loss_type not in _LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(_LOSS_TYPES)}, got {loss_type!r}")
    if timesteps < 1:
        raise ValueError(f"timesteps must be positive, got {timesteps}")
    if min_snr_gamma is not None and not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be positive (None: no min-SNR weighting), got {min_snr_gamma}")
    if not offset_noise_strength >= 0:
        raise ValueError(f"offset_noise_strength must be >= 0, got {offset_noise_strength}")


def check_output(model_output: Array, x: Array) -> None:
    """The network must predict an image of ``x``'s shape (a U-Net with ``out_dim`` = its ``channels``): a
    narrower output was broadcast against x_t (trained and sampled silently), a wider one failed deep inside."""
    if model_output.shape != x.shape:
        raise ValueError(f"the network's output has shape {model_output.shape}, the images {x.shape}: the process "
                         "needs an image back (a UNet's out_dim must equal its channels)")


def check_model(process: GaussianDiffusion, model: object) -> None:
    """A network built for self-conditioning with a process without it (or the other way round) ran silently:
    the self-conditioning pass was thrown away, or the network was sampled with zeros for its second input."""
    wants = getattr(model, "self_condition", None)
    if isinstance(wants, bool) and wants != process.self_condition:
        raise ValueError(f"the network was built with self_condition={wants}, the process with "
                         f"self_condition={process.self_condition}; build both with the same value")


def loss_weights(
    alphas_cumprod: Float[np.ndarray, " T"],
    objective: Objective,
    p2_gamma: float,
    p2_k: float,
    min_snr_gamma: float | None,
) -> Float[np.ndarray, " T"]:
    """Per-timestep loss weights: P2 (Choi et al. 2022, eq. 8) times min-SNR-gamma (Hang et al. 2023).

    P2: w_t = 1 / (k + SNR_t)^gamma, gamma = 0 gives 1 everywhere.
    Min-SNR: min(SNR_t, gamma) expressed for the objective: divided by SNR for eps-prediction,
    by (SNR + 1) for v-prediction, as is for x_0-prediction.
    """
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    weight = (p2_k + snr) ** -p2_gamma
    if min_snr_gamma is not None:
        clipped = np.minimum(snr, min_snr_gamma)
        divisor = {"pred_noise": snr, "pred_x0": np.ones_like(snr), "pred_v": snr + 1.0}[objective]
        weight = weight * clipped / divisor
    return weight


def make_diffusion(cfg: DDPMConfig, loss_type: LossType) -> GaussianDiffusion:
    return GaussianDiffusion(
        timesteps=cfg.timesteps,
        beta_schedule_name=cfg.beta_schedule,
        objective=cfg.resolved_objective,
        loss_type=loss_type,
        self_condition=cfg.self_condition,
        p2_loss_weight_gamma=cfg.p2_loss_weight_gamma,
        p2_loss_weight_k=cfg.p2_loss_weight_k,
        min_snr_gamma=cfg.min_snr_gamma,
        offset_noise_strength=cfg.offset_noise_strength,
    )


def diffusion_loss(
    process: GaussianDiffusion,
    model: Denoiser,
    x0: ImageLike,
    *,
    key: PRNGKeyArray,
    label: LabelLike | None = None,
    use_self_cond: Bool[ArrayLike, ""] | None = None,
) -> Scalar:
    """The (weighted) simple loss of Ho et al. (2020, eq. 14) for one image.

    Draws t ~ U{0..T-1} and eps ~ N(0, I) (plus offset noise, Guttenberg 2023, when enabled).
    With self-conditioning (Chen et al. 2022, "Analog Bits", sec. 3) half the time the network
    first predicts x_0 without it; that estimate, with the gradient stopped, is fed back in.
    Pass ``use_self_cond`` (one coin for the whole batch, unbatched under ``vmap``) to keep the
    extra forward pass a real branch: a per-example coin under ``vmap`` makes ``lax.cond`` a select
    that always pays for both branches.

    ``label`` is used as given: for classifier-free guidance the null class must be trained too, by
    replacing labels with it (index ``num_classes``) with some probability, as
    ``ddpm_eqx.step.example_loss`` does with the config's ``training.cond_drop_prob``; a model never
    trained on it is guided by an untrained embedding row.
    """
    check_model(process, model)
    x0 = jnp.asarray(x0)
    t_key, noise_key, offset_key, sc_key, sc_model_key, model_key = jax.random.split(key, 6)
    t = jax.random.randint(t_key, (), 0, process.timesteps)
    noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
    if process.offset_noise_strength > 0:
        offset = jax.random.normal(offset_key, (x0.shape[0], 1, 1), x0.dtype)
        noise = noise + process.offset_noise_strength * offset
    x_t = process.q_sample(x0, t, noise)

    x_self_cond = None
    if process.self_condition:
        # The gradient stopped at the weights, before the cond, not only at its output: a cond whose inputs carry
        # no tangent is not differentiated, where one that closes over the weights has both branches linearised.
        frozen = eqx.combine(jax.lax.stop_gradient(eqx.filter(model, eqx.is_array)), model)

        def estimate_x0() -> Image:
            out = frozen(x_t, t, x_self_cond=None, label=label, key=sc_model_key, inference=False)
            return jax.lax.stop_gradient(process.predictions(out, x_t, t, clip_x0=False).pred_x0)

        use = jax.random.bernoulli(sc_key, 0.5) if use_self_cond is None else use_self_cond
        # Both branches are traced, but only the taken one runs: lax.cond skips the extra forward pass.
        x_self_cond = jax.lax.cond(use, estimate_x0, lambda: jnp.zeros_like(x0))

    out = model(x_t, t, x_self_cond=x_self_cond, label=label, key=model_key, inference=False)
    check_output(out, x_t)
    diff = out - process.target(x0, t, noise)
    per_pixel = jnp.abs(diff) if process.loss_type == "l1" else jnp.square(diff)
    return jnp.mean(per_pixel) * process.loss_weight[t]
