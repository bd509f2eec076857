"""The benchmark's figures are consistent with each other (a broken benchmark would mislead quietly)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from _cli import ROOT, TINY
from ddpm_eqx.allocator import preload_env


@pytest.mark.slow
def test_bench_train_json_figures_agree_with_each_other(fashion_mnist_data_dir):
    # One training step: the loader then reads the real split from disk (a run of fewer examples than the split).
    sets = [*(s for s in TINY if not s.startswith(("training.", "sampling."))), f"data.data_dir={fashion_mnist_data_dir}",
            "training.num_train_steps=1"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--config", "configs/fashion_mnist_cpu.py",
           "--batch", "8", "--host-devices", "2", "--steps", "3", "--sample-batch", "4", "--sample-steps", "2",
           "--peak-tflops", "0.05", "--checkpoint-saves", "2", "--loader-batches", "5", "--json",
           *[a for s in sets for a in ("--set", s)]]
    env = {k: v for k, v in os.environ.items() if k != "DDPM_EQX_MALLOC"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True, env=env).stdout
    d = json.loads(out)
    assert d["devices"] == 2 and d["batch"] == 8 and d["backend"] == "cpu"
    assert d["device_kind"] == "cpu" and d["published_peak_tflops"] == 0.05  # a CPU has none: given here
    assert math.isclose(d["mfu"], d["achieved_gflops"] / (0.05e3 * 2), rel_tol=1e-9)  # over both devices' peaks
    assert d["overrides"] == " ".join(sets)  # what was measured is named in the figures
    # Like the CLI, the benchmark measures under the caching allocator where it applies.
    assert d["malloc"] == ("tbbmalloc" if preload_env(env) is not None else "system")
    assert 0 < d["params"] < 200_000  # the tiny U-Net, not the config file's own
    assert math.isclose(d["steps_per_s"], 1 / d["step_s"], rel_tol=1e-9)
    assert math.isclose(d["images_per_s"], 8 / d["step_s"], rel_tol=1e-9)
    assert math.isclose(d["achieved_gflops"], d["gflop_per_step"] / d["step_s"], rel_tol=1e-9)
    assert math.isclose(d["fraction_of_peak"], d["achieved_gflops"] / d["matmul_peak_gflops"], rel_tol=1e-9)
    assert math.isclose(d["ddim50_images_per_s"], 20 * d["ddpm1000_images_per_s"], rel_tol=1e-9)
    assert math.isclose(d["ddim50_images_per_s"], 4 / (50 * d["sampler_step_s"]), rel_tol=1e-9)
    assert d["gflop_per_step"] > 0 and d["matmul_peak_gflops"] > 1 and 0 < d["trace_s"] < d["compile_s"]
    assert d["ddpm1000_compile_s"] > 0 and d["sampler_compile_and_first_s"] > 0
    assert d["page_faults_per_step"] >= 0 and d["sys_s_per_step"] >= 0 and d["user_s_per_step"] > 0
    assert d["peak_rss_mib"] > 100
    assert "loader_error" not in d and d["loader_from_memory"] is False  # 8 examples of 60,000: from disk
    assert d["loader_startup_s"] > 0 and d["loader_images_per_s"] > 0
    # Every array of the train state is checkpointed; a save returns before its checkpoint is committed.
    import jax

    from ddpm_eqx.config import apply_overrides, load_config_file
    from ddpm_eqx.train import state_skeleton

    skeleton = state_skeleton(apply_overrides(load_config_file(ROOT / "configs" / "fashion_mnist_cpu.py"), sets))
    leaves = jax.tree_util.tree_leaves(skeleton)
    assert d["checkpoint_arrays"] == sum(isinstance(x, jax.ShapeDtypeStruct) for x in leaves) > 100
    assert 0 < d["checkpoint_save_s"] < d["checkpoint_committed_s"] and d["checkpoint_first_save_s"] > 0
    assert math.isfinite(d["checkpoint_rss_kib_per_save"])  # what a save leaves resident (README, Reliability)


def _bench_module():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_loader_figures_name_a_dataset_it_cannot_open(tmp_path):
    from ddpm_eqx.config import Config, DataConfig

    cfg = Config(data=DataConfig(dataset="no_such_dataset_xyz", data_dir=str(tmp_path)))
    figures = _bench_module().loader_figures(cfg, 1)
    assert list(figures) == ["loader_error"] and "no_such_dataset_xyz" in figures["loader_error"]


def test_published_peaks_match_the_device_kinds_jax_reports():
    bench = _bench_module()
    kinds = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5": 459.0, "TPU v6 lite": 918.0, "NVIDIA H100 80GB HBM3": 989.0,
             "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.0, "NVIDIA A100-SXM4-80GB": 312.0, "cpu": None}
    assert {kind: bench.published_peak_tflops(kind) for kind in kinds} == kinds


def _bench_options():  # noqa: ANN202
    sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_options imports bench_train beside it
    spec = importlib.util.spec_from_file_location("bench_options", ROOT / "benchmarks" / "bench_options.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_options_alternates_the_programs_abba_on_the_state_each_returns():
    calls = []

    def program(name):  # noqa: ANN001, ANN202
        def run(state, x):  # noqa: ANN001, ANN202
            calls.append((name, state))
            return state + x, {"loss": 0.0}
        return run

    times = _bench_options().abba({"A": program("A"), "B": program("B")}, 0, (1,), pairs=3)
    assert [name for name, _ in calls] == list("AB" + "ABBAAB")  # a warm-up each, then A B, B A, A B
    assert [state for _, state in calls] == list(range(8))  # every step continues from the one before
    assert len(times["A"]) == len(times["B"]) == 3 and min(times["A"] + times["B"]) >= 0


@pytest.mark.slow
def test_bench_options_compiles_each_setting_and_reports_consistent_figures():
    sets = [s for s in TINY if not s.startswith(("training.", "sampling."))]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_options.py"), "--config", "configs/fashion_mnist_cpu.py",
           "--batch", "8", "--host-devices", "2", "--pairs", "2", "--b-first", "--json",
           *[a for s in sets for a in ("--set", s)]]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True).stdout
    d = json.loads(out)
    assert d["devices"] == 2 and d["pairs"] == 2 and "ELTWISE" in d["b"] and "ELTWISE" not in d["a"]
    assert d["compile_s_A"] > 0 and d["compile_s_B"] > 0 and list(d).index("compile_s_B") < list(d).index("compile_s_A")
    for name in "AB":
        assert 0 < d[f"step_min_s_{name}"] <= d[f"step_s_{name}"] and d[f"step_mean_s_{name}"] >= d[f"step_min_s_{name}"]
    assert math.isclose(d["step_b_over_a"], d["step_s_B"] / d["step_s_A"], rel_tol=1e-9)
    # A value the option does not take is XLA's error, not a silent fallback to its default.
    bad = subprocess.run([*cmd[:2], "--config", "configs/fashion_mnist_cpu.py", "--batch", "8", "--pairs", "1",
                          "--b", "NO_SUCH_FUSION", *cmd[cmd.index("--json") + 1:]], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode != 0 and "not a valid enum value" in bad.stderr
