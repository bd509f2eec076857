"""Oxford Flowers-102 with P2 loss weighting (Choi et al. 2022), gamma 1, k 1."""

import dataclasses

from configs import oxford102
from ddpm_eqx.config import Config


def get_config() -> Config:
    base = oxford102.get_config()
    return dataclasses.replace(
        base, ddpm=dataclasses.replace(base.ddpm, p2_loss_weight_gamma=1.0, p2_loss_weight_k=1.0)
    )
