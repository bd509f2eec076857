"""Faults and bad input through the CLI: one clear line, a non-zero exit, nothing lost or written."""

import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from _cli import _cmd, _committed, _env, _final_params, _train, _train_args


def _run(args, tmp_path, timeout=300):  # noqa: ANN001, ANN202
    return subprocess.run(args, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def _one_line_error(result, code, *fragments):  # noqa: ANN001, ANN202
    assert result.returncode == code, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "extra,code,fragments",
    [
        (["data.image_size=29"], 2, ["image_size 29 is not divisible by 2", "use 28 or 30"]),
        (["data.batch_size=7"], 2, ["global batch 7 does not divide by the 2 devices"]),
        (["training.grad_accum_steps=3"], 2, ["training.grad_accum_steps=3 does not divide the 4 examples each of the 2 "
                                              "devices gets (data.batch_size=8); use a divisor of 4 (e.g. 2, 4)"]),
        (["data.channels=2"], 2, ["data.channels must be 1 or 3"]),
        (["model.num_classes=7"], 2, ["fashion_mnist has 10 classes"]),
        (["data.dataset=no_such_dataset_xyz"], 1, ["no_such_dataset_xyz"]),
    ],
)
def test_bad_setup_fails_before_writing_anything(fashion_mnist_data_dir, tmp_path, extra, code, fragments):
    workdir = tmp_path / "never"
    result = _run(_train_args(fashion_mnist_data_dir, workdir, 4, *extra), tmp_path)
    _one_line_error(result, code, *fragments)
    assert not workdir.exists()


def test_unwritable_workdir(fashion_mnist_data_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = _run(_train_args(fashion_mnist_data_dir, blocker / "run", 4), tmp_path)
    _one_line_error(result, 1, "cannot write to workdir", "--workdir")
    assert blocker.read_text() == "not a folder"


@pytest.mark.slow
def test_workdir_with_another_config_is_refused_unless_forced(reference_run, fashion_mnist_data_dir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference_run[0], workdir)
    before = (workdir / "config.json").read_text()
    result = _run(_train_args(fashion_mnist_data_dir, workdir, 8, "optim.lr=5e-4"), tmp_path)
    _one_line_error(result, 2, "holds a run with a different config", "optim.lr: 0.001 -> 0.0005", "--force",
                    f"`ddpm-eqx train --workdir {workdir}` to continue it as it was")
    assert (workdir / "config.json").read_text() == before
    listing = sorted((p, p.stat().st_size, p.stat().st_mtime_ns) for p in workdir.rglob("*") if p.name != ".lock")
    # Weights of other shapes: --force cannot continue it (it failed later, blaming the checkpoints).
    result = _run([*_train_args(fashion_mnist_data_dir, workdir, 8, "model.dim=16"), "--force"], tmp_path)
    _one_line_error(result, 2, "other shapes than this config's train state (model.dim: 8 -> 16)",
                    "not even --force", "use another --workdir")
    # Fewer steps than the run has done: nothing to train (it exited 0 and rewrote config.json to 6 steps).
    result = _run(_train_args(fashion_mnist_data_dir, workdir, 6), tmp_path)
    _one_line_error(result, 2, "this run is at step 8, past training.num_train_steps=6: nothing to train")
    # Restored into a new run at or past its length: nothing to train (it exited 0 without a checkpoint).
    result = _run([*_train_args(fashion_mnist_data_dir, tmp_path / "new", 8), "--restore-from", str(workdir)], tmp_path)
    _one_line_error(result, 2, f"--restore-from {workdir} is at step 8, not below training.num_train_steps=8",
                    "give training.num_train_steps above 8")
    assert _committed(tmp_path / "new") == []
    assert (workdir / "config.json").read_text() == before
    assert sorted((p, p.stat().st_size, p.stat().st_mtime_ns) for p in workdir.rglob("*") if p.name != ".lock") == listing
    # A forced start killed before its first save leaves config.json with its config (lr 5e-4), which the
    # checkpoints were never trained with: the run is what its newest checkpoint says (lr 1e-3).
    (workdir / "config.json").write_text(before.replace('"lr": 0.001', '"lr": 0.0005'))
    # More steps for the same run is not a different run: it resumes, and --workdir alone takes its config.
    more = _run(_cmd("train", "--workdir", str(workdir), "--host-devices", "2", "--set", "training.num_train_steps=10"),
                tmp_path)
    assert more.returncode == 0 and "resumed from" in more.stderr, more.stderr[-2000:]
    assert "finished at step 10" in more.stdout and _committed(workdir)[-1] == 10
    assert json.loads((workdir / "config.json").read_text())["optim"]["lr"] == 0.001
    # The edited config.json is kept, and said so (it was overwritten silently).
    assert "differed from the config the newest checkpoint was trained with (optim.lr: 0.0005 -> 0.001)" in more.stderr
    [kept] = workdir.glob("config.*.json")
    assert json.loads(kept.read_text())["optim"]["lr"] == 0.0005


def test_a_config_json_written_before_an_option_existed_is_the_same_run():
    """A key config.json lacks (an older ddpm-eqx, before the option) counts as its default, not a change."""
    import cli
    from ddpm_eqx.config import Config, apply_overrides, to_dict

    new = to_dict(apply_overrides(Config(), ["optim.lr=5e-4"]))
    old = json.loads(json.dumps(new))  # as config.json reads back: tuples are lists
    assert cli._config_differences(old, new) == []
    accumulating = to_dict(apply_overrides(Config(), ["optim.lr=5e-4", "training.grad_accum_steps=4"]))
    assert cli._config_differences(old, accumulating) == []  # the same run on a smaller machine
    del old["training"]["eval_num"], old["model"]["dim_mults"], old["seed"]
    assert cli._config_differences(old, new) == []
    changed = to_dict(apply_overrides(Config(), ["optim.lr=5e-4", "training.eval_num=5", "seed=7"]))
    assert cli._config_differences(old, changed) == ["seed: 42 -> 7"]  # eval_num: no evaluation rows to compare
    # The grids' sampler may change on resume, unless training.eval_every scores samples drawn with it.
    grids = to_dict(apply_overrides(Config(), ["optim.lr=5e-4", "sampling.sampler=ddim", "sampling.steps=50"]))
    assert cli._config_differences(old, grids) == []
    scored = json.loads(json.dumps(to_dict(apply_overrides(Config(), ["optim.lr=5e-4", "training.eval_every=100"]))))
    assert cli._config_differences(scored, {**grids, "training": scored["training"]}) == [
        "sampling.sampler: 'ddpm' -> 'ddim' (the sampler of training.eval_every's scores)",
        "sampling.steps: None -> 50 (the sampler of training.eval_every's scores)"]
    assert cli._config_differences(scored, {**scored, "training": {**scored["training"], "eval_num": 500}}) == [
        "training.eval_num: 1000 -> 500 (the sample count of training.eval_every's scores)"]
    old["optim"]["lr"] = 1e-3
    assert cli._config_differences(old, new) == ["optim.lr: 0.001 -> 0.0005"]


def test_config_json_is_a_run_only_beside_checkpoints_and_a_failed_forced_start_leaves_it(tmp_path):
    """A config.json without checkpoints is an attempt that never saved (a bad split, say): the next command
    replaces it. Beside checkpoints another config needs --force, and a forced start that fails before saving
    (a changed optimizer whose state cannot be restored) puts config.json back, so the old command resumes."""
    import typer

    import cli
    from ddpm_eqx.config import Config, apply_overrides, from_json, to_json

    a, b = Config(), apply_overrides(Config(), ["optim.lr=5e-4"])
    workdir = tmp_path / "run"
    cli._prepare_workdir(workdir, a, force=False)
    cli._prepare_workdir(workdir, b, force=False)  # no checkpoint yet: replaced, not refused
    assert from_json((workdir / "config.json").read_text()) == b
    (workdir / "checkpoints" / "4").mkdir(parents=True)
    with pytest.raises(typer.Exit) as refused:
        cli._prepare_workdir(workdir, a, force=False)
    assert refused.value.exit_code == 2 and (workdir / "config.json").read_text() == to_json(b)
    undo = cli._prepare_workdir(workdir, a, force=True)
    assert (workdir / "config.json").read_text() == to_json(a)
    assert (workdir / "config.0.json").read_text() == to_json(b)
    undo()  # failed before its first save
    assert (workdir / "config.json").read_text() == to_json(b) and not (workdir / "config.0.json").exists()
    undo = cli._prepare_workdir(workdir, a, force=True)
    (workdir / "checkpoints" / "6").mkdir()  # saved with the new config, then failed
    undo()
    assert (workdir / "config.json").read_text() == to_json(a)
    assert (workdir / "config.0.json").read_text() == to_json(b)
    # The next backup is numbered after the highest (counted, it overwrote config.1.json once config.0 was deleted).
    (workdir / "config.5.json").write_text("kept")
    cli._prepare_workdir(workdir, b, force=True)
    assert (workdir / "config.6.json").read_text() == to_json(a) and (workdir / "config.5.json").read_text() == "kept"
    assert (workdir / "config.0.json").read_text() == to_json(b)
    # Another tool's folder (a model's config.json): refused, or with --force replaced and kept (overwritten before).
    foreign = tmp_path / "bert"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "bert", "hidden_size": 768}')
    with pytest.raises(typer.Exit) as refused:
        cli._prepare_workdir(foreign, a, force=False)
    assert refused.value.exit_code == 2 and "bert" in (foreign / "config.json").read_text()
    cli._prepare_workdir(foreign, a, force=True)
    assert from_json((foreign / "config.json").read_text()) == a and "bert" in (foreign / "config.0.json").read_text()
    # A new workdir's start that fails before saving (--init-from another architecture) leaves no config.json, and
    # no folder where it made one and nothing else was written (it left its lock and an empty checkpoints/).
    undo = cli._prepare_workdir(tmp_path / "new", a, force=False)
    assert (tmp_path / "new" / "config.json").is_file()
    (tmp_path / "new" / "checkpoints").mkdir()  # as the Checkpointer makes it
    undo()
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made is theirs
    undo = cli._prepare_workdir(tmp_path / "mine", a, force=False)
    undo()
    assert (tmp_path / "mine").is_dir() and not (tmp_path / "mine" / "config.json").exists()
    undo = cli._prepare_workdir(tmp_path / "new", a, force=False)
    (tmp_path / "new" / "wandb").mkdir()  # something else was written: kept
    undo()
    assert (tmp_path / "new" / "wandb").is_dir() and not (tmp_path / "new" / "config.json").exists()


