"""ddpm-eqx: denoising diffusion (DDPM/DDIM) in JAX + Equinox."""

from ddpm_eqx import _source  # noqa: F401  (the source as imported, for the stored traces' keys)

__version__ = "0.8.0"
