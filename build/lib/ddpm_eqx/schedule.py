"""Beta schedules, computed in float64 (numpy) and handed out as float64 arrays.

The diffusion module stores them as float32; computing in float64 first keeps
``alphas_cumprod`` (a product of up to thousands of factors) accurate.
"""

from __future__ import annotations

import math

import numpy as np
from jaxtyping import Float64

from ddpm_eqx.config import BetaSchedule

MAX_BETA = 0.999
"""Clip for the derived schedules: a beta of 1 would make the last step singular (Nichol & Dhariwal 2021)."""


def linear_beta_schedule(timesteps: int) -> Float64[np.ndarray, " T"]:
    """Ho et al. (2020): betas from 1e-4 to 0.02, rescaled by 1000/T so any T spans the same noise range."""
    scale = 1000.0 / timesteps
    if scale * 0.02 >= 1.0:
        raise ValueError(f"the linear schedule needs timesteps >= 21 (its last beta is 20/T), got {timesteps}")
    return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)


def _betas_from_alphas_cumprod(alphas_cumprod: Float64[np.ndarray, " T1"]) -> Float64[np.ndarray, " T"]:
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return np.clip(betas, 0.0, MAX_BETA)


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> Float64[np.ndarray, " T"]:
    """Nichol & Dhariwal (2021), eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)."""
    t = np.linspace(0, timesteps, timesteps + 1, dtype=np.float64) / timesteps
    alphas_cumprod = np.cos((t + s) / (1 + s) * math.pi * 0.5) ** 2
    return _betas_from_alphas_cumprod(alphas_cumprod)


def _sigmoid(x: Float64[np.ndarray, "..."]) -> Float64[np.ndarray, "..."]:
    return 1.0 / (1.0 + np.exp(-x))


def sigmoid_beta_schedule(
    timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0
) -> Float64[np.ndarray, " T"]:
    """Jabri et al. (2022, "Scalable adaptive computation"): alpha_bar follows a rescaled sigmoid.

    Better than cosine for images above 64x64, as lucidrains' implementation notes.
    """
    t = np.linspace(0, timesteps, timesteps + 1, dtype=np.float64) / timesteps
    v_start, v_end = 1.0 / (1.0 + math.exp(-start / tau)), 1.0 / (1.0 + math.exp(-end / tau))
    alphas_cumprod = (v_end - _sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
    return _betas_from_alphas_cumprod(alphas_cumprod)


def beta_schedule(name: BetaSchedule | str, timesteps: int) -> Float64[np.ndarray, " T"]:
    """The betas of the named schedule, float64."""
    if name == "linear":
        return linear_beta_schedule(timesteps)
    if name == "cosine":
        return cosine_beta_schedule(timesteps)
    if name == "sigmoid":
        return sigmoid_beta_schedule(timesteps)
    raise ValueError(f"unknown beta schedule {name!r}; use 'linear', 'cosine' or 'sigmoid'")