def test_a_stopped_fine_tuning_start_leads_only_its_own_rerun_to_its_source(tmp_path, capsys):
    """init_from.json, left by an --init-from start killed before its first checkpoint, made any later train in
    that workdir (another config, no --init-from) start from that source, or fail naming an --init-from it never
    gave ("its model is another architecture")."""
    import cli
    from ddpm_eqx.config import Config, apply_overrides

    a = Config()
    workdir = tmp_path / "ft"
    origin = workdir / "init_from.json"
    record = json.dumps({"init_from": "runs/source", "checkpoint": "runs/source/checkpoints/8", "step": 8})

    wandb_id = workdir / "wandb_id.txt"  # likewise its W&B run: another config logged into it from step 0 again

    def attempt() -> None:  # the killed start: its config.json, init_from.json and W&B run id, no checkpoint
        cli._prepare_workdir(workdir, a, force=False, source="runs/source")
        origin.write_text(record)
        wandb_id.write_text("abc123")

    attempt()
    cli._prepare_workdir(workdir, apply_overrides(a, ["training.num_train_steps=20000"]), force=False)  # its rerun
    assert origin.read_text() == record and wandb_id.read_text() == "abc123"
    assert "dropped" not in capsys.readouterr().err
    undo = cli._prepare_workdir(workdir, apply_overrides(a, ["model.dim=32"]), force=False)  # another run
    assert not origin.exists() and not wandb_id.exists()
    assert capsys.readouterr().err.strip() == (
        f"note: {origin} (a start from runs/source that stopped before its first checkpoint) is dropped: this "
        "command's config is another; give --init-from to start from it")
    undo()  # that run failed before it saved: the attempt is as it was
    assert origin.read_text() == record and wandb_id.read_text() == "abc123"
    cli._prepare_workdir(workdir, a, force=False, source="runs/other")  # --restore-from or another --init-from
    assert not origin.exists() and wandb_id.read_text() == "abc123" and capsys.readouterr().err == ""
    # A new start's init_from.json (written by the trainer) goes with its config.json when it fails before saving.
    fresh = tmp_path / "new"
    undo = cli._prepare_workdir(fresh, a, force=False, source="runs/source")
    (fresh / "init_from.json").write_text(record)
    undo()
    assert not (fresh / "init_from.json").exists() and not (fresh / "config.json").exists()


@pytest.mark.parametrize("override, message", [
    ("model.init_dim=0", "model.init_dim must be positive or None"), ("model.attn_dim_head=0", "model.attn_dim_head"),
    ("model.resnet_block_groups=0", "model.resnet_block_groups must be positive"),
    ("model.dim=2", "model.dim must be at least 4 for the sinusoidal time embedding (two frequencies), got 2"),
    ("training.eval_num=1", "training.eval_num must be >= 2"), ("ema.power=0", "ema.power must be > 0"),
    ("ema.min_value=0.999", "ema.min_value must be in [0, ema.beta]"),
    ("model.out_dim=3", "model.out_dim=3 must equal data.channels=1"),
    ("sampling.steps=5", "sampling.steps=5 needs sampling.sampler=ddim"),
    ("sampling.eta=0.5", "sampling.eta=0.5 needs sampling.sampler=ddim"),
    ("sampling.guidance=3", "sampling.guidance=3.0 needs a class-conditional model"),
    ("optim.optimizer=AdamW", "optim.optimizer=AdamW with optim.weight_decay=0 is Adam"),
    ("training.cond_drop_prob=0", "sampling.guidance=2.0 needs training.cond_drop_prob > 0"),
])
def test_values_that_would_crash_later_or_do_nothing_are_config_errors(override, message):
    """Each of these used to pass the config and fail with a traceback (a division by zero, an empty FID, a
    grid sampler whose carry changed shape), or change nothing at all (options the DDPM grids or an
    unconditional model ignore; AdamW without a decay)."""
    from ddpm_eqx.config import Config, ConfigError, apply_overrides

    given = [override, "model.num_classes=10", "sampling.guidance=2"] if "cond_drop" in override else [override]
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_overrides(Config(), given)
    fixed = {"model.out_dim=3": "data.channels=3", "sampling.steps=5": "sampling.sampler=ddim",
             "sampling.eta=0.5": "sampling.sampler=ddim", "sampling.guidance=3": "model.num_classes=10",
             "optim.optimizer=AdamW": "optim.weight_decay=1e-4"}
    if override in fixed:  # with what it needs, it is a valid config
        apply_overrides(Config(), [override, fixed[override]])
    if override in fixed or "cond_drop" in override:
        # A run of an earlier version that trained with an option doing nothing still samples and resumes:
        # its stored config.json is held to the checks against values that fail, not to these.
        import json

        from ddpm_eqx.config import from_dict, to_dict

        stored = to_dict(Config())
        for item in given:
            key, value = item.split("=")
            section, name = key.split(".")
            parsed = json.loads(value) if value[0].isdigit() else value
            stored[section][name] = float(parsed) if isinstance(stored[section][name], float) else parsed  # as stored
        if override.startswith("model.out_dim"):  # that one fails at the first sample: refused as stored too
            with pytest.raises(ConfigError, match=re.escape(message)):
                from_dict(stored)
        else:
            assert from_dict(stored).optim.optimizer in ("Adam", "AdamW")


def test_a_workdir_in_use_by_another_trainer_is_refused(tmp_path, capsys):
    """A resume started while the pre-empted run still lives would share its metrics and checkpoints."""
    import typer

    import cli
    from ddpm_eqx.config import Config

    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        lock = open({str(workdir / ".lock")!r}, "a+")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(str(os.getpid())); lock.flush()
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(typer.Exit) as refused:
            cli._prepare_workdir(workdir, Config(), force=False)
        assert refused.value.exit_code == 1 and not (workdir / "config.json").exists()
        assert f"is in use by another ddpm-eqx train (pid {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    cli._prepare_workdir(workdir, Config(), force=False)  # the holder is gone (killed): its lock went with it
    assert (workdir / "config.json").exists() and (workdir / ".lock").read_text() == str(os.getpid())


