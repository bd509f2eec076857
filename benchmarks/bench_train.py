"""Train-step and sampler performance for a config and batch, measured in one process.

    python benchmarks/bench_train.py [--config configs/fashion_mnist.py] [--batch 32] [--host-devices N]
        [--steps 20] [--sample-batch 64] [--sample-steps 10] [--loader-batches 50] [--set key=value ...] [--json]

Prints: parameters, compile time of the train step (and its tracing part), steps/s (median over
--steps), images/s, the model's FLOPs per step by XLA's own cost analysis, achieved GFLOP/s, the
float32 matmul peak measured in the same run (a 2048x2048 jnp.dot), their ratio; on a TPU/GPU listed in
PUBLISHED_BF16_TFLOPS (or with --peak-tflops) the MFU against the chip's published bf16 peak; the compile time of
the default sampler over all timesteps (DDPM-1000, one lax.scan; compiled, not run), the timed DDIM
sampler's compile + first call and per-step time (DDPM-1000 and DDIM-50 images/s follow from it: every
sampler step is one network call on the batch); the config's own loader at that batch (time to the first
batch, images/s over --loader-batches more, whether it gathers from the decoded split; the dataset must be
prepared or preparable offline); peak RSS, and the kernel time and page faults per train
step (XLA:CPU allocates each execution's temporaries afresh: benchmarks/RESULTS.md, session 7). The
defaults are the seed's fashion_mnist architecture at batch 32. Like `ddpm-eqx`, it re-executes itself
under the caching allocator (ddpm_eqx/allocator.py; `malloc` in the output); DDPM_EQX_MALLOC=system
measures glibc's instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm_eqx import allocator  # noqa: E402
from ddpm_eqx.parallel import set_host_device_count  # noqa: E402

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from ddpm_eqx.config import Config
    from ddpm_eqx.state import TrainState
    from ddpm_eqx.step import TrainStep


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
    import jax

    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


# Dense bf16 peak per JAX device (TFLOP/s, without sparsity), from the vendors' spec sheets, matched in order
# against `device.device_kind`: the MFU "against the chip's published peak".
PUBLISHED_BF16_TFLOPS = (
    ("TPU v6 lite", 918.0),  # v6e (Trillium), cloud.google.com/tpu/docs/v6e
    ("TPU v5 lite", 197.0),  # v5e, cloud.google.com/tpu/docs/v5e
    ("TPU v5", 459.0),  # v5p
    ("TPU v4", 275.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
)


def published_peak_tflops(device_kind: str) -> float | None:
    """The chip's published dense bf16 peak, or None where it is not listed (CPUs)."""
    return next((peak for name, peak in PUBLISHED_BF16_TFLOPS if name in device_kind), None)


def checkpoint_figures(state: object, saves: int, *, jax_arrays: bool = False) -> dict[str, float | int]:
    """What a run pays per checkpoint of ``state``: the time ``Checkpointer.save`` blocks the training loop
    (first save, then the median of the others) and until the checkpoint is committed (median), and how much
    resident memory each save after the first leaves behind (Orbax's save path keeps some: README,
    Reliability; a steady figure needs 20 saves or more).

    ``jax_arrays``: save the ``jax.Array`` objects themselves, through Orbax's stock handler (replica-parallel
    writes: what a multi-process run does), instead of a single process's NumPy arrays."""
    import tempfile

    import equinox as eqx
    import jax

    from ddpm_eqx import checkpoint

    if jax_arrays:
        checkpoint._as_saved = lambda arrays: arrays
    import psutil

    blocking, committed, rss = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_") as directory:
        ckpt = checkpoint.Checkpointer(directory, max_to_keep=2)
        for i in range(saves):
            t = time.perf_counter()
            ckpt.save(i, state, {}, {})
            blocking.append(time.perf_counter() - t)
            ckpt.wait()
            committed.append(time.perf_counter() - t)
            rss.append(psutil.Process().memory_info().rss)
        ckpt.close()
    return {"checkpoint_first_save_s": blocking[0], "checkpoint_save_s": statistics.median(blocking[1:] or blocking),
            "checkpoint_committed_s": statistics.median(committed[1:] or committed),
            "checkpoint_arrays": len(jax.tree_util.tree_leaves(eqx.filter(state, eqx.is_array))),
            "checkpoint_rss_kib_per_save": (rss[-1] - rss[0]) / 1024 / max(saves - 1, 1)}


