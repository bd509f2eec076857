"""Two settings of one XLA compiler option on the train step, compared in one process (drift-proof).

    python benchmarks/bench_options.py [--config configs/fashion_mnist.py] [--batch 32] [--pairs 20]
        [--option xla_cpu_experimental_ynn_fusion_type] [--a VALUE] [--b VALUE] [--b-first] [--json]

The step is traced and lowered once, then compiled with ``--option`` at ``--a`` and at ``--b``
(``compiler_options``; the process's first compile reads 1-3 s slower, hence ``--b-first`` for the other
order), and the two programs alternate on the same state in ABBA order for ``--pairs`` pairs. A small CPU's
speed drifts by more than the few percent such an option moves (benchmarks/RESULTS.md, session 11), so
separate processes, even interleaved, compare worse than this. Prints each setting's XLA compile time and
the median, minimum and mean step, and B's median over A's.

The defaults compare XLA:CPU's YNNPACK fusion types with and without elementwise fusions: what
``ddpm_eqx.parallel.CPU_XLA_FLAGS`` picks by the CPU (RESULTS.md, sessions 18 and 37). Values are the option's
own spelling (for an enum list: its value names, comma-separated), not ``XLA_FLAGS``'s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train.py, beside this file

from ddpm_eqx import allocator  # noqa: E402
from ddpm_eqx.parallel import set_host_device_count  # noqa: E402

_YNN = "LIBRARY_FUSION_TYPE_"


def abba(programs: dict[str, object], state: object, batch: tuple[object, ...], pairs: int) -> dict[str, list[float]]:
    """Step times of programs ``"A"`` and ``"B"`` run alternately, A B B A A B ..., each step on the state the
    previous one returned, after one warm-up step of each."""
    import jax

    times: dict[str, list[float]] = {"A": [], "B": []}
    for name in "AB":
        state, metrics = programs[name](state, *batch)  # type: ignore[operator]
        jax.block_until_ready(metrics)
    for i in range(pairs):
        for name in ("AB" if i % 2 == 0 else "BA"):
            t = time.perf_counter()
            state, metrics = programs[name](state, *batch)  # type: ignore[operator]
            jax.block_until_ready(metrics)
            times[name].append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/fashion_mnist.py")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--host-devices", type=int, default=None, help="XLA CPU devices (default: cores)")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--option", default="xla_cpu_experimental_ynn_fusion_type")
    parser.add_argument("--a", default=f"{_YNN}REDUCE,{_YNN}INDIVIDUAL_DOT")
    parser.add_argument("--b", default=f"{_YNN}REDUCE,{_YNN}INDIVIDUAL_DOT,{_YNN}ELTWISE")
    parser.add_argument("--b-first", action="store_true", help="compile B before A")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    allocator.reexec_with_caching_allocator()
    set_host_device_count(args.host_devices)

    from bench_train import print_figures, train_step_inputs
    from ddpm_eqx.config import apply_overrides, load_config_file
    from ddpm_eqx.parallel import make_mesh

    cfg = apply_overrides(load_config_file(args.config), [f"data.batch_size={args.batch}", *args.overrides])
    mesh = make_mesh()
    state, _, step, batch = train_step_inputs(cfg, mesh)
    # step._fn itself, not wrapped in another jit: a nested jit loses its donation (the run's step donates the
    # state; an outer jit without donation measured 2% slower and compiled 1-2 s longer, session 37).
    lowered = step._fn.lower(state, *batch)  # type: ignore[attr-defined]
    out: dict[str, float | int | str] = {"config": args.config, "overrides": " ".join(args.overrides),
                                         "batch": args.batch, "devices": mesh.devices.size, "option": args.option,
                                         "a": args.a, "b": args.b, "pairs": args.pairs}
    programs = {}
    for name in ("BA" if args.b_first else "AB"):
        t = time.perf_counter()
        programs[name] = lowered.compile(compiler_options={args.option: getattr(args, name.lower())})
        out[f"compile_s_{name}"] = time.perf_counter() - t
    times = abba(programs, state, batch, args.pairs)
    for name in "AB":
        out[f"step_s_{name}"] = statistics.median(times[name])
        out[f"step_min_s_{name}"] = min(times[name])
        out[f"step_mean_s_{name}"] = statistics.mean(times[name])
    out["step_b_over_a"] = out["step_s_B"] / out["step_s_A"]  # type: ignore[operator]
    print_figures(out, as_json=args.json)


if __name__ == "__main__":
    main()
