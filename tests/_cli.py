"""Helpers for the end-to-end tests: run the CLI in a subprocess at a tiny size."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.dim=8", "model.dim_mults=1,2", "model.resnet_block_groups=4", "model.attn_heads=1",
        "model.attn_dim_head=8", "data.image_size=8", "data.batch_size=8", "ddpm.timesteps=1000",
        "sampling.sampler=ddim", "sampling.steps=5", "training.num_sample=0", "training.log_every_steps=2",
        "training.save_and_sample_every=2", "training.max_to_keep=10"]
SAMPLES = "training.num_sample=4"
"""Sample grids at every checkpoint (TINY has none: the sampler's first call costs a CLI run ~5 s of tracing,
and only the reference run and the multi-process run look at the grids)."""


def in_process_sets(data_dir: str) -> list[str]:
    """The 8-step tiny fashion_mnist run that in-process tests share (disk-full, input-bound, the accelerator
    warning): one program, compiled once into the run's persistent cache."""
    return [*TINY, f"data.data_dir={data_dir}", "training.num_train_steps=8", "wandb.mode=disabled"]


def in_process_config(data_dir: str):  # noqa: ANN201
    """:func:`in_process_sets` over ``configs/fashion_mnist.py``, as ``ddpm-eqx train --dataset fashion_mnist``
    resolves it."""
    from ddpm_eqx.config import apply_overrides, load_config_file

    return apply_overrides(load_config_file(ROOT / "configs" / "fashion_mnist.py"), in_process_sets(data_dir))


FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
"""What conftest adds to ``XLA_FLAGS``: the tests compile far more than they compute. No LLVM optimisation, and
XLA:CPU's older (elemental) fusion emitter: together they compile the tiny train step's XLA part in 7.7 s instead
of 12 s (level 0 alone) here. Neither is for the product: on the seed's model at the default level the older
emitter compiles slower (31 -> 43 s) and steps no faster (benchmarks/RESULTS.md, session 34)."""


def _cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), *args]


def _env(tmp_path: Path, *, optimised: bool = False) -> dict[str, str]:
    """The CLI's environment; ``optimised`` drops conftest's :data:`FAST_COMPILE` for a run that computes more
    than it compiles (the eval command trains a classifier: 83 s at the default level, 284 s at 0)."""
    env = dict(os.environ)
    if optimised:
        env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if f not in FAST_COMPILE)
    env.pop("DDPM_EQX_MALLOC", None)  # the CLI's default allocator (ddpm_eqx.allocator)
    # Identical programs compile (and trace) once across the whole run's processes: conftest's persistent cache,
    # shared by the xdist workers, in-process tests and the CLI processes they start.
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    return env


def _train_args(data_dir: Path, workdir: Path, steps: int, *extra: str) -> list[str]:
    sets = [*TINY, f"data.data_dir={data_dir}", f"training.num_train_steps={steps}", *extra]
    return _cmd("train", "--dataset", "fashion_mnist", "--workdir", str(workdir), "--host-devices", "2",
                *[a for s in sets for a in ("--set", s)])


def _train(data_dir, workdir, steps, tmp_path, *extra, check=True, env=None):  # noqa: ANN001, ANN202
    """A tiny CLI run to completion; ``env``: another environment than ``_env(tmp_path)``."""
    return subprocess.run(_train_args(data_dir, workdir, steps, *extra), env=env or _env(tmp_path),
                          capture_output=True, text=True, check=check, timeout=600)


def _final_params(workdir: Path, step: int) -> list[np.ndarray]:
    import equinox as eqx
    import jax
    from ddpm_eqx.checkpoint import Checkpointer
    from ddpm_eqx.config import from_json
    from ddpm_eqx.train import state_skeleton

    cfg = from_json((workdir / "config.json").read_text())
    skeleton = state_skeleton(cfg)
    found = Checkpointer(workdir / "checkpoints", read_only=True).restore_latest(skeleton, step=step)
    assert found is not None
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(found[1], eqx.is_array))]


def _committed(workdir: Path) -> list[int]:
    """Steps Orbax has finished writing (it marks each with commit_success.txt before listing it)."""
    root = workdir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())
