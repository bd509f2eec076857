"""The train step in-process: a tiny model overfits one batch, compiling once; bf16 mode trains too;
gradient accumulation is the same update in less memory."""

import dataclasses
import os
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_eqx.config import Config, apply_overrides
from ddpm_eqx.diffusion import make_diffusion
from ddpm_eqx.parallel import make_mesh, replicate, shard_batch
from ddpm_eqx.state import init_state, schedule_of
from ddpm_eqx.step import make_train_step
from ddpm_eqx.train import build_model, build_state

TINY = ["model.dim=8", "model.dim_mults=1,2", "model.resnet_block_groups=4", "model.attn_heads=1",
        "model.attn_dim_head=8", "data.image_size=8", "data.batch_size=8", "ddpm.timesteps=100",
        "training.loss_type=l2", "optim.lr=3e-3"]


def _run(overrides: list[str], steps: int) -> tuple[list[float], int]:
    cfg = apply_overrides(Config(), TINY + overrides)
    mesh = make_mesh()
    state, process, optimizer = build_state(cfg)
    state, process = replicate(state, mesh), replicate(process, mesh)
    step = make_train_step(cfg, process, optimizer, mesh)
    rng = np.random.default_rng(0)
    # One fixed batch: smooth blobs in [-1, 1], the same every step.
    yy, xx = np.mgrid[0:8, 0:8] / 7.0
    images = np.stack([np.sin(3 * xx + k) * np.cos(2 * yy - k) for k in range(8)])[:, None].astype(np.float32)
    labels = rng.integers(0, 10, 8).astype(np.int32)
    batch = shard_batch((images, labels), mesh)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, *batch)
        losses.append(float(metrics["loss"]))
    return losses, step.traces


def test_the_step_refuses_a_model_of_other_classes_and_reports_the_lr_it_knows():
    """make_train_step read model.num_classes from the config: a conditional model built on its own was trained on
    the null class alone, silently. Its lr metric was the config's schedule whatever the optimizer (0.001 beside
    optax.adam(1e-2)); now the schedule of make_optimizer's optimizers or of ``lr_schedule``, else none."""
    cfg = apply_overrides(Config(), TINY)
    mesh = make_mesh()
    state, process, optimizer = build_state(apply_overrides(cfg, ["model.num_classes=3"]))
    batch = shard_batch((np.zeros((8, 1, 8, 8), np.float32), np.zeros(8, np.int32)), mesh)
    with pytest.raises(ValueError, match=r"^the model has num_classes=3, the config model.num_classes=None: "):
        make_train_step(cfg, process, optimizer, mesh)(state, *batch)
    state, process, optimizer = build_state(cfg)
    adam = optax.adam(1e-2)
    assert schedule_of(adam) is None and schedule_of(optimizer)(0) == pytest.approx(3e-3)  # none: no lr metric
    for opt, kwargs, lr in ((optimizer, {}, 3e-3), (adam, {"lr_schedule": lambda step: 1e-2}, 1e-2)):
        fresh = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, state)  # donated
        fresh = dataclasses.replace(fresh, opt_state=opt.init(eqx.filter(fresh.model, eqx.is_inexact_array)))
        _, metrics = make_train_step(cfg, process, opt, mesh, **kwargs)(fresh, *batch)
        assert metrics.get("lr") == (None if lr is None else pytest.approx(lr)) and np.isfinite(metrics["loss"])


@pytest.mark.slow
def test_tiny_model_overfits_one_batch_and_compiles_once():
    losses, traces = _run([], 150)
    assert traces == 1
    first, last = np.mean(losses[:10]), np.mean(losses[-20:])
    assert np.isfinite(losses).all()
    assert last < first / 3, (first, last)  # measured: ~1.0 -> ~0.1


