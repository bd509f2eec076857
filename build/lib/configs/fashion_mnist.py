"""The seed's Fashion-MNIST config (sized for a TPU v3-8 / one GPU): batch 1024, 28x28x1, 12k steps."""

from ddpm_eqx.config import Config, DataConfig, WandbConfig


def get_config() -> Config:
    return Config(
        data=DataConfig(dataset="fashion_mnist", batch_size=1024, image_size=28, channels=1),
        wandb=WandbConfig(project="ddpm-eqx-fashion-mnist"),
    )
