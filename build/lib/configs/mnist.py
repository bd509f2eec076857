"""MNIST with the Fashion-MNIST settings."""

import dataclasses

from configs import fashion_mnist
from ddpm_eqx.config import Config


def get_config() -> Config:
    base = fashion_mnist.get_config()
    return dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, dataset="mnist"),
        wandb=dataclasses.replace(base.wandb, project="ddpm-eqx-mnist"),
    )