def test_a_file_system_without_locks_trains_unguarded_with_a_warning(tmp_path, monkeypatch, capsys):
    """Only another holder is a refusal; ENOLCK (NFS without lockd) must not make the workdir unusable."""
    import errno
    import fcntl

    import cli
    from ddpm_eqx.config import Config

    def no_locks(*args):  # noqa: ANN002, ANN202
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    cli._prepare_workdir(tmp_path / "run", Config(), force=False)
    assert (tmp_path / "run" / "config.json").exists()
    assert "warning: cannot lock" in capsys.readouterr().err


def test_a_step_folder_names_its_run_and_step(tmp_path, monkeypatch):
    """``sample --ckpt`` and ``train --restore-from`` take <run>/checkpoints/<step> too (and expand ~)."""
    from ddpm_eqx.checkpoint import CheckpointError
    from ddpm_eqx.generate_cli import find_run
    from ddpm_eqx.train import _resolve_restore_from

    run = tmp_path / "run"
    (run / "checkpoints" / "40" / "state").mkdir(parents=True)
    (run / "checkpoints" / "80" / "state").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    monkeypatch.setenv("HOME", str(tmp_path))
    for given in (run, run / "checkpoints", Path("~/run")):
        assert find_run(given) == (run, run / "checkpoints", None)
    assert find_run(run / "checkpoints" / "40") == (run, run / "checkpoints", 40)
    assert _resolve_restore_from("~/run") == (run / "checkpoints", None)
    assert _resolve_restore_from(str(run / "checkpoints" / "40")) == (run / "checkpoints", 40)
    with pytest.raises(CheckpointError, match="names step 40's folder but --step is 80"):
        from ddpm_eqx.generate_cli import load_ema_model

        load_ema_model(run / "checkpoints" / "40", 80)


def test_more_steps_of_a_cosine_decay_run_is_a_different_run():
    """Its lr schedule is stretched over the run's length; a constant or warm-up schedule's is not."""
    import cli
    from ddpm_eqx.config import Config, apply_overrides, to_dict

    def cfg(*overrides):  # as config.json reads back: tuples are lists
        return json.loads(json.dumps(to_dict(apply_overrides(Config(), list(overrides)))))

    assert cli._config_differences(cfg("optim.cosine_decay=true"),
                                   cfg("optim.cosine_decay=true", "training.num_train_steps=20000")) == [
        "training.num_train_steps: 12000 -> 20000 (re-stretches optim.cosine_decay's lr)"]
    assert cli._config_differences(cfg("optim.warmup_steps=10"),
                                   cfg("optim.warmup_steps=10", "training.num_train_steps=20000")) == []


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_and_nothing_is_deleted(reference_run, fashion_mnist_data_dir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference_run[0], workdir)
    # Truncate every data file of the newest checkpoint's state.
    state_dir = workdir / "checkpoints" / "8" / "state"
    files = [p for p in state_dir.rglob("*") if p.is_file() and p.stat().st_size > 0]
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    sample = _run(_cmd("sample", "--ckpt", str(workdir), "--num", "2", "--sampler", "ddim", "--steps", "3",
                       "--out", str(tmp_path / "s.png")), tmp_path)
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert "checkpoint" in sample.stderr and "/8 is unreadable" in sample.stderr
    assert "sampled 2 images from step 6" in sample.stderr
    assert state_dir.exists()  # sample only reads
    resumed = _train(fashion_mnist_data_dir, workdir, 8, tmp_path)
    assert "/8 is unreadable" in resumed.stderr and "resumed from" in resumed.stderr
    moved = list((workdir / "checkpoints_unreadable").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("8-")  # kept, not deleted
    # Redoing steps 7-8 from step 6 gives the uninterrupted run's parameters exactly.
    for a, b in zip(_final_params(reference_run[0], 8), _final_params(workdir, 8), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_nan_loss_stops_naming_a_good_checkpoint_and_the_advised_resume_trains(fashion_mnist_data_dir, tmp_path):
    """Step k's loss comes from step k - 1's parameters, whose checkpoint may be on disk already: it is moved
    aside (kept), and the step named as good is one whose parameters gave a finite loss, so that the resume the
    message advises (a lower lr, --force) trains on instead of meeting the same NaN."""
    import json

    workdir = tmp_path / "nan"
    # The lr warms up from 0 (the first update leaves the model as it was), then 1e30 blows it up.
    blow_up = ["optim.lr=1e30", "optim.warmup_steps=100", "training.loss_type=l2", "training.save_and_sample_every=1"]
    result = _run(_train_args(fashion_mnist_data_dir, workdir, 200, *blow_up), tmp_path)
    _one_line_error(result, 1, "at step", "the last good checkpoint is step", "Lower optim.lr", "resume with --force")
    message = [line for line in result.stderr.splitlines() if line.startswith("error: ")][0]
    bad_step = int(message.split("at step ")[1].split(" ")[0])
    assert bad_step >= 3 and f"the last good checkpoint is step {bad_step - 2}." in message, message
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == bad_step - 2  # the one that gave the NaN is no longer a step to resume from ...
    [moved] = list((workdir / "checkpoints_nonfinite").iterdir())  # ... but kept
    assert moved.name.startswith(f"{bad_step - 1}-") and str(moved) in message

    resumed = _run(_train_args(fashion_mnist_data_dir, workdir, bad_step + 4, "optim.lr=1e-4",
                               "training.loss_type=l2", "training.save_and_sample_every=1") + ["--force"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {bad_step - 2}" in resumed.stderr  # resumed from the step the message named
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    after = [row["loss"] for row in rows if "loss" in row and row["step"] > bad_step - 2]
    assert after and np.isfinite(after).all(), after


def test_sample_rejects_a_checkpoint_of_another_model(reference_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference_run[0], workdir)
    config = (workdir / "config.json").read_text().replace('"dim": 8', '"dim": 16')
    (workdir / "config.json").write_text(config)
    # Checkpoints carry the config they were trained with, which sample reads over config.json: only where they name
    # none (an older ddpm-eqx's) does config.json describe the model.
    for meta in (workdir / "checkpoints").glob("*/meta/metadata"):
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "config"}))
    result = _run(_cmd("sample", "--ckpt", str(workdir), "--num", "2"), tmp_path)
    _one_line_error(result, 1, "do not match the model its config.json describes", "is not stored there")


def test_sample_label_for_unconditional_model(reference_run, tmp_path):
    result = _run(_cmd("sample", "--ckpt", str(reference_run[0]), "--num", "2", "--label", "3"), tmp_path)
    _one_line_error(result, 1, "not class-conditional")


def test_sample_guidance_for_unconditional_model_is_an_error_not_a_no_op(tmp_path):
    import equinox as eqx

    from ddpm_eqx.config import Config, apply_overrides
    from ddpm_eqx.generate_cli import SampleRequest, _draw

    class NeverUsed(eqx.Module):  # checked before the model is used
        pass

    request = SampleRequest(ckpt=tmp_path, guidance=3.0)
    with pytest.raises(ValueError, match="--guidance 3.0: this model is not class-conditional; drop --guidance"):
        _draw(request, Config(), NeverUsed())
    # Nor for a conditional model that never saw the null class (no label dropout): its "unconditional"
    # prediction is an untrained embedding.
    never_dropped = apply_overrides(Config(), ["model.num_classes=10", "training.cond_drop_prob=0"])
    with pytest.raises(ValueError, match="trained with training.cond_drop_prob=0"):
        _draw(request, never_dropped, NeverUsed())


@pytest.mark.parametrize(("env", "expected"), [
    ({}, ["online", "offline", "disabled"]),
    ({"WANDB_MODE": "disabled"}, ["disabled", "disabled", "disabled"]),
    ({"WANDB_DISABLED": "true"}, ["disabled", "disabled", "disabled"]),
    ({"WANDB_MODE": "offline"}, ["offline", "offline", "disabled"]),
    ({"WANDB_MODE": "online"}, ["online", "offline", "disabled"]),
])
def test_wandbs_own_environment_switches_turn_logging_down_never_up(monkeypatch, tmp_path, env, expected):
    """WANDB_MODE=disabled was ignored: the config's mode went to wandb.init, which lets it win."""
    from ddpm_eqx.config import Config, WandbConfig
    from ddpm_eqx.logging_utils import start_wandb, wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert [wandb_mode(WandbConfig(mode=m)) for m in ("online", "offline", "disabled")] == expected
    if expected[0] == "disabled":
        assert start_wandb(WandbConfig(mode="online"), Config(), tmp_path) is None and not any(tmp_path.iterdir())


def test_wandb_online_without_login_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    from ddpm_eqx.config import Config, WandbConfig
    from ddpm_eqx.logging_utils import start_wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    run = start_wandb(WandbConfig(mode="online"), Config(), tmp_path)
    try:
        assert run is not None and run.settings.mode == "offline"
        assert any("no W&B login" in r.message for r in caplog.records)
    finally:
        run.finish()


def test_wandb_online_that_cannot_reach_wandb_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    """With a key but no way to W&B, wandb.init waited ~105 s and raised CommError: a traceback, no training. Now
    it falls back to offline, for a resumed run's id too (the failed init keeps the id in wandb's service: the
    retry read "run ID ... is in use" until the service was torn down). A closed local port stands in for W&B."""
    from ddpm_eqx.config import Config, WandbConfig
    from ddpm_eqx.logging_utils import start_wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "10")
    import wandb

    wandb.teardown()  # a service an earlier test started keeps that test's environment (W&B's real address)
    run = start_wandb(WandbConfig(mode="online"), Config(), tmp_path, resume_id="abcd1234")
    try:
        assert run.settings.mode == "offline" and run.id == "abcd1234"
        assert any("W&B could not start online" in r.message for r in caplog.records)
    finally:
        run.finish()


