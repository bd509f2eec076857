"""Fashion-MNIST on a 2-core CPU: recognisable samples in about 30 minutes (figures in the README).

The same process, loss (l1, eps-prediction, linear schedule, T=1000) and EMA as the seed's TPU config,
with a U-Net of dim 16 (724k parameters instead of 10M) and batch 32: measured 1.40-1.72 steps/s (median
1.52) on 2 cores (2 XLA host devices); 2800 steps took 33.7 minutes end to end, so 2500 steps take about 30.
On an AMD Zen 5 with AVX-512 (session 37): 5.3-5.5 steps/s, 9 minutes end to end.
"""

import dataclasses

from configs import fashion_mnist
from ddpm_eqx.config import Config


def get_config() -> Config:
    base = fashion_mnist.get_config()
    return dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, batch_size=32),  # 2500 x 32 images: the split is cached (data.cache)
        model=dataclasses.replace(base.model, dim=16, dim_mults=(1, 2, 4)),
        training=dataclasses.replace(
            base.training, num_train_steps=2500, log_every_steps=50, save_and_sample_every=500, num_sample=64
        ),
        # Sample grids with DDIM-100: DDPM-1000 would take ~5 minutes each on 2 cores.
        sampling=dataclasses.replace(base.sampling, sampler="ddim", steps=100),
    )
