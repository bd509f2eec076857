"""Run configurations: each module exposes ``get_config() -> ddpm_eqx.config.Config``."""