def test_restore_from_beside_a_runs_own_checkpoints_says_it_is_not_used(tmp_path, caplog):
    """A workdir's own checkpoints win over --restore-from (a resume), which was silently ignored."""
    import jax.numpy as jnp

    from ddpm_eqx.checkpoint import Checkpointer
    from ddpm_eqx.state import TrainState
    from ddpm_eqx.train import _restore

    state = TrainState(step=jnp.int32(6), model={}, ema_model={}, opt_state=())

    class Own(Checkpointer):
        def __init__(self) -> None:  # no Orbax manager: the two calls _restore makes
            self.directory = tmp_path / "run" / "checkpoints"

        def restore_latest(self, skeleton, layouts=()):  # noqa: ANN001, ANN201
            return 6, state, None, {}

        def quarantine_after(self, step, **kwargs):  # noqa: ANN001, ANN003, ANN201
            return []

    assert _restore(Own(), state, None, tmp_path / "other", {}) == (state, [])
    [said] = [r.message for r in caplog.records if "--restore-from" in r.message]
    assert said == (f"resuming this run's own step 6 from {tmp_path / 'run' / 'checkpoints'}; --restore-from "
                    f"{tmp_path / 'other'} applies to a workdir without checkpoints")


@pytest.mark.slow
def test_disk_full_while_saving_is_a_clear_error_and_the_previous_checkpoint_survives(fashion_mnist_data_dir, tmp_path):
    """A 6 MB tmpfs: the tiny model's first checkpoint fits, one of the six saves of a 12-step run cannot.

    A checkpoint took 1.3-2.6 MB on one machine and 2.3-3.0 MB on another (Orbax's OCDBT splits the data
    into a timing-dependent number of files), so the disk holds at least one and at most four of them:
    a 3.5 MB disk failed the first save on the second machine in 2 runs of 4."""
    mount = tmp_path / "tiny_disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6000k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        workdir = mount / "run"
        result = _run(_train_args(fashion_mnist_data_dir, workdir, 12), tmp_path)
        assert result.returncode == 1, result.stderr[-2000:]
        # One line, not Orbax's echoes of the failure (its threads' error logs, "Event loop is closed"):
        # either the free-space check refuses the save, or the disk fills mid-write and the CLI drops those.
        error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(error) == 1 and "could not write " in error[0], result.stderr[-3000:]
        assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr, result.stderr[-3000:]
        assert "No space left on device" in error[0]
        intact = re.search(r"checkpoint step (\d+) is intact", error[0])
        assert intact is not None, error[0]
        intact = int(intact.group(1))
        steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
        assert intact == steps[-1]  # the newest complete checkpoint is the one named
        failed = re.search(r"at step (\d+)", error[0])  # absent when the failure surfaced while waiting
        assert failed is None or int(failed.group(1)) > intact
        params = _final_params(workdir, intact)  # and it restores
        assert all(np.isfinite(x).all() for x in params if np.issubdtype(x.dtype, np.floating))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["checkpoint", "metrics"])