@pytest.mark.slow
def test_bf16_self_conditioned_class_conditional_training_runs_and_learns():
    losses, traces = _run(["training.half_precision=true", "ddpm.self_condition=true", "model.num_classes=10"], 60)
    assert traces == 1 and np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_gradient_accumulation_is_the_same_update_in_less_memory(warnings_logged):
    mesh = make_mesh()
    rng = np.random.default_rng(1)
    batch = shard_batch((rng.uniform(-1, 1, (32, 1, 8, 8)).astype(np.float32),
                         rng.integers(0, 10, 32).astype(np.int32)), mesh)
    sgd = optax.sgd(1.0)  # new weights = old - gradient: the gradients compare directly (Adam's step is +-lr)
    weights, metrics, temp_bytes = {}, {}, {}
    for k in (1, 4):
        # Class-conditional: the label-drop draws must land on the same examples too.
        # One resolution level: half the compile time, and accumulation does not depend on the depth.
        cfg = apply_overrides(Config(), TINY + ["data.batch_size=32", "model.num_classes=10", "model.dim_mults=1",
                                                f"training.grad_accum_steps={k}"])
        process = make_diffusion(cfg.ddpm, cfg.training.loss_type)
        state, process = replicate(init_state(build_model(cfg), sgd), mesh), replicate(process, mesh)
        step = make_train_step(cfg, process, sgd, mesh)
        compiled = eqx.filter_jit(step._fn).lower(state, *batch).compile()
        temp_bytes[k] = compiled.compiled.memory_analysis().temp_size_in_bytes
        before = [np.asarray(w) for w in jax.tree_util.tree_leaves(eqx.filter(state.model, eqx.is_inexact_array))]
        new_state, metrics[k] = compiled(state, *batch)  # the program measured, not a second compile
        after = jax.tree_util.tree_leaves(eqx.filter(new_state.model, eqx.is_inexact_array))
        weights[k] = [b - np.asarray(a) for b, a in zip(before, after, strict=True)]  # the gradients
    np.testing.assert_allclose(metrics[4]["loss"], metrics[1]["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics[4]["grad_norm"], metrics[1]["grad_norm"], rtol=1e-5)
    for g4, g1 in zip(weights[4], weights[1], strict=True):
        np.testing.assert_allclose(g4, g1, rtol=1e-4, atol=1e-6)
    assert max(float(np.max(np.abs(g))) for g in weights[1]) > 1e-2
    assert temp_bytes[4] < 0.5 * temp_bytes[1], temp_bytes  # measured at batch 128: 36.5 -> 8.9 MiB
    # On a CPU the loop is slow (jax-ml/jax#12868): said once, for the accumulating step only.
    said = [w for w in warnings_logged if "grad_accum_steps" in w]
    assert len(said) == 1 and said[0].startswith("training.grad_accum_steps=4 on a CPU"), warnings_logged


def test_metrics_of_a_resumed_run_keep_each_step_once_and_drop_a_torn_line(tmp_path):
    import json

    from ddpm_eqx.logging_utils import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (2, 4, 6)] + [{"step": 4, "eval/fd": 3.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo')  # killed mid-append
    writer = MetricsWriter(tmp_path, None, total_steps=10, start_step=4, progress=False)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [rows[0], rows[1], rows[3]]
    writer.write(6, {"loss": 0.5}, batch_size=8)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4, 4, 6]


def test_a_metrics_row_leaves_out_pauses_and_follows_wandb_log_train(tmp_path, monkeypatch):
    """Throughput and the data-wait share are over training time (a checkpoint, grid or evaluation in the
    window is not a slow step); ``wandb.log_train=false`` keeps the rows out of W&B (the seed's switch); the
    ETA counts hours past a day."""
    import json

    from ddpm_eqx import logging_utils
    from ddpm_eqx.logging_utils import MetricsWriter, duration

    clock = iter([100.0, 110.0, 130.0])
    monkeypatch.setattr(logging_utils.time, "perf_counter", lambda: next(clock))

    class Run:
        logged: list[dict] = []

        def log(self, values: dict, step: int) -> None:
            self.logged.append(values)

    run = Run()
    writer = MetricsWriter(tmp_path, run, total_steps=1000, start_step=0, progress=False, log_train=False)
    record = writer.write(10, {"loss": 0.5}, batch_size=8, data_wait_s=1.0, paused_s=6.0)
    assert record["steps_per_s"] == pytest.approx(10 / 4) and record["data_wait"] == pytest.approx(1 / 4)
    writer.log_train = True
    writer.write(20, {"loss": 0.4}, batch_size=8)  # 20 s, no pause
    assert [row["steps_per_s"] for row in map(json.loads, (tmp_path / "metrics.jsonl").open())] == [2.5, 0.5]
    assert len(run.logged) == 1 and run.logged[0]["train/loss"] == 0.4
    assert duration(700_000 / 5) == "38:53:20" and duration(59.6) == "0:01:00"


def test_a_metrics_row_is_the_mean_over_its_steps():
    from ddpm_eqx.train import window_means

    window = [{"loss": np.float32(1.0), "grad_norm": np.float32(4.0), "lr": np.float32(0.1)},
              {"loss": np.float32(2.0), "grad_norm": np.float32(2.0), "lr": np.float32(0.2)}]
    assert window_means(window) == {"loss": 1.5, "grad_norm": 3.0, "lr": pytest.approx(0.2)}


def test_min_snr_with_a_loss_it_was_not_derived_for_is_named():
    from ddpm_eqx.train import loss_weighting_note

    assert loss_weighting_note(apply_overrides(Config(), ["ddpm.min_snr_gamma=5"])) is not None  # Config(): l1
    note = loss_weighting_note(apply_overrides(Config(), ["ddpm.min_snr_gamma=5", "training.loss_type=l1"]))
    assert note is not None and "--set training.loss_type=l2" in note
    assert loss_weighting_note(apply_overrides(Config(), ["ddpm.min_snr_gamma=5", "training.loss_type=l2"])) is None
    assert loss_weighting_note(Config()) is None  # no min-SNR


def test_the_eta_follows_the_wall_clock_since_the_first_row(tmp_path):
    """The plain-text ETA divided the steps left by the last row's training rate, which leaves out checkpoints,
    grids and evaluations: with frequent saves it read low (1.34x in a long review run) and jumped between rows.
    Now: the wall-clock pace since the first row (whose compile is left out)."""
    from ddpm_eqx.logging_utils import MetricsWriter

    writer = MetricsWriter(tmp_path, None, total_steps=1000, start_step=0, progress=False)
    assert writer.eta_s(now=60.0, step=100, row_wall_s=60.0, row_steps=100) == pytest.approx(900 * 0.6)  # its own
    # 100 steps of 10 s training + a 10 s checkpoint: 0.2 s a step, whatever the row's own training rate says.
    assert writer.eta_s(now=80.0, step=200, row_wall_s=20.0, row_steps=100) == pytest.approx(800 * 0.2)
    assert writer.eta_s(now=90.0, step=300, row_wall_s=10.0, row_steps=100) == pytest.approx(700 * 0.15)


def test_the_model_artifact_holds_the_final_checkpoint_only(tmp_path, monkeypatch):
    """W&B stages a copy of an artifact (offline: until synced; it stayed in ~/.local/share/wandb); the whole
    checkpoints folder made it max_to_keep checkpoints large."""
    from ddpm_eqx.train import _log_model

    for step in (2, 4, 6):
        (tmp_path / "checkpoints" / str(step) / "state").mkdir(parents=True)
        (tmp_path / "checkpoints" / str(step) / "state" / "data").write_bytes(b"x" * step)

    class Run:
        id = "abc"
        logged: list = []

        def log_artifact(self, artifact) -> None:  # noqa: ANN001
            self.logged.append(artifact)

    monkeypatch.delenv("WANDB_DATA_DIR", raising=False)
    _log_model(Run(), tmp_path / "checkpoints", 6)
    [artifact] = Run.logged
    assert sorted(artifact.manifest.entries) == ["checkpoints/6/state/data"] and artifact.metadata == {"step": 6}
    # W&B's staged copy is in the run's wandb/ folder, not the home folder (an offline run's stayed there)
    staged = Path(artifact.manifest.entries["checkpoints/6/state/data"].local_path)
    assert staged.is_relative_to(tmp_path / "wandb") and staged.read_bytes() == b"x" * 6
    assert "WANDB_DATA_DIR" not in os.environ