def loader_figures(cfg: Config, batches: int) -> dict[str, float | int | str | bool]:
    """The run's loader for ``cfg`` (its dataset and batch, and the cache decision a run of
    ``training.num_train_steps`` gets): the time to its first batch (opening the split; with the cache,
    decoding it into memory) and images/s over ``batches`` more. A dataset that is not prepared and cannot be
    (offline, no archives in its manual dir) gives ``loader_error`` instead."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_data.py, beside this file
    from bench_data import measure

    from ddpm_eqx.data_import import DataError

    try:
        loader = measure(cfg.data, batches, seed=cfg.seed, examples=cfg.training.num_train_steps * cfg.data.batch_size)
    except DataError as e:
        return {"loader_error": str(e).splitlines()[0][:200]}
    return {"loader_startup_s": loader["startup_s"], "loader_images_per_s": loader["images_per_s"],
            "loader_from_memory": loader["from_memory"]}


def train_step_inputs(cfg: Config, mesh: Mesh) -> tuple[TrainState, Any, TrainStep, tuple[Any, Any]]:
    """A freshly built train state and diffusion process replicated on ``mesh``, their train step, and a batch
    of ``cfg.data.batch_size`` uniform random images (labels 0) split over ``mesh``."""
    import numpy as np

    from ddpm_eqx.parallel import replicate, shard_batch
    from ddpm_eqx.step import make_train_step
    from ddpm_eqx.train import build_state

    state, process, optimizer = build_state(cfg)
    state, process = replicate(state, mesh), replicate(process, mesh)
    step = make_train_step(cfg, process, optimizer, mesh)
    n, c, s = cfg.data.batch_size, cfg.data.channels, cfg.data.image_size
    rng = np.random.default_rng(0)
    batch = shard_batch((rng.uniform(-1, 1, (n, c, s, s)).astype(np.float32), np.zeros((n,), np.int32)), mesh)
    return state, process, step, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/fashion_mnist.py")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--host-devices", type=int, default=None, help="XLA CPU devices (default: cores)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--sample-steps", type=int, default=10, help="sampler steps timed (one lax.scan)")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the chip's peak for `mfu` where PUBLISHED_BF16_TFLOPS does not list it")
    parser.add_argument("--checkpoint-saves", type=int, default=4, help="checkpoints of the state timed (0: none)")
    parser.add_argument("--loader-batches", type=int, default=50,
                        help="batches of the config's own loader timed after its first (0: none)")
    parser.add_argument("--orbax-default-handler", action="store_true",
                        help="save the jax.Arrays with Orbax's stock handler (replica-parallel), not as NumPy")
    args = parser.parse_args()
    allocator.reexec_with_caching_allocator()
    set_host_device_count(args.host_devices)

    import jax

    from ddpm_eqx.config import apply_overrides, load_config_file
    from ddpm_eqx.generate import ShardedSampler
    from ddpm_eqx.parallel import make_mesh
    from ddpm_eqx.unet import count_params

    cfg = apply_overrides(load_config_file(args.config), [f"data.batch_size={args.batch}", *args.overrides])
    mesh = make_mesh()
    out: dict[str, float | int | str | bool] = {"config": args.config, "overrides": " ".join(args.overrides),
                                         "batch": args.batch, "devices": mesh.devices.size,
                                         "backend": jax.default_backend(), "malloc": allocator.active() or "system"}
    t = time.perf_counter()
    state, process, step, batch = train_step_inputs(cfg, mesh)
    out["init_s"] = time.perf_counter() - t
    out["params"] = count_params(state.model)
    c, s = cfg.data.channels, cfg.data.image_size

    t = time.perf_counter()
    # step._fn itself, not wrapped in another jit: a nested jit loses its donation (the run's step donates the
    # state; an outer jit without donation measured 2% slower and compiled 1-2 s longer, session 37).
    lowered = step._fn.lower(state, *batch)  # type: ignore[attr-defined]
    # Tracing and lowering: Python, one core, paid again on every start (the persistent cache is keyed by
    # the lowered program). compile_s is the whole of it: trace, lower and XLA's compile.
    out["trace_s"] = time.perf_counter() - t
    compiled = lowered.compile()
    out["compile_s"] = time.perf_counter() - t
    cost = compiled.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    # Under shard_map the analysis covers one device's program: scale to the whole batch.
    out["gflop_per_step"] = flops * mesh.devices.size / 1e9

    state, metrics = compiled(state, *batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    cpu0, faults0 = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.steps):
        t = time.perf_counter()
        state, metrics = compiled(state, *batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    cpu1, faults1 = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    median = statistics.median(times)
    out["step_s"] = median
    out["steps_per_s"] = 1 / median
    out["images_per_s"] = args.batch / median
    out["achieved_gflops"] = out["gflop_per_step"] / median  # type: ignore[operator]
    out["matmul_peak_gflops"] = matmul_peak_gflops()
    out["fraction_of_peak"] = out["achieved_gflops"] / out["matmul_peak_gflops"]  # type: ignore[operator]
    out["device_kind"] = jax.devices()[0].device_kind
    peak = args.peak_tflops or published_peak_tflops(str(out["device_kind"]))
    if peak:  # model FLOPs utilisation: the whole batch's FLOPs against every device's peak
        out["published_peak_tflops"] = peak
        out["mfu"] = out["achieved_gflops"] / (peak * 1e3 * mesh.devices.size)  # type: ignore[operator]
    # Kernel time (page faults of XLA's per-execution buffers, thread wake-ups) and user time per step.
    out["sys_s_per_step"] = (cpu1.system - cpu0.system) / args.steps
    out["user_s_per_step"] = (cpu1.user - cpu0.user) / args.steps
    out["page_faults_per_step"] = (faults1 - faults0) / args.steps

    shape = (c, s, s)
    keys = jax.random.split(jax.random.key(0), args.sample_batch)
    # The program of `ddpm-eqx sample` with the default sampler, every timestep (one lax.scan): compiled, not run.
    ddpm = ShardedSampler(process, state.ema_model, shape, mesh, sampler="ddpm")
    t = time.perf_counter()
    ddpm.lower(state.ema_model, keys).compile()
    out["ddpm1000_compile_s"] = time.perf_counter() - t
    sampler = ShardedSampler(process, state.ema_model, shape, mesh, sampler="ddim", steps=args.sample_steps)
    t = time.perf_counter()
    sampler(state.ema_model, keys)
    out["sampler_compile_and_first_s"] = time.perf_counter() - t
    t = time.perf_counter()
    sampler(state.ema_model, keys)
    per_step = (time.perf_counter() - t) / args.sample_steps
    out["sampler_step_s"] = per_step
    out["ddpm1000_images_per_s"] = args.sample_batch / (1000 * per_step)
    out["ddim50_images_per_s"] = args.sample_batch / (50 * per_step)
    if args.checkpoint_saves > 0:
        out.update(checkpoint_figures(state, args.checkpoint_saves, jax_arrays=args.orbax_default_handler))
    if args.loader_batches > 0:
        out.update(loader_figures(cfg, args.loader_batches))
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print_figures(out, as_json=args.json)


def print_figures(figures: dict[str, float | int | str | bool], *, as_json: bool) -> None:
    """One JSON object, or a line a figure (floats to 4 significant digits)."""
    if as_json:
        print(json.dumps(figures, indent=2))
        return
    width = max(map(len, figures))
    for k, v in figures.items():
        print(f"{k:>{width}}: {v:.4g}" if isinstance(v, float) else f"{k:>{width}}: {v}")


if __name__ == "__main__":
    main()