def test_a_disk_that_fills_is_one_clear_error_naming_the_intact_checkpoint(where, fashion_mnist_data_dir, tmp_path,
                                                                           monkeypatch):
    """The always-run twin of the tmpfs test: ENOSPC injected at step 6 into the checkpoint save, or into
    the metrics append (which an asynchronous save can starve of space). Either way one CheckpointError
    names the file and the newest complete checkpoint, which is step 4 and restores."""
    import errno

    import orbax.checkpoint as ocp

    from _cli import in_process_config
    from ddpm_eqx.checkpoint import CheckpointError
    from ddpm_eqx.config import to_json
    from ddpm_eqx.logging_utils import MetricsWriter
    from ddpm_eqx.train import train

    def full(path: object) -> OSError:
        return OSError(errno.ENOSPC, "No space left on device", str(path))

    if where == "checkpoint":
        save = ocp.CheckpointManager.save

        def failing_save(self, step, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if step == 6:
                raise full(Path(self.directory) / "6.orbax-checkpoint-tmp")
            return save(self, step, *args, **kwargs)

        monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
    else:
        write = MetricsWriter.write

        def failing_write(self, step, metrics, **kwargs):  # noqa: ANN001, ANN003, ANN202
            if step == 6:
                raise full(self.path)
            return write(self, step, metrics, **kwargs)

        monkeypatch.setattr(MetricsWriter, "write", failing_write)
    cfg = in_process_config(fashion_mnist_data_dir)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(to_json(cfg))  # as the CLI writes it; _final_params reads it
    with pytest.raises(CheckpointError) as raised:
        train(cfg, workdir, progress=False)
    what = (f"a checkpoint at step 6 in {workdir.absolute() / 'checkpoints'}" if where == "checkpoint"
            else str(workdir / "metrics.jsonl"))
    assert str(raised.value) == (f"could not write {what}: No space left on device; free space there and resume "
                                 "(checkpoint step 4 is intact)")
    assert _committed(workdir) == [2, 4]
    assert all(np.isfinite(x).all() for x in _final_params(workdir, 4) if np.issubdtype(x.dtype, np.floating))


@pytest.mark.slow
def test_a_run_waiting_on_its_input_says_so_once_and_logs_the_share(reference_run, fashion_mnist_data_dir, tmp_path,
                                                                     monkeypatch, warnings_logged):
    """A loader slower than the steps (1 s a batch against tiny steps) shows in metrics.jsonl's ``data_wait`` and
    in one warning that names the fixes. The tiny run is the disk-full tests' program. The reference CLI run,
    whose loader keeps up, says nothing."""
    import json
    import time

    import ddpm_eqx.train
    from _cli import in_process_config
    from ddpm_eqx.train import INPUT_BOUND, train

    class Slow:
        def __init__(self, iterator):  # noqa: ANN001
            self.iterator = iterator

        def __next__(self):  # noqa: ANN204
            time.sleep(1.0)
            return next(self.iterator)

        def __getattr__(self, name):  # noqa: ANN001, ANN204  (get_state, set_state, close)
            return getattr(self.iterator, name)

    make = ddpm_eqx.train.make_train_iterator
    monkeypatch.setattr(ddpm_eqx.train, "make_train_iterator", lambda *args, **kw: Slow(make(*args, **kw)))
    cfg = in_process_config(fashion_mnist_data_dir)
    train(cfg, tmp_path, progress=False)
    assert not (tmp_path / "wandb_id.txt").exists()  # W&B is off: no id of a W&B run to resume (it was written)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8] and all(0 <= r["data_wait"] <= 1 for r in rows)
    assert all(r["data_wait"] > INPUT_BOUND for r in rows[1:]), rows
    [warning] = [w for w in warnings_logged if "input-bound" in w]
    assert "data.cache=true" in warning and "data.num_workers=2 (now 0)" in warning
    assert "input-bound" not in reference_run[1].stderr


def test_the_input_bound_advice_fits_where_the_batches_come_from(warnings_logged) -> None:  # noqa: ANN001
    """From disk: cache the split or add workers. From memory neither helps (workers only decode a cached split),
    so the warning says so instead of suggesting data.cache=true again. Nothing at or below the threshold."""
    from ddpm_eqx.config import Config, DataConfig
    from ddpm_eqx.train import INPUT_BOUND, _warn_if_input_bound

    cfg = Config(data=DataConfig(num_workers=2))
    assert not _warn_if_input_bound(cfg, INPUT_BOUND, from_memory=False) and not warnings_logged
    assert _warn_if_input_bound(cfg, 0.5, from_memory=False) and _warn_if_input_bound(cfg, 0.5, from_memory=True)
    disk, memory = warnings_logged
    assert "50%" in disk and "data.cache=true" in disk and "data.num_workers=4 (now 2)" in disk
    assert "50%" in memory and "already come from memory" in memory and "=" not in memory.split(";")[1]


@pytest.mark.parametrize("error,fix", [
    (OSError(28, "No space left on device"), "free space there"),
    (OSError(13, "Permission denied"), "make the folder writable"),
    (OSError(30, "Read-only file system"), "make the folder writable"),
    (OSError(5, "Input/output error"), "fix that"),
    (ValueError("RESOURCE_EXHAUSTED: writing 'x': [os_error_code='28']"), "free space there"),
])
def test_a_failed_save_names_the_reason_and_the_fix_that_matches_it(error, fix, tmp_path, monkeypatch):
    """Only a full disk is told to free space: a permission or I/O error gets advice that fits it."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from ddpm_eqx.checkpoint import CheckpointError, Checkpointer

    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    ckpt.save(2, {"w": jnp.ones(3)}, None, {})

    def failing_save(self, step, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise error

    monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
    with pytest.raises(CheckpointError) as raised:
        ckpt.save(4, {"w": jnp.ones(3)}, None, {})
    reason = "No space left on device" if fix == "free space there" else str(error)  # e.g. "[Errno 13] Permission denied"
    assert str(raised.value) == (f"could not write a checkpoint at step 4 in {tmp_path / 'checkpoints'}: {reason}; "
                                 f"{fix} and resume (checkpoint step 2 is intact)")
    ckpt.close()


def test_a_save_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """Free space below the estimate (0.95 of the array bytes + 512 per array, a lower bound of what
    Orbax writes): one error, nothing new on disk, the previous checkpoint intact. At the estimate it saves."""
    import jax.numpy as jnp

    from ddpm_eqx import checkpoint
    from ddpm_eqx.checkpoint import CheckpointError, Checkpointer

    state = {"w": jnp.arange(2**20, dtype=jnp.float32), "b": jnp.ones(3, jnp.int32)}
    needed = int(0.95 * (2**22 + 12)) + 2 * 512
    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(directory)
    ckpt.save(2, state, None, {})
    ckpt.wait()
    before = sorted(p.name for p in directory.iterdir())
    free = {"bytes": needed - 1}
    real = shutil.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: real(path)._replace(free=free["bytes"]))
    with pytest.raises(CheckpointError) as raised:
        ckpt.save(4, state, None, {})
    assert str(raised.value) == (f"could not write a checkpoint at step 4 in {directory}: No space left on device "
                                 "(it needs ~3.8 MiB, 3.8 MiB free); free space there and resume (checkpoint step 2 is intact)")
    assert sorted(p.name for p in directory.iterdir()) == before == ["2"]
    free["bytes"] = needed
    ckpt.save(4, state, None, {})
    ckpt.close()
    assert ckpt.all_steps() == [2, 4]


def test_an_asynchronous_save_that_fails_later_is_reported_as_its_own_step(tmp_path, monkeypatch):
    """The failure of save 4 surfaces when save 6 starts (Orbax waits for the previous save first): the
    error names step 4, not step 6, and step 6 is not attempted."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from ddpm_eqx.checkpoint import CheckpointError, Checkpointer

    ckpt = Checkpointer(tmp_path / "checkpoints")
    ckpt.save(2, {"w": jnp.ones(3)}, None, {})
    ckpt.wait()
    calls = []
    wait = ocp.CheckpointManager.wait_until_finished

    def failing_wait(self):  # noqa: ANN001, ANN202
        wait(self)
        if not calls:  # the background part of save 4 failed
            calls.append(1)
            raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: [os_error_code='28']")

    saves = []
    save = ocp.CheckpointManager.save
    ckpt.save(4, {"w": jnp.ones(3)}, None, {})
    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", failing_wait)
    monkeypatch.setattr(ocp.CheckpointManager, "save", lambda self, step, **kw: saves.append(step) or save(self, step, **kw))
    with pytest.raises(CheckpointError) as raised:
        ckpt.save(6, {"w": jnp.ones(3)}, None, {})
    assert str(raised.value) == (f"could not write a checkpoint at step 4 in {tmp_path / 'checkpoints'}: No space left "
                                 "on device; free space there and resume (checkpoint step 2 is intact)")
    assert saves == []
    ckpt.close()


def test_orbax_echoes_of_a_failed_write_are_dropped_and_nothing_else(monkeypatch, capsys):
    """`quiet_failed_async_saves` (the CLI's): error records on the absl/asyncio loggers whose exception is a
    failed write raised in Orbax, and unraisable "Event loop is closed", are dropped; other errors print."""
    import logging
    import sys

    from ddpm_eqx.checkpoint import _WriteFailureEcho, quiet_failed_async_saves

    passed: list = []
    monkeypatch.setattr(sys, "unraisablehook", passed.append)  # the hook before ours; restored after the test
    handler = logging.StreamHandler(sys.stderr)
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    try:
        for logger in loggers:
            logger.addHandler(handler)
        quiet_failed_async_saves()
        quiet_failed_async_saves()  # idempotent: one filter, one hook layer
        assert [sum(isinstance(f, _WriteFailureEcho) for f in lg.filters) for lg in loggers] == [1, 1]

        # An exception raised in a (pretend) Orbax file, as in its background threads.
        orbax_code = compile("def fail(error):\n    raise error\n", os.path.join("site-packages", "orbax", "x.py"), "exec")
        namespace: dict = {}
        exec(orbax_code, namespace)

        def raise_here(error: BaseException) -> None:
            raise error

        def log(logger: logging.Logger, message: str, error: BaseException, *, in_orbax: bool = True) -> None:
            try:
                (namespace["fail"] if in_orbax else raise_here)(error)
            except BaseException:
                logger.error(message, exc_info=True)

        log(loggers[0], "thread raised A", ValueError("RESOURCE_EXHAUSTED: Error writing [os_error_code='28']"))
        log(loggers[1], "task B never retrieved", OSError(28, "No space left on device"))
        log(loggers[0], "unrelated C", ValueError("a bug"))
        log(loggers[0], "a dataset's full disk F", OSError(28, "No space left on device"), in_orbax=False)
        loggers[1].error("no exception D")

        class Unraisable:
            def __init__(self, error: BaseException) -> None:
                self.exc_type, self.exc_value, self.exc_traceback = type(error), error, None
                self.err_msg, self.object = "Exception ignored in", None

        sys.unraisablehook(Unraisable(RuntimeError("Event loop is closed")))
        sys.unraisablehook(Unraisable(RuntimeError("something else E")))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
            logger.filters = [f for f in logger.filters if not isinstance(f, _WriteFailureEcho)]
    err = capsys.readouterr().err
    assert "unrelated C" in err and "ValueError: a bug" in err and "no exception D" in err
    assert "a dataset's full disk F" in err  # a write failure outside Orbax is not ours to hide
    assert [str(u.exc_value) for u in passed] == ["something else E"]
    assert "thread raised A" not in err and "never retrieved" not in err and "Event loop is closed" not in err


@pytest.mark.parametrize("command", ["train", "sample", "eval"])
def test_out_of_memory_is_one_line_naming_the_batch_and_the_fix(command, fashion_mnist_data_dir, tmp_path,
                                                                 monkeypatch):
    """XLA's allocation failure (raised where the work would start, as XLA raises it) through the real CLI
    commands: one line naming the batch size and the fix, exit 1; other runtime errors still raise."""
    import jax
    from typer.testing import CliRunner

    import cli
    import ddpm_eqx.generate_cli
    import ddpm_eqx.train
    from _cli import TINY

    # Keep _init_runtime from touching this process's JAX config (the variables' mere presence is enough).
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "unused_cache"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    errors = [jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 38496142536 bytes."),
              RuntimeError("something else")]

    def failing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise errors.pop(0)

    if command == "train":
        monkeypatch.setattr(ddpm_eqx.train, "train", failing)
        args = ["train", "--dataset", "fashion_mnist", "--workdir", str(tmp_path / "run"),
                *[a for s in [*TINY, f"data.data_dir={fashion_mnist_data_dir}"] for a in ("--set", s)]]
        what, fix = "data.batch_size=8", "lower it with --set data.batch_size=N"
    else:
        monkeypatch.setattr(ddpm_eqx.generate_cli, "run_sample" if command == "sample" else "draw_images", failing)
        args = [command, "--ckpt", str(tmp_path / "run"), "--batch-size", "16"]
        what, fix = "--batch-size 16", "lower --batch-size"
        if command == "eval":  # eval reads the run's config before it samples (what it needs is checked first)
            from ddpm_eqx.config import Config, apply_overrides, to_json

            (tmp_path / "run" / "checkpoints" / "1").mkdir(parents=True)  # its data: prepared (eval checks labels)
            (tmp_path / "run" / "config.json").write_text(
                to_json(apply_overrides(Config(), [f"data.data_dir={fashion_mnist_data_dir}"])))
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert lines == [f"error: out of memory with {what} (RESOURCE_EXHAUSTED: Out of memory allocating "
                     f"38496142536 bytes.); {fix}; checkpoints are untouched"]
    result = CliRunner().invoke(cli.app, args)
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "something else"


def _writing(workdir: Path, since: float) -> bool:
    """An Orbax checkpoint is being written: a temporary directory changed after ``since`` (a killed
    run's leftover is older)."""
    root = workdir / "checkpoints"
    try:
        return root.is_dir() and any("tmp" in p.name and p.stat().st_mtime >= since for p in root.iterdir())
    except FileNotFoundError:  # renamed into place while we looked
        return False


@pytest.mark.slow
def test_sigkill_at_five_random_moments_still_ends_bitwise_equal(reference_run, fashion_mnist_data_dir, tmp_path):
    """SIGKILL five times, at seeded random moments of four kinds: during start-up, while Orbax writes a
    checkpoint (twice), during training steps, and just after a checkpoint commits. Every restart
    resumes from the newest complete checkpoint, and the run ends with the uninterrupted run's parameters
    and losses, bit for bit. (The kinds are chosen so that no attempt can reach the last step. Each attempt
    is a process start, ~15-25 s here: ten kills were 190-250 s of the suite.)"""
    import random
    import signal

    ref_dir, _ = reference_run  # 8 steps, a checkpoint every 2
    steps, rng = 8, random.Random(0)
    workdir, env, log_path = tmp_path / "killed", _env(tmp_path), tmp_path / "attempt.log"
    kinds = ["write", "startup", "step", "write", "commit"]
    for i, kind in enumerate(kinds):
        before = _committed(workdir)
        first_logged = (before[-1] if before else 0) + 2  # log_every_steps=2
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(_train_args(fashion_mnist_data_dir, workdir, steps), env=env, stdout=log_file,
                                    stderr=subprocess.STDOUT)
            launched, deadline = time.time(), time.time() + 300
            startup_wait, step_wait = rng.uniform(0.0, 3.0), rng.uniform(0.0, 0.3)
            while proc.poll() is None and time.time() < deadline:
                now = time.time()
                if ((kind == "startup" and now - launched >= startup_wait)
                        or (kind == "write" and _writing(workdir, launched))
                        or (kind == "commit" and _committed(workdir) != before)
                        or (kind == "step" and f"step {first_logged}/{steps}" in log_path.read_text())):
                    if kind == "step":
                        time.sleep(step_wait)
                    elif kind == "commit":
                        time.sleep(rng.uniform(0.0, 0.02))
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.002)
            code = proc.wait(timeout=60)
        text = log_path.read_text()
        assert code == -signal.SIGKILL, f"kill {i} ({kind}) came too late: the run exited {code}\n{text[-2000:]}"
        if before and kind != "startup":  # it got past start-up, so it restored...
            assert "resumed from" in text, text[-2000:]
        if "resumed from" in text:  # ...the newest complete checkpoint, never a half-written one
            assert f"at step {before[-1]}" in text, text[-2000:]
    final = _train(fashion_mnist_data_dir, workdir, steps, tmp_path)
    assert f"finished at step {steps}" in final.stdout
    for a, b in zip(_final_params(ref_dir, steps), _final_params(workdir, steps), strict=True):
        np.testing.assert_array_equal(a, b)
    # metrics.jsonl: every line parses, each step once, the same losses as the uninterrupted run.
    ref_rows, rows = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
                      for d in (ref_dir, workdir))
    assert [(r["step"], r["loss"]) for r in rows] == [(r["step"], r["loss"]) for r in ref_rows]
    assert [r["step"] for r in rows] == list(range(2, steps + 1, 2))


