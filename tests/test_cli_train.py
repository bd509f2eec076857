"""End to end through the CLI on the real Fashion-MNIST (prepared offline): train, checkpoint,
metrics, samples, resume, exact resume after SIGKILL, SIGTERM, override errors, sample."""

import dataclasses
import json
import re
import os
import signal
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from ddpm_eqx.checkpoint import Checkpointer
from ddpm_eqx.environment import describe

from _cli import ROOT, _cmd, _committed, _env, _final_params, _train, _train_args  # noqa: F401


@pytest.mark.slow
def test_train_writes_checkpoints_metrics_samples_and_config(reference_run):
    workdir, result = reference_run
    assert "finished at step 8" in result.stdout
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6, 8]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 and r["grad_norm"] > 0 for r in records)
    assert {"lr", "steps_per_s", "images_per_s"} <= set(records[0])
    assert (workdir / "samples" / "step_8.png").is_file()
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["dim"] == 8 and config["data"]["dataset"] == "fashion_mnist"
    # Each checkpoint names the software and devices that wrote it (compared when a run resumes).
    ckpt = Checkpointer(workdir / "checkpoints", read_only=True)
    written = ckpt.restore_meta(8)["environment"]
    ckpt.close()
    assert written["packages"] == describe()["packages"] and written["devices"] == 2, written


