"""Oxford Flowers-102 with P2 weighting and self-conditioning."""

import dataclasses

from configs import oxford102_p2
from ddpm_eqx.config import Config


def get_config() -> Config:
    base = oxford102_p2.get_config()
    return dataclasses.replace(base, ddpm=dataclasses.replace(base.ddpm, self_condition=True))
