"""The seed's CIFAR-10 config: cosine schedule, self-conditioning, 700k steps, 36 samples."""

from ddpm_eqx.config import Config, DataConfig, DDPMConfig, ModelConfig, TrainingConfig, WandbConfig


def get_config() -> Config:
    return Config(
        data=DataConfig(dataset="cifar10", batch_size=1024, image_size=32, channels=3),
        model=ModelConfig(dim=64, dim_mults=(1, 2, 4, 8)),
        ddpm=DDPMConfig(beta_schedule="cosine", self_condition=True),
        training=TrainingConfig(num_train_steps=700_000, num_sample=36),
        wandb=WandbConfig(project="ddpm-eqx-cifar10"),
    )