@pytest.mark.slow
def test_a_metrics_row_averages_the_steps_since_the_previous_one(reference_run, fashion_mnist_data_dir, tmp_path):
    """The reference run logs every 2 steps; the same run logging every step shows each step's loss: a row of
    the reference is the mean of its two steps (as the seed's rows), not the last step's value."""
    from _cli import SAMPLES

    workdir = tmp_path / "every_step"
    _train(fashion_mnist_data_dir, workdir, 8, tmp_path, SAMPLES, "training.log_every_steps=1")
    each = {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}
    rows = [json.loads(line) for line in (reference_run[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8] and sorted(each) == list(range(1, 9))
    for row in rows:
        for key in ("loss", "grad_norm"):
            pair = [each[row["step"] - 1][key], each[row["step"]][key]]
            assert row[key] == pytest.approx(np.mean(pair), rel=1e-6), (row["step"], key, pair)
        assert row["lr"] == each[row["step"]]["lr"]


@pytest.mark.slow
def test_sigkill_then_resume_under_glibc_is_bitwise_the_uninterrupted_run(reference_run, fashion_mnist_data_dir,
                                                                          tmp_path):
    """Also the allocator's equivalence test: this run (killed, resumed) uses glibc's malloc, the reference
    run the CLI's default (tbbmalloc where its wheel is installed); the parameters must agree bit for bit."""
    from ddpm_eqx import allocator

    ref_dir, ref = reference_run
    if allocator.preload_env(_env(tmp_path)) is not None:  # the CLI re-executes under tbbmalloc here
        assert "malloc tbbmalloc" in ref.stderr  # the reference run took the CLI's default
    workdir, env = tmp_path / "killed", {**_env(tmp_path), "DDPM_EQX_MALLOC": "system"}
    proc = subprocess.Popen(_train_args(fashion_mnist_data_dir, workdir, 8), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while 2 not in _committed(workdir):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _train(fashion_mnist_data_dir, workdir, 8, tmp_path, env=env)
    assert "resumed from" in resumed.stderr and "other software or devices" not in resumed.stderr
    assert "malloc system" in resumed.stderr
    # The killed run stored its traced step beside the XLA cache; the resumed one read it instead of tracing.
    assert f"train step read from {Path(env['JAX_COMPILATION_CACHE_DIR']) / 'ddpm_eqx_traces'}" in resumed.stderr
    for a, b in zip(_final_params(ref_dir, 8), _final_params(workdir, 8), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(fashion_mnist_data_dir, tmp_path):
    workdir = tmp_path / "term"
    # 5,000 x 8 images: less than the split, so read from disk like the other tiny runs (no 60,000-image cache).
    proc = subprocess.Popen(_train_args(fashion_mnist_data_dir, workdir, 5_000, "training.save_and_sample_every=4000"),
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (workdir / "metrics.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and steps[0] >= 2 and f"stopped at step {steps[0]}" in out
    resumed = _train(fashion_mnist_data_dir, workdir, steps[0] + 2, tmp_path)
    assert f"finished at step {steps[0] + 2}" in resumed.stdout


@pytest.mark.slow
def test_sample_command_is_deterministic_and_runs_ddpm_and_ddim(reference_run, tmp_path):
    """DDIM-50 twice (same seed: same images) and DDPM-1000 from the same checkpoint."""
    workdir, _ = reference_run
    env = _env(tmp_path)
    outs = []
    for name, args in [("a", ["--sampler", "ddim", "--steps", "50"]), ("b", ["--sampler", "ddim", "--steps", "50"]),
                       ("c", ["--sampler", "ddpm"])]:
        npz = tmp_path / f"{name}.npz"
        proc = subprocess.run(_cmd("sample", "--ckpt", str(workdir), "--num", "6", "--batch-size", "4", "--seed", "3",
                                   "--out", str(tmp_path / f"{name}.png"), "--npz", str(npz), *args),
                              env=env, check=True, capture_output=True, text=True, timeout=600)
        # The checkpoint is opened read-only on purpose: Orbax's notice of it is not shown as a warning.
        assert "read only" not in proc.stderr and "sampled 6 images" in proc.stderr + proc.stdout
        outs.append(np.load(npz)["image"])
        assert (tmp_path / f"{name}.png").is_file()
        if name == "b":  # the same sampler as a's: read from where a's process stored it, not traced again
            assert f"sampler read from {Path(env['JAX_COMPILATION_CACHE_DIR']) / 'ddpm_eqx_traces'}" in proc.stderr
    assert outs[0].shape == (6, 8, 8, 1) and outs[0].dtype == np.uint8
    from ddpm_eqx.config import DataConfig
    from ddpm_eqx.data import load_split_array

    with np.load(tmp_path / "a.npz") as arrays:  # an unconditional model's: no labels (a scalar -1 was refused)
        assert arrays.files == ["image"]
    imported, _ = load_split_array(DataConfig(dataset=str(tmp_path / "a.npz"), data_dir=str(tmp_path / "tfds"),
                                              image_size=8), "train")
    np.testing.assert_array_equal(imported, outs[0])  # the samples as a dataset (to train on, or score)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax on the damaged step 8
def test_sample_and_eval_draw_a_checkpoint_with_the_config_it_was_trained_with(reference_run, tmp_path):
    """A --force start with another beta schedule rewrites config.json (and a kill before its first save leaves it
    so): `sample`/`eval` of the run's checkpoints drew them with the new schedule, silently other images."""
    import equinox as eqx
    import jax
    from ddpm_eqx.config import from_json, to_json
    from ddpm_eqx.generate_cli import checkpoint_config, load_ema_model

    run = tmp_path / "run"
    shutil.copytree(reference_run[0], run)
    trained = from_json((run / "config.json").read_text())
    assert trained.ddpm.beta_schedule == "linear" and trained.model.dropout == 0
    forced = dataclasses.replace(trained, ddpm=dataclasses.replace(trained.ddpm, beta_schedule="cosine"),
                                 model=dataclasses.replace(trained.model, dropout=0.1))
    (run / "config.json").write_text(to_json(forced))
    assert checkpoint_config(run) == trained and checkpoint_config(run, 4) == trained
    cfg, model, step = load_ema_model(run)
    assert (cfg, step) == (trained, 8)
    _, original, _ = load_ema_model(reference_run[0])
    assert bool(eqx.tree_equal(model, original))  # dropout None: built as trained, not as config.json says
    # Past an unreadable newest step whose config is the forced one (another dropout): step 6 as it was trained.
    meta = run / "checkpoints" / "8" / "meta" / "metadata"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "config": json.loads(to_json(forced))}))
    victim = max((p for p in (run / "checkpoints" / "8" / "state").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:10])
    assert checkpoint_config(run) == forced
    # A checkpoint of a model without dropout reads into one with it (Orbax took the tree's extra, array-free
    # Dropout module for damage: `train --force --set model.dropout=0.1` failed, "is the disk damaged?").
    from ddpm_eqx.checkpoint import Checkpointer
    from ddpm_eqx.state import state_skeleton

    restored = Checkpointer(run / "checkpoints", read_only=True).restore_latest(state_skeleton(forced), step=6)
    assert restored is not None and restored[1].ema_model.mid_block1.block1.dropout is not None
    cfg, model, step = load_ema_model(run)
    assert (cfg, step) == (trained, 6)
    assert jax.tree_util.tree_structure(model) == jax.tree_util.tree_structure(original)


@pytest.mark.slow
def test_sample_trajectory_and_eval_with_the_offline_metric(reference_run, tmp_path):
    workdir, _ = reference_run
    gif = tmp_path / "path.gif"
    result = subprocess.run(_cmd("sample", "--ckpt", str(workdir), "--num", "4", "--sampler", "ddim", "--steps", "10",
                                 "--trajectory", str(gif)), env=_env(tmp_path), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    from PIL import Image

    with Image.open(gif) as im:
        assert im.n_frames == 11  # x_T and the 10 DDIM steps
    out = tmp_path / "eval.json"
    result = subprocess.run(_cmd("eval", "--ckpt", str(workdir), "--num", "64", "--steps", "10", "--out", str(out),
                                 "--reference", "20000"),
                            env=_env(tmp_path, optimised=True), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads(out.read_text())
    # An 8-step model draws noise-like images: far from the data in the classifier's feature space.
    assert scores["fd_classifier"] > 1.0 and np.isfinite(scores["kid_classifier"])
    assert scores["classifier_test_accuracy"] > 0.7  # trained at the run's 8x8 resolution
    assert "FID Inception weights not found" in scores["fid_unavailable"]
    # What the scores were measured against, and a warning that 64 samples bias them.
    assert (scores["reference_split"], scores["kid_subset_size"], scores["feature_dims"]) == ("train", 64,
                                                                                              {"fd_classifier": 128})
    assert scores["reference_images"] == 20_000  # --reference: a fixed subset of Fashion-MNIST's 60,000
    assert "warning: 64 samples are few for fd_classifier (128 features)" in result.stderr


@pytest.mark.slow
def test_sample_ddim_defaults_to_100_steps_and_names_them(reference_run, tmp_path):
    """`sample --sampler ddim` drew all 1000 steps by default (./run.sh main computed min(100, T) itself); now
    as eval: 100, or the model's timesteps where fewer, and the default grid name says which. It imports no
    data libraries (it imported TFDS and Grain through the state's builders in train.py)."""
    run = tmp_path / "run"
    shutil.copytree(reference_run[0], run)
    env = _env(tmp_path)  # and sample reads no data: TFDS and Grain (~1.5 s of imports) are never loaded
    for module in ("tensorflow_datasets", "grain"):
        (tmp_path / "no_data" / module).mkdir(parents=True)
        (tmp_path / "no_data" / module / "__init__.py").write_text(f"raise ImportError('sample imported {module}')\n")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "no_data"), env["PYTHONPATH"]])
    result = subprocess.run(_cmd("sample", "--ckpt", str(run), "--num", "4", "--sampler", "ddim"),
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    grid = run / "samples" / "sample_8_ddim100_n4_seed0.png"
    assert result.stdout.split() == [str(grid)] and grid.is_file()


@pytest.mark.parametrize(
    "overrides,message",
    [(["optim.lr=-1"], "optim.lr must be positive"), (["ddpm.beta_schedule=quadratic"], "is not one of linear"),
     (["ddpm.timesteps=0"], "ddpm.timesteps must be positive"), (["optim.lr=fast"], "is not a valid float"),
     (["model.dims=3"], "unknown config key 'model.dims'; valid keys: data.dataset"),
     (["sampling.eta=1.5"], "sampling.eta must be in [0, 1]"),
     (["model.attn_heads=0"], "model.attn_heads must be positive, got 0"),
     (["data.prefetch=-1"], "data.prefetch must be >= 0, got -1")],
)
def test_bad_overrides_exit_2_with_one_line_and_write_nothing(tmp_path, overrides, message):
    """Reported before JAX loads (seconds of imports for a typo): here any import of jax fails loudly."""
    workdir = tmp_path / "never"
    args = _cmd("train", "--dataset", "fashion_mnist", "--workdir", str(workdir),
                *[a for s in overrides for a in ("--set", s)])
    result = subprocess.run(args, env=_env_without_jax(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not workdir.exists()


@pytest.mark.parametrize("args,message", [
    (["sample", "--sampler", "euler"], "--sampler 'euler': use ddpm or ddim"),
    (["eval", "--sampler", "euler"], "--sampler 'euler': use ddpm or ddim"),
    (["eval", "--metric", "fid"], "--metric 'fid': use classifier, inception or all"),
    (["eval", "--reference", "1"], "--reference '1': give a number of training images (2 or more), or all for the "
                                   "whole split"),
    (["eval", "--reference", "full"], "--reference 'full': give a number of training images (2 or more), or all for "
                                      "the whole split"),
    (["sample", "--sampler", "ddpm", "--steps", "50"], "--steps 50 sets the DDIM sampler's steps; DDPM runs all the model's timesteps: "
                                  "drop --steps or use --sampler ddim"),
    (["eval", "--sampler", "ddpm", "--eta", "0.5"], "--eta 0.5 sets the DDIM sampler's noise; DDPM draws its own: "
                                                    "drop --eta or use --sampler ddim"),
    # Output paths are checked before minutes (or hours) of sampling are spent on them.
    (["sample", "--out", "."], "--out . is a folder; give a file in it, e.g. out.png"),
    (["sample", "--out", "grid"], "--out grid: the file name must end in .png, .jpg, .jpeg, .webp"),
    (["sample", "--trajectory", "path.mp4"], "--trajectory path.mp4: the file name must end in .gif, .png"),
    (["eval", "--out", "scores.txt"], "--out scores.txt: the file name must end in .json"),
    (["sample", "--host-devices", "0"], "--host-devices 0: give a positive number of devices (default: one per core)"),
])
def test_bad_sampler_or_metric_exit_2_with_one_line_before_jax_loads(tmp_path, args, message):
    result = subprocess.run(_cmd(*args, "--ckpt", str(tmp_path)), env=_env_without_jax(tmp_path), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == f"error: {message}"


def test_an_output_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """`sample --out /sys/grid.png` sampled, then ended in a 47-line PermissionError traceback."""
    from typer.testing import CliRunner

    import cli
    import ddpm_eqx.checkpoint
    import ddpm_eqx.generate_cli

    monkeypatch.setattr(ddpm_eqx.checkpoint, "quiet_failed_async_saves", lambda: None)  # process-wide hooks
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # the CLI's device count edits it
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and Path(p) != locked)  # root writes anywhere
    drawn = []
    monkeypatch.setattr(ddpm_eqx.generate_cli, "run_sample", lambda req: drawn.append(req) or [])
    result = CliRunner().invoke(cli.app, ["sample", "--ckpt", str(tmp_path), "--npz", str(locked / "x" / "a.npz")])
    assert result.exit_code == 2 and not drawn, result.output
    assert result.output.strip() == (f"error: --npz {locked / 'x' / 'a.npz'}: {locked} cannot be written "
                                     "(permissions, or a read-only disk); give another path")

    def refused(req):  # noqa: ANN001, ANN202  (what the check cannot foresee: sysfs, a full disk)
        raise PermissionError(13, "Permission denied", "/sys/grid.png")

    monkeypatch.setattr(ddpm_eqx.generate_cli, "run_sample", refused)
    result = CliRunner().invoke(cli.app, ["sample", "--ckpt", str(tmp_path), "--out", str(tmp_path / "g.png")])
    assert result.exit_code == 1
    assert result.output.strip() == "error: cannot write /sys/grid.png (Permission denied); the checkpoint is untouched"


@pytest.mark.parametrize("args,message", [
    (["sample", "--ckpt", ".", "--num", "0"],
     "Invalid value for '--num': Input should be greater than or equal to 1 (see cli.py sample --help)"),
    (["train", "--bogus"], "No such option: --bogus (see cli.py train --help)"),
    (["sample"], "Missing option '--ckpt' (see cli.py sample --help)"),
    (["data", "prepare"], "Missing argument 'dataset' (see cli.py data prepare --help)"),
    (["trian"], "No such command 'trian'. Did you mean 'train'? (see cli.py --help)"),
])
def test_typer_usage_errors_are_one_line_too(tmp_path, args, message):
    """Typer printed these as a usage line, a hint and a four-line box; now as every other error."""
    result = subprocess.run(_cmd(*args), env=_env_without_jax(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == f"error: {message}"


def test_cache_shows_and_clears_only_its_own_files(tmp_path):
    """The caches were never pruned and named nowhere but the README; --clear must not touch anything else in a
    folder the user may share (JAX_COMPILATION_CACHE_DIR)."""
    xla = tmp_path / "xdg" / "ddpm_eqx" / "xla"
    (xla / "ddpm_eqx_traces").mkdir(parents=True)
    files = {"a-cache": 3 * 2**20, "a-atime": 8, "b-cache": 2**20, "mine.txt": 5,
             "ddpm_eqx_traces/train_step-1.jaxexport": 2**20, "ddpm_eqx_traces/.sampler-2.jaxexport.k3j": 0}
    for name, size in files.items():
        (xla / name).write_bytes(b"x" * size)
    env = _env_without_jax(tmp_path)
    env.pop("JAX_COMPILATION_CACHE_DIR")
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")

    def cache(*args: str) -> list[str]:
        result = subprocess.run(_cmd("cache", *args), env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    shown = [f"compiled programs: 2 (4.0 MiB) in {xla}",
             f"stored traces: 1 (1.0 MiB) in {xla / 'ddpm_eqx_traces'}; 1 temporary files of interrupted writes"]
    assert cache() == shown
    assert cache("--clear") == [line.replace(": ", ": deleted ", 1) for line in shown]
    assert sorted(p.name for p in xla.rglob("*")) == ["ddpm_eqx_traces", "mine.txt"]
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "elsewhere")
    assert cache()[0] == f"compiled programs: 0 (0.0 MiB) in {tmp_path / 'elsewhere'}"


def test_no_arguments_still_print_the_help(tmp_path):
    env = _env_without_jax(tmp_path)
    for args in ([], ["data"]):
        result = subprocess.run(_cmd(*args), env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "Usage: cli.py" in result.stdout + result.stderr
        assert "Commands" in result.stdout + result.stderr and "error:" not in result.stderr


def test_seeds_past_32_bits_and_processes_without_a_coordinator_are_refused_before_jax_loads(tmp_path):
    """A JAX key holds 32 bits: --seed 2**32 drew seed 0's images (and 2**63 was a traceback). Without a
    coordinator, --num-processes/--process-id were ignored and the process trained alone."""
    env = _env_without_jax(tmp_path)
    for command in ("sample", "eval"):
        result = subprocess.run(_cmd(command, "--ckpt", str(tmp_path), "--seed", str(2**32)), env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "--seed" in result.stderr and "4294967295" in result.stderr, result.stderr
    workdir = tmp_path / "never"
    result = subprocess.run(_cmd("train", "--dataset", "fashion_mnist", "--workdir", str(workdir), "--num-processes",
                                 "2", "--process-id", "1"), env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().startswith("error: --num-processes/--process-id need --coordinator host:port")
    assert not workdir.exists()


def _env_without_jax(tmp_path):  # noqa: ANN001, ANN202
    """The CLI's environment with a ``jax`` package first on the path that fails on import."""
    (tmp_path / "no_jax" / "jax").mkdir(parents=True)
    (tmp_path / "no_jax" / "jax" / "__init__.py").write_text("raise ImportError('the CLI imported jax')\n")
    env = _env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "no_jax"), env["PYTHONPATH"]])
    return env


def test_sample_errors_for_missing_and_empty_checkpoints(tmp_path):
    for ckpt, message in [(tmp_path / "nope", "does not exist"), (tmp_path, "holds no checkpoints")]:
        result = subprocess.run(_cmd("sample", "--ckpt", str(ckpt)), env=_env(tmp_path), capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 1 and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_restore_from_another_run_with_wandb_offline(reference_run, fashion_mnist_data_dir, tmp_path):
    """--restore-from starts at the other run's newest step; W&B offline needs no network or login."""
    workdir = tmp_path / "continued"
    args = _train_args(fashion_mnist_data_dir, workdir, 10, "wandb.mode=offline", "data.random_flip=false")
    args += ["--restore-from", str(reference_run[0])]
    env = _env(tmp_path)
    env.pop("WANDB_MODE", None)
    env.pop("WANDB_API_KEY", None)
    env.pop("WANDB_DIR", None)  # the run writes under its workdir
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stderr and "at step 8" in result.stderr
    # Continued with another setting (one the step's program does not read: no compile of its own): named.
    assert (f"--restore-from {reference_run[0]}: its step 8 was trained with another config (data.random_flip: True "
            "-> False); this run continues it with this one") in result.stderr
    assert "finished at step 10" in result.stdout
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [10]
    runs = list((workdir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_a_config_sized_for_accelerators_is_a_global_batch_of_256_on_a_cpu():
    from ddpm_eqx.config import Config, apply_overrides
    from ddpm_eqx.train import undersized_machine

    assert undersized_machine(apply_overrides(Config(), ["data.batch_size=256"]))  # this machine has a CPU only
    assert not undersized_machine(apply_overrides(Config(), ["data.batch_size=128"]))


@pytest.mark.slow
def test_a_step_that_cannot_fit_in_memory_is_one_line_before_it_runs(fashion_mnist_data_dir, tmp_path, monkeypatch):
    """The seed's config (batch 1024) on a 24 GiB CPU machine: the kernel killed the process at the first step, with
    no message. XLA's estimate of the step's temporaries is checked against the memory available first (here the
    machine is made to have 1 MiB available: the tiny step needs more)."""
    import psutil
    from typer.testing import CliRunner

    import cli
    import ddpm_eqx.step
    from _cli import in_process_sets

    checked = []
    real_check = ddpm_eqx.step.check_fits_in_memory
    monkeypatch.setattr(ddpm_eqx.step, "check_fits_in_memory", lambda *a: checked.append(1) or real_check(*a))
    memory = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory._replace(available=2**20))
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # --host-devices would edit it
    monkeypatch.setenv("DDPM_EQX_TRACE_CACHE", "0")  # the disk-full tests' program, not an exported one
    workdir = tmp_path / "big"
    sets = in_process_sets(fashion_mnist_data_dir)
    result = CliRunner().invoke(cli.app, ["train", "--dataset", "fashion_mnist", "--workdir", str(workdir),
                                          *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 1 and checked == [1], result.output[-2000:]
    last = result.output.strip().splitlines()[-1]
    assert re.fullmatch(r"error: out of memory with data\.batch_size=8 \(RESOURCE_EXHAUSTED: the train step needs "
                        r"\d+\.\d GiB of memory, 0\.0 GiB are available\); lower it with --set data\.batch_size=N; "
                        r"checkpoints are untouched", last), last
    assert not any((workdir / "checkpoints").glob("*")) and not (workdir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_config_sized_for_accelerators_warns_on_cpu_with_an_estimate(reference_run, fashion_mnist_data_dir,
                                                                        tmp_path, monkeypatch, warnings_logged):
    """``ddpm-eqx train`` in this process, with the test above answered yes for the tiny batch of 8: a batch
    of 256 would be a compile of its own (~30 s of the suite) for the same warning and estimate. The tiny
    8-step run's program is the one the disk-full tests compile in-process."""
    import re

    from typer.testing import CliRunner

    import cli
    import ddpm_eqx.train
    from _cli import in_process_sets

    assert "sized for TPUs/GPUs" not in reference_run[1].stderr  # batch 8 on its own: no warning
    monkeypatch.setattr(ddpm_eqx.train, "undersized_machine", lambda cfg: cfg.data.batch_size == 8)
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # --host-devices would edit it
    monkeypatch.setenv("DDPM_EQX_TRACE_CACHE", "0")  # the disk-full tests' program, not an exported one
    sets = in_process_sets(fashion_mnist_data_dir)
    result = CliRunner().invoke(cli.app, ["train", "--dataset", "fashion_mnist", "--workdir", str(tmp_path / "big"),
                                          *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output[-2000:]
    [warning, estimate] = [w for w in warnings_logged if "TPUs/GPUs" in w or "estimated" in w]
    assert "sized for TPUs/GPUs" in warning and "--config configs/fashion_mnist_cpu.py" in warning
    found = re.search(r"estimated time to finish on this CPU: ([\d.]+) h \(([\d.]+) s/step\)", estimate)
    assert found is not None and float(found.group(2)) > 0, estimate