LEGACY_OIHW = Path(__file__).parent / "data" / "legacy_oihw"


def test_a_checkpoint_of_an_older_version_with_oihw_kernels_restores_as_the_same_state():
    """tests/data/legacy_oihw was written by ddpm-eqx 31589f9, whose convolution kernels were eqx.nn.Conv2d's
    (OIHW weights, (o, 1, 1) biases): a tiny self-conditioned, class-conditional U-Net after two Adam steps,
    with its outputs for one input (tests/data/make_legacy_oihw.py). Restored now, the model and its EMA
    compute the same function and the optimizer moments sit with their (now HWIO) kernels; its optimizer
    state, optax.adam's tree then, is read into today's chain."""
    import jax
    import jax.numpy as jnp

    from ddpm_eqx.checkpoint import Checkpointer
    from ddpm_eqx.config import from_dict
    from ddpm_eqx.train import earlier_layouts, state_skeleton

    cfg = from_dict(json.loads((LEGACY_OIHW / "config.json").read_text()))
    ckpt = Checkpointer(LEGACY_OIHW / "checkpoints", read_only=True)
    skeleton = state_skeleton(cfg)
    step, state, _, meta = ckpt.restore_latest(skeleton, layouts=earlier_layouts(cfg, skeleton))
    ckpt.close()
    assert step == meta["step"] == 2
    ref = np.load(LEGACY_OIHW / "reference.npz")
    for name in ("model", "ema_model"):
        out = getattr(state, name)(jnp.asarray(ref["x"]), jnp.asarray(ref["t"]),
                                   x_self_cond=jnp.asarray(ref["x_self_cond"]), label=jnp.asarray(ref["label"]))
        np.testing.assert_allclose(out, ref[name], rtol=1e-5, atol=1e-5)
    assert jax.tree_util.tree_structure(state.opt_state) == jax.tree_util.tree_structure(skeleton.opt_state)
    adam = state.opt_state[1]  # written as optax.adam's (adam, schedule), read as make_optimizer's chain
    np.testing.assert_array_equal(adam.mu.init_conv.weight, ref["mu_init_conv_weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(adam.nu.init_conv.bias, ref["nu_init_conv_bias"].reshape(-1))
    np.testing.assert_array_equal(adam.mu.downs[0].attn.fn.to_qkv.weight, ref["mu_to_qkv_weight"].transpose(2, 3, 1, 0))
    assert int(adam.count) == 2


def _saved_state(tmp_path, overrides, optimizer=None):
    """A tiny model's state after one update, saved at step 1; its config and the state."""
    import equinox as eqx
    import jax

    from _cli import TINY
    from ddpm_eqx.checkpoint import Checkpointer
    from ddpm_eqx.config import Config, apply_overrides
    from ddpm_eqx.state import init_state, make_optimizer, trainable
    from ddpm_eqx.train import build_model

    cfg = apply_overrides(Config(), [*TINY, *overrides])
    model = build_model(cfg)
    optimizer = optimizer or make_optimizer(cfg.optim, cfg.training.num_train_steps)
    state = init_state(model, optimizer)
    params = eqx.filter(model, trainable(model))
    grads = jax.tree_util.tree_map(lambda p: 0.1 * p + 0.01, params)
    _, opt_state = optimizer.update(grads, state.opt_state, params)
    state = eqx.tree_at(lambda s: s.opt_state, state, opt_state)
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    ckpt.save(1, state, None, {"step": 1})
    ckpt.close()
    return cfg, state


def _restored(tmp_path, cfg):
    import jax

    from ddpm_eqx.checkpoint import Checkpointer
    from ddpm_eqx.train import earlier_layouts, state_skeleton

    skeleton = state_skeleton(cfg)
    ckpt = Checkpointer(tmp_path / "checkpoints", read_only=True)
    try:
        _, state, _, _ = ckpt.restore_latest(skeleton, layouts=earlier_layouts(cfg, skeleton))
    finally:
        ckpt.close()
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(skeleton)
    return state


def _same_arrays(a, b):
    import jax

    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_run_resumes_with_clipping_and_weight_decay_switched_on(tmp_path):
    """A non-finite loss advises optim.grad_clip, then a resume (--force): the optimizer's state must read back."""
    from ddpm_eqx.config import apply_overrides

    cfg, saved = _saved_state(tmp_path, [])
    forced = apply_overrides(cfg, ["optim.grad_clip=1.0", "optim.weight_decay=0.01", "optim.warmup_steps=5"])
    _same_arrays(_restored(tmp_path, forced), saved)


@pytest.mark.parametrize("earlier", ["adam", "clip+adamw"])
def test_a_checkpoint_of_an_earlier_optimizer_layout_restores_as_the_same_state(tmp_path, earlier):
    """ddpm-eqx before 0.2 saved optax.adam's/adamw's own state tree (clipping chained in front): the same arrays,
    read into today's layout."""
    import optax

    from ddpm_eqx.config import Config, apply_overrides
    from ddpm_eqx.state import learning_rate_schedule

    overrides = [] if earlier == "adam" else ["optim.grad_clip=1.0", "optim.weight_decay=0.01"]
    cfg = apply_overrides(Config(), overrides)
    lr = learning_rate_schedule(cfg.optim, cfg.training.num_train_steps)
    old = (optax.adam(lr) if earlier == "adam"
           else optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.01)))
    cfg, saved = _saved_state(tmp_path, overrides, optimizer=old)
    restored = _restored(tmp_path, cfg)
    _same_arrays(restored.model, saved.model)
    _same_arrays(restored.opt_state, saved.opt_state)  # same arrays, same order; another tree around them
    assert int(restored.opt_state[1].count) == 1  # scale_by_adam's state, where make_optimizer keeps it


