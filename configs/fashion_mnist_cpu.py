"""Fashion-MNIST on a 2-core CPU: recognisable samples in about 30 minutes (see the README).

A smaller U-Net (dim 32) and batch than the TPU config; the same process, loss and EMA.
"""

import dataclasses

from configs import fashion_mnist
from ddpm_eqx.config import Config


def get_config() -> Config:
    base = fashion_mnist.get_config()
    return dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, batch_size=64, cache=True),
        model=dataclasses.replace(base.model, dim=32, dim_mults=(1, 2, 4)),
        training=dataclasses.replace(
            base.training, num_train_steps=3000, log_every_steps=50, save_and_sample_every=500, num_sample=64
        ),
        optim=dataclasses.replace(base.optim, lr=1e-3),
        # Sample grids every 500 steps with DDIM-100: DDPM-1000 would take minutes each on 2 cores.
        sampling=dataclasses.replace(base.sampling, sampler="ddim", steps=100),
    )
