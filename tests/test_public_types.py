"""The public API's annotations accept what its code handles (conftest checks every call into ``ddpm_eqx`` at run
time, as mypy reads the annotations): Python ints for floats, NumPy images, ``sample``'s device output for the
image writers, and the older ``uint32`` keys. Each call here was refused with a ``TypeCheckError``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddpm_eqx.diffusion import GaussianDiffusion, diffusion_loss
from ddpm_eqx.images import make_grid, save_grid, save_trajectory
from ddpm_eqx.sample import sample
from ddpm_eqx.unet import UNet
from test_sample import GaussianOracle


def test_ints_where_floats_are_annotated_and_numpy_images_are_accepted():
    process = GaussianDiffusion(timesteps=10, beta_schedule_name="cosine", min_snr_gamma=5, p2_loss_weight_gamma=1)
    floats = GaussianDiffusion(timesteps=10, beta_schedule_name="cosine", min_snr_gamma=5.0, p2_loss_weight_gamma=1.0)
    np.testing.assert_array_equal(process.loss_weight, floats.loss_weight)
    model = UNet(dim=8, channels=1, image_size=8, dim_mults=[1, 2], resnet_block_groups=4, attn_heads=1,
                 attn_dim_head=8, dropout=0, num_classes=3, key=jax.random.key(0))
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 8, 8)
    np.testing.assert_array_equal(model(x, 3, label=np.int64(1)), model(jnp.asarray(x), jnp.asarray(3), label=1))
    oracle = GaussianOracle(process.alphas_cumprod, 0.0, 0.5, "pred_noise", label_shift=0.1)
    loss = diffusion_loss(process, oracle, jnp.asarray(x), key=jax.random.key(1), label=2)
    assert np.isfinite(loss)


def test_sample_takes_the_older_uint32_keys_and_its_output_goes_to_the_image_writers(tmp_path):
    process = GaussianDiffusion(timesteps=10, beta_schedule_name="cosine")
    oracle = GaussianOracle(process.alphas_cumprod, 0.0, 0.5, "pred_noise")
    typed = sample(process, oracle, jax.random.split(jax.random.key(0), 4), (1, 4, 4), sampler="ddim", steps=2, eta=1)
    legacy = sample(process, oracle, jax.random.split(jax.random.PRNGKey(0), 4), (1, 4, 4), sampler="ddim", steps=2,
                    eta=1)
    np.testing.assert_array_equal(legacy, typed)  # the same random bits, in either kind of key
    np.testing.assert_array_equal(np.asarray(Image.open(save_grid(typed, tmp_path / "grid.png"))),
                                  make_grid(np.asarray(typed))[..., 0])
    _, path = sample(process, oracle, jax.random.split(jax.random.key(0), 2), (1, 4, 4), return_path=True)
    assert save_trajectory(path, tmp_path / "path.png").is_file()
    with pytest.raises(ValueError, match="^no images to tile into a grid$"):  # was a ZeroDivisionError
        make_grid(np.zeros((0, 1, 4, 4), np.float32))