def test_the_same_arrays_under_other_names_are_another_model_not_a_damaged_checkpoint(tmp_path):
    import equinox as eqx

    from ddpm_eqx.checkpoint import Checkpointer, CheckpointError
    from ddpm_eqx.train import state_skeleton

    cfg, saved = _saved_state(tmp_path, [])
    skeleton = state_skeleton(cfg)
    renamed = eqx.tree_at(lambda s: s.opt_state, skeleton, (skeleton.opt_state, ()))  # one level deeper
    ckpt = Checkpointer(tmp_path / "checkpoints", read_only=True)
    with pytest.raises(CheckpointError, match="do not match the model its config.json describes.*stored under other"):
        ckpt.restore_latest(renamed)
    ckpt.close()


def test_restore_from_a_run_of_another_model_names_that_run_not_config_json(tmp_path):
    from ddpm_eqx.checkpoint import Checkpointer, CheckpointError
    from ddpm_eqx.config import apply_overrides
    from ddpm_eqx.train import _restore, state_skeleton

    cfg, _ = _saved_state(tmp_path / "source", [])
    other = apply_overrides(cfg, ["model.dim=16"])
    ckpt = Checkpointer(tmp_path / "new" / "checkpoints")
    with pytest.raises(CheckpointError, match=r"--restore-from .*source: its checkpoints hold another model than this "
                                              r"run's config \(expected array shape .*\); restore from a run of the"):
        _restore(ckpt, state_skeleton(other), None, tmp_path / "source", {})
    ckpt.close()


def test_opening_a_checkpoint_read_only_logs_no_warning_and_other_warnings_still_pass(caplog):
    """Sampling opens checkpoints read-only on purpose; Orbax's "Given directory is read only" warning
    read like a permission problem. Only that line is dropped, and only while the manager opens."""
    from ddpm_eqx.checkpoint import Checkpointer

    absl_log = logging.getLogger("absl")
    with caplog.at_level(logging.WARNING):
        Checkpointer(LEGACY_OIHW / "checkpoints", read_only=True).close()
        absl_log.warning("Given directory is read only=elsewhere")  # the filter is gone again
        absl_log.warning("another warning")
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("Given directory is read only=elsewhere") == 1 and "another warning" in messages
    assert not any(str(LEGACY_OIHW) in m and "read only" in m for m in messages)


@pytest.mark.slow
def test_eval_checks_step_and_guidance_before_the_data_or_the_sampling(reference_run, tmp_path, monkeypatch):
    """A missing --step was found after the classifier metric prepared the dataset (hours for a large one);
    --guidance is eval's too (the usual sweep of a class-conditional model) and refused where it does nothing."""
    import ddpm_eqx.evaluate as evaluate
    from ddpm_eqx.checkpoint import CheckpointError
    from ddpm_eqx.generate_cli import resolve_step

    run = reference_run[0]
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert resolve_step(run, steps[0]) == (run, run / "checkpoints", steps[0])
    assert resolve_step(run / "checkpoints" / str(steps[-1])) == (run, run / "checkpoints", steps[-1])
    assert resolve_step(run) == (run, run / "checkpoints", None)
    with pytest.raises(CheckpointError, match=rf"no checkpoint for step 7 in .*; steps there: \[{steps[0]}"):
        resolve_step(run, 7)
    with pytest.raises(CheckpointError, match=f"names step {steps[-1]}'s folder but --step is 7"):
        resolve_step(run / "checkpoints" / str(steps[-1]), 7)

    result = _run(_cmd("eval", "--ckpt", str(run), "--num", "4", "--metric", "classifier", "--step", "7",
                       "--steps", "2"), tmp_path)
    _one_line_error(result, 1, "no checkpoint for step 7", "steps there")
    assert "sampler" not in result.stderr and "Importing" not in result.stdout
    result = _run(_cmd("eval", "--ckpt", str(run), "--num", "4", "--metric", "classifier", "--steps", "2",
                       "--guidance", "2"), tmp_path)
    _one_line_error(result, 1, "--guidance 2.0: this model is not class-conditional; drop --guidance")

    # In process: the order itself (the dataset is prepared already here, so a subprocess cannot see it).
    prepared = []
    monkeypatch.setattr(evaluate, "check_labelled", lambda cfg: prepared.append(cfg))
    from typer.testing import CliRunner

    import cli

    for wrong in (["--step", "7"], ["--guidance", "2"]):
        outcome = CliRunner().invoke(cli.app, ["eval", "--ckpt", str(run), "--num", "4", "--metric", "classifier",
                                               "--steps", "2", *wrong])
        assert outcome.exit_code == 1 and not prepared, outcome.output


