"""How tests/data/legacy_oihw was written: run with a checkout of ddpm-eqx 31589f9 (the last version whose
U-Net stored eqx.nn.Conv2d kernels, OIHW) first on the path:

    PYTHONPATH=/path/to/checkout-31589f9:/path/to/checkout-31589f9/tests python tests/data/make_legacy_oihw.py OUT

A tiny self-conditioned, class-conditional U-Net, two Adam steps on one random batch, one checkpoint
(step 2), the config, and reference.npz: the model's and the EMA model's outputs for one input, and a
few optimizer moments as stored (OIHW). test_reliability.py restores it with today's code.
"""

import json
import shutil
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from test_train import TINY

from ddpm_eqx.checkpoint import Checkpointer
from ddpm_eqx.config import Config, apply_overrides, to_dict
from ddpm_eqx.parallel import make_mesh, replicate, shard_batch
from ddpm_eqx.step import make_train_step
from ddpm_eqx.train import build_state

out = Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
cfg = apply_overrides(Config(), TINY + ["ddpm.self_condition=true", "model.num_classes=3"])
mesh = make_mesh()
state, process, opt = build_state(cfg)
state, process = replicate(state, mesh), replicate(process, mesh)
step = make_train_step(cfg, process, opt, mesh)
rng = np.random.default_rng(0)
batch = shard_batch((rng.uniform(-1, 1, (8, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, 8).astype(np.int32)), mesh)
for _ in range(2):
    state, _ = step(state, *batch)
ckpt = Checkpointer(out / "checkpoints", async_save=False)
ckpt.save(2, state, None, {"step": 2, "config": to_dict(cfg), "time": 0.0})
ckpt.close()
x, sc = (rng.uniform(-1, 1, (1, 8, 8)).astype(np.float32) for _ in range(2))
ref = {"x": x, "x_self_cond": sc, "t": np.int32(37), "label": np.int32(1)}
for name, model in (("model", state.model), ("ema_model", state.ema_model)):
    ref[name] = np.asarray(model(jnp.asarray(x), jnp.int32(37), x_self_cond=jnp.asarray(sc), label=jnp.int32(1)))
adam = state.opt_state[0]
ref["mu_init_conv_weight"] = np.asarray(adam.mu.init_conv.weight)
ref["nu_init_conv_bias"] = np.asarray(adam.nu.init_conv.bias)
ref["mu_to_qkv_weight"] = np.asarray(adam.mu.downs[0].attn.fn.to_qkv.weight)
np.savez(out / "reference.npz", **ref)
(out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
