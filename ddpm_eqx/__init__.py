"""ddpm-eqx: denoising diffusion (DDPM/DDIM) in JAX + Equinox."""

__version__ = "0.2.1"