@pytest.mark.slow
def test_eval_names_missing_fid_weights_before_it_samples(reference_run, tmp_path):
    """The weights (and a classifier metric's labels) were first looked at after --num images were drawn: at
    eval's defaults, hours later."""
    result = _run(_cmd("eval", "--ckpt", str(reference_run[0]), "--num", "4", "--metric", "inception",
                       "--fid-weights", str(tmp_path / "pt_inception.pth")), tmp_path)
    _one_line_error(result, 1, "FID Inception weights not found", str(tmp_path / "pt_inception.pth"))
    assert "sampler" not in result.stderr and "sampled" not in result.stderr  # nothing was drawn
    (tmp_path / "pt_inception.pth").write_bytes(b"a torch file")  # where torch is not installed: named, not a traceback
    result = _run(_cmd("eval", "--ckpt", str(reference_run[0]), "--num", "4", "--metric", "all",
                       "--fid-weights", str(tmp_path / "pt_inception.pth")), tmp_path)
    if importlib.util.find_spec("torch") is None:
        _one_line_error(result, 1, "needs torch, which is not installed", "convert_pth_to_npz")
        assert "sampler" not in result.stderr


@pytest.mark.slow
def test_a_resume_between_metrics_rows_logs_the_uninterrupted_rows_bitwise(fashion_mnist_data_dir, tmp_path):
    """Rows every 4 steps, checkpoints every 3: resuming from step 3 (a SIGKILL after the row of step 4, or a
    SIGTERM's save at any step) averaged the row of step 4 over step 4 alone. The checkpoint keeps the metrics of
    its steps since the last row, so every row is the uninterrupted run's, bit for bit."""
    from _cli import in_process_config
    from ddpm_eqx.config import apply_overrides
    from ddpm_eqx.train import train

    cfg = apply_overrides(in_process_config(fashion_mnist_data_dir), [
        "training.num_train_steps=6", "training.log_every_steps=4", "training.save_and_sample_every=3",
        "training.num_sample=0"])
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(cfg, whole, progress=False)
    assert _committed(whole) == [3, 6]
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")  # as if killed after the row of step 4, before the save at 6
    train(cfg, resumed, progress=False)

    def rows(workdir: Path) -> list[tuple]:
        return [(r["step"], r["loss"], r["grad_norm"], r["lr"])
                for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]

    assert [r[0] for r in rows(whole)] == [4, 6] and rows(resumed) == rows(whole)


def test_the_weight_shape_check_compares_arrays_only():
    """Dropout keeps a float and a bool in the model's tree: the check called .shape on them (a traceback on any
    changed config of a dropout model)."""
    import cli
    from ddpm_eqx.config import Config, apply_overrides, to_dict

    tiny = ["model.dim=8", "model.dim_mults=1,2", "model.resnet_block_groups=4", "model.dropout=0.1"]
    run = apply_overrides(Config(), tiny)
    assert cli._same_weight_shapes(to_dict(run), apply_overrides(run, ["optim.lr=2e-4", "model.dropout=0.2"]))
    assert not cli._same_weight_shapes(to_dict(run), apply_overrides(run, ["model.dim=16"]))
    assert not cli._same_weight_shapes(to_dict(run), apply_overrides(run, ["ddpm.self_condition=true"]))


@pytest.mark.slow
def test_a_rerun_completes_what_a_run_stopped_at_its_end_left_undone(fashion_mnist_data_dir, tmp_path, monkeypatch):
    """Two things follow a checkpoint and were lost to a process stopped between it and them: the model artifact,
    logged after the final checkpoint (a rerun had nothing left to train and skipped it), and the sample grid of
    the checkpoint a resume starts at. Now a record written once W&B has finished says whether the artifact was
    logged, and a missing grid is drawn. Also: W&B hears whether the run failed; the first metrics row after a
    start times the steps after the first (whose time is the compile). The disk-full tests' tiny program."""
    import ddpm_eqx.train
    from _cli import in_process_config
    from ddpm_eqx.config import apply_overrides
    from ddpm_eqx.logging_utils import MetricsWriter
    from ddpm_eqx.train import train

    finished: list[int] = []

    class Run:  # W&B's run, as train uses it
        id = "run1"

        def log(self, *args: object, **kwargs: object) -> None:
            pass

        def finish(self, exit_code: int) -> None:
            finished.append(exit_code)

    logged: list[int] = []

    def log_model(run: Run, directory: Path, step: int) -> None:
        logged.append(step)
        if len(logged) == 1:
            raise KeyboardInterrupt  # the first attempt is stopped in the upload

    drawn: list[int] = []

    def grid(cfg: object, sampler: object, state: object, step: int, workdir: Path, run: object) -> None:
        drawn.append(step)
        (workdir / "samples").mkdir(exist_ok=True)
        (workdir / "samples" / f"step_{step}.png").write_bytes(b"")

    clock_restarts: list[int] = []
    restart = MetricsWriter.restart_clock
    monkeypatch.setattr(MetricsWriter, "restart_clock", lambda self, step: clock_restarts.append(step) or restart(
        self, step))
    monkeypatch.setattr(ddpm_eqx.train, "start_wandb", lambda *args, **kwargs: Run())
    monkeypatch.setattr(ddpm_eqx.train, "_log_model", log_model)
    monkeypatch.setattr(ddpm_eqx.train, "_sample_grid", grid)
    monkeypatch.setenv("WANDB_MODE", "offline")  # conftest's "disabled" would turn it off
    cfg = apply_overrides(in_process_config(fashion_mnist_data_dir), ["wandb.mode=offline", "training.num_sample=4"])
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, progress=False)
    assert logged == [8] and not (tmp_path / "wandb_model.txt").exists() and finished == [1]
    assert drawn == [2, 4, 6, 8] and clock_restarts == [1]  # the first row (step 2) times step 2 alone
    (tmp_path / "samples" / "step_8.png").unlink()  # as if the first attempt had stopped before drawing it
    assert train(cfg, tmp_path, progress=False).step == 8  # nothing left to train: it draws and logs
    assert logged == [8, 8] and (tmp_path / "wandb_model.txt").read_text() == "run1 8\n" and finished == [1, 0]
    assert drawn == [2, 4, 6, 8, 8]
    train(cfg, tmp_path, progress=False)  # done: not again
    Run.id = "run2"  # a W&B run of its own (another config's, in the same workdir) gets the artifact too
    train(cfg, tmp_path, progress=False)
    assert logged == [8, 8, 8] and drawn == [2, 4, 6, 8, 8] and clock_restarts == [1]


def test_a_forced_resume_with_another_config_over_logged_steps_logs_into_a_new_wandb_run(tmp_path, warnings_logged):
    """After a NaN the error says to resume from an older checkpoint with a lower lr (`--force`): the redone steps'
    rows went to the W&B run that already had those steps, which keeps a step's first row: the new ones were lost
    there. Such a resume now gets a new W&B run; a plain resume (the same rows again) keeps its own."""
    from ddpm_eqx.config import Config, apply_overrides, to_json
    from ddpm_eqx.train import _wandb_id

    cfg = Config()
    (tmp_path / "checkpoints" / "4" / "meta").mkdir(parents=True)
    (tmp_path / "checkpoints" / "4" / "meta" / "metadata").write_text(json.dumps({"config": json.loads(to_json(cfg))}))
    (tmp_path / "wandb_id.txt").write_text("old")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.1}) + "\n" for s in (2, 4, 6)))
    lower = apply_overrides(cfg, ["optim.lr=1e-4"])
    assert _wandb_id(tmp_path, cfg, 4) == "old"  # the same config: the same rows again
    assert _wandb_id(tmp_path, apply_overrides(cfg, ["training.num_train_steps=99"]), 4) == "old"  # resumable
    assert _wandb_id(tmp_path, lower, 6) == "old" and _wandb_id(tmp_path, lower, None) == "old"  # no step redone
    assert not warnings_logged
    new = _wandb_id(tmp_path, lower, 4)
    assert new != "old" and (tmp_path / "wandb_id.txt").read_text() == new
    assert warnings_logged == [f"W&B run old has rows up to step 6, and this run redoes the steps after 4 with another "
                               f"config (optim.lr: 0.001 -> 0.0001); W&B keeps a step's first row, so it logs into a "
                               f"new W&B run, {new}"]
