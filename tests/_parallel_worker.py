"""Run a few train steps of a tiny model on meshes of N fake CPU devices, for each N given, in one process;
save each run's parameters (for test_parallel). One process: its imports and JAX's tracing caches are paid once."""

import sys
from pathlib import Path

from ddpm_eqx.parallel import set_host_device_count

set_host_device_count(max(int(n) for n in sys.argv[1].split(",")))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import psutil  # noqa: E402

from ddpm_eqx.config import Config, apply_overrides  # noqa: E402
from ddpm_eqx.parallel import check_fits_in_memory, make_mesh, replicate, shard_batch  # noqa: E402
from ddpm_eqx.state import init_state  # noqa: E402
from ddpm_eqx.step import make_train_step  # noqa: E402
from ddpm_eqx.train import build_model  # noqa: E402
from ddpm_eqx.diffusion import make_diffusion  # noqa: E402

TINY = ["model.dim=8", "model.dim_mults=1,2", "model.resnet_block_groups=4", "model.attn_heads=1",
        "model.attn_dim_head=8", "data.image_size=8", "data.batch_size=8", "ddpm.timesteps=100",
        "ddpm.self_condition=true"]


def memory_checks(mesh: jax.sharding.Mesh) -> list[bool]:
    """Whether ``check_fits_in_memory`` passes a program on ``mesh`` with exactly its temporaries times the mesh's
    devices free, and refuses it with a byte less: the devices of the mesh count, not all of the process's."""
    program = jax.jit(lambda x: (x @ x.T) @ x)  # x @ x.T is a temporary under any fusion of the flags
    x = replicate(np.ones((64, 64), np.float32), mesh)
    need = program.lower(x).compile().memory_analysis().temp_size_in_bytes * mesh.devices.size
    assert need > 0
    real, results = psutil.virtual_memory, []
    for available in (need, need - 1):
        psutil.virtual_memory = lambda: real()._replace(available=available)  # noqa: B023  (called at once)
        try:
            check_fits_in_memory("the program", program, x)
            results.append(True)
        except RuntimeError:
            results.append(False)
        finally:
            psutil.virtual_memory = real
    return results


def main(counts: list[int], out: Path, optimizer_name: str) -> None:
    cfg = apply_overrides(Config(), TINY)
    optimizer = optax.sgd(1e-3) if optimizer_name == "sgd" else optax.adam(1e-3)
    model = build_model(cfg)
    for devices in counts:
        mesh = make_mesh(jax.devices()[:devices])
        state = replicate(init_state(model, optimizer), mesh)
        initial = [np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(state.model, eqx.is_inexact_array))]
        process = replicate(make_diffusion(cfg.ddpm, "l2"), mesh)
        step = make_train_step(cfg, process, optimizer, mesh)
        rng = np.random.default_rng(0)
        for _ in range(3):
            images = rng.uniform(-1, 1, (8, 1, 8, 8)).astype(np.float32)
            labels = np.zeros((8,), np.int32)
            state, metrics = step(state, *shard_batch((images, labels), mesh))
        assert {d for x in jax.tree_util.tree_leaves(eqx.filter(state, eqx.is_array)) for d in x.devices()} == set(
            mesh.devices.flat)
        leaves = jax.tree_util.tree_leaves(eqx.filter(state.model, eqx.is_inexact_array))
        moved = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(leaves, initial))
        np.savez(out / f"{devices}.npz", *[np.asarray(x) for x in leaves], loss=np.asarray(metrics["loss"]),
                 traces=step.traces, moved=moved, memory_checks=memory_checks(mesh))


if __name__ == "__main__":
    main([int(n) for n in sys.argv[1].split(",")], Path(sys.argv[2]), sys.argv[3])
