"""The seed's Oxford Flowers-102 config: 128px, dim_mults (1,2,4,8), cosine schedule, lr 2e-4, batch 64."""

from ddpm_eqx.config import Config, DataConfig, DDPMConfig, ModelConfig, OptimConfig, TrainingConfig, WandbConfig


def get_config() -> Config:
    return Config(
        data=DataConfig(dataset="oxford_flowers102", batch_size=64, image_size=128, channels=3),
        model=ModelConfig(dim=64, dim_mults=(1, 2, 4, 8)),
        training=TrainingConfig(num_train_steps=700_000, num_sample=64),
        ddpm=DDPMConfig(beta_schedule="cosine"),
        optim=OptimConfig(lr=2e-4),
        wandb=WandbConfig(project="ddpm-eqx-oxford102"),
    )
