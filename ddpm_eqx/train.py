"""The training loop: build, restore, step, log, sample, checkpoint; pre-emption safe.

One ``train(config, workdir)`` call. Resume is automatic from ``<workdir>/checkpoints``: the
train state and the data iterator's position are restored, and because step randomness is
derived from ``(seed, step)`` the resumed run is bitwise the run that was not interrupted.
SIGTERM/SIGINT save a checkpoint at the current step and return cleanly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Collection

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_eqx import allocator
from ddpm_eqx._io import INIT_FROM_FILE, WANDB_ID_FILE, WANDB_MODEL_FILE, write_text_atomic
from ddpm_eqx.checkpoint import NO_SPACE, Checkpointer, CheckpointError, Layouts, ModelMismatch
from ddpm_eqx.config import (Config, ConfigError, config_differences, from_dict, program_json, to_dict,
                             trained_config_dict)
from ddpm_eqx.data import make_train_iterator, prepare_dataset, reads_from_memory
from ddpm_eqx.diffusion import make_diffusion
from ddpm_eqx.environment import describe, differences
from ddpm_eqx.generate import ShardedSampler
from ddpm_eqx.images import save_grid
from ddpm_eqx.logging_utils import MetricsWriter, log, setup_logging, start_wandb, wandb_mode
from ddpm_eqx.parallel import check_divisible, make_mesh, replicate, shard_batch
from ddpm_eqx.state import (  # the builders live beside the state (sample needs them, not the data)
    TrainState, build_model, build_state, earlier_layouts, init_state, make_optimizer, state_skeleton,
)
from ddpm_eqx.step import make_train_step


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    state: TrainState
    step: int
    stopped_by_signal: bool
    traces: int


_STOP_KEY = "ddpm_eqx/stop_after_step"


class _StopFlag:
    """Turns SIGTERM/SIGINT into a stop the loop makes between steps (pre-emptible machines).

    The processes of a multi-process run must stop after the same step: one that stops alone waits forever in
    its checkpoint's barrier, the others in their next step's collective, and nothing is saved (a pre-emption
    signals a slice's hosts at different moments). The first process to see a signal names a step in JAX's
    coordination service (its key-value store; the first writer wins), two past its own, and each process reads
    it between steps and stops there. Two is enough: the loop waits for each step's predecessor before the next
    step, and every step's collectives need all processes, so none is more than one step ahead of another."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.stopped = False
        self._at: int | None = None
        self._client = None
        if jax.process_count() > 1:
            from jax._src import distributed  # the client Orbax's multi-host barriers use

            self._client = distributed.global_state.client
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    def after(self, step: int) -> bool:
        """Whether the loop stops after ``step`` (every process at the same one)."""
        if self._client is None:
            self.stopped = self.signal is not None
            return self.stopped
        if self._at is None:
            if self.signal is not None:
                try:
                    self._client.key_value_set(_STOP_KEY, str(step + 2))
                except Exception:  # noqa: BLE001  (named already: by another process, which came first)
                    pass
            try:
                self._at = int(self._client.key_value_try_get(_STOP_KEY))
            except Exception:  # noqa: BLE001  (not named: JAX raises for a missing key)
                self._at = None
        self.stopped = self._at is not None and step >= self._at
        return self.stopped

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _is_finite(x: Any) -> bool:
    return bool(np.isfinite(np.asarray(x)))


def train(cfg: Config, workdir: str | Path, *, restore_from: str | Path | None = None,
          init_from: str | Path | None = None, progress: bool | None = None,
          trace_cache: Path | None = None) -> TrainResult:
    """Train ``cfg`` in ``workdir`` (checkpoints, metrics.jsonl, samples/), resuming if possible.

    A workdir without checkpoints starts from ``restore_from`` (another run's checkpoint, continued: weights, EMA,
    optimizer, step, data position) or ``init_from`` (fine-tuning: another run's EMA weights as the starting
    weights, at step 0 with a fresh optimizer and data from the start), else from fresh weights.

    ``trace_cache``: a folder where the traced train step and sampler are kept for the next process (the CLI passes
    :func:`ddpm_eqx.trace_cache.default_directory`). Off by default: its key covers this package's source
    and the config, not code of yours that patches the package in the same process.
    """
    setup_logging()
    workdir = Path(workdir)
    mesh = make_mesh()
    check_divisible(cfg.data.batch_size, mesh, cfg.training.grad_accum_steps)
    optimizer = make_optimizer(cfg.optim, cfg.training.num_train_steps)
    process = make_diffusion(cfg.ddpm, cfg.training.loss_type)
    iterator = make_train_iterator(cfg.data, seed=cfg.seed, examples=cfg.training.num_train_steps * cfg.data.batch_size)
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=cfg.training.max_to_keep)
    environment = describe()  # stored with every checkpoint, compared on resume
    # Weights are built only when there is no checkpoint to restore into their skeleton.
    skeleton = state_skeleton(cfg)
    if restore_from is not None and init_from is not None:
        raise ConfigError("--restore-from continues another run, --init-from starts a new one from its weights: "
                          "give one of them")
    restored = _restore(ckpt, skeleton, iterator, restore_from, environment, earlier_layouts(cfg, skeleton),
                        init_from=init_from, cfg=cfg)
    origin_file = workdir / INIT_FROM_FILE  # a fine-tuning run's source (written by initial_weights)
    if restored is None and init_from is None and origin_file.is_file():
        # A fine-tuning run stopped before its first checkpoint: it starts from the same weights again.
        init_from = json.loads(origin_file.read_text())["checkpoint"]
        log.info("this run started from %s (%s): initialising from it again", init_from, origin_file)
    if restored is None:
        model = build_model(cfg) if init_from is None else initial_weights(cfg, skeleton.model, init_from, workdir)
        state = init_state(model, optimizer)
    else:
        state = restored[0]
    # A fine-tuned run's origin travels in every checkpoint's meta (so in its W&B artifact too); process 0, which
    # wrote the file, writes the meta.
    origin = json.loads(origin_file.read_text()) if origin_file.is_file() else None
    start = int(state.step)
    check_steps_left(cfg, start, restored is not None and not ckpt.all_steps(), restore_from)
    state = replicate(state, mesh)
    process = replicate(process, mesh)
    train_step = make_train_step(cfg, process, optimizer, mesh, trace_cache=trace_cache)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    sampler = ShardedSampler(process, state.ema_model, shape, mesh, sampler=cfg.sampling.sampler,
                             steps=cfg.sampling.steps, eta=cfg.sampling.eta, guidance=cfg.sampling.guidance,
                             conditional=cfg.model.num_classes is not None, trace_cache=trace_cache,
                             determines=program_json(cfg))
    lead = jax.process_index() == 0  # one process writes metrics, grids and W&B; all write checkpoints
    run = None
    if lead and wandb_mode(cfg.wandb) != "disabled":
        resumed = restored is not None and bool(ckpt.all_steps())
        run = start_wandb(cfg.wandb, cfg, workdir, resume_id=_wandb_id(workdir, cfg, start if resumed else None))
    writer = MetricsWriter(workdir / ("" if lead else f"process_{jax.process_index()}"), run,
                           total_steps=cfg.training.num_train_steps, start_step=start, progress=progress if lead else False,
                           log_train=cfg.wandb.log_train)
    stop = _StopFlag()
    log.info("training %s from step %d to %d on %d device(s), global batch %d, malloc %s", cfg.data.dataset, start,
             cfg.training.num_train_steps, mesh.devices.size, cfg.data.batch_size, allocator.active() or "system")
    if (note := loss_weighting_note(cfg)) is not None:
        log.warning(note)
    if _grid_missing(cfg, workdir, start, resumed=restored is not None and bool(ckpt.all_steps())):
        log.info("drawing the sample grid of step %d, which the stopped run did not", start)
        _sample_grid(cfg, sampler, state, start, workdir, run)
    step, pending, evaluator = start, None, None
    estimate_at = start + 3 if undersized_machine(cfg) else -1
    t_est, finished, disk_full = 0.0, False, None
    model_logged: int | None = None  # the step whose model artifact this process logged
    data_wait, input_bound_said = 0.0, False  # seconds in next(iterator) since the last metrics row
    # Seconds on checkpoints, grids and evaluations; each step's metrics, since the last row (a checkpoint between
    # rows keeps its steps' metrics: the first row after a resume is the uninterrupted run's).
    paused, window = 0.0, ([] if restored is None else restored[1])
    try:
        while step < cfg.training.num_train_steps and not stop.after(step):
            t_data = time.perf_counter()
            batch = next(iterator)
            data_wait += time.perf_counter() - t_data
            images, labels = shard_batch((batch["image"], batch["label"]), mesh)
            new_state, metrics = train_step(state, images, labels)
            # Check the previous step's loss while this one runs: exact, without stalling dispatch.
            _check_loss(pending, ckpt)
            state, step, pending = new_state, step + 1, (step + 1, metrics["loss"])
            window.append(metrics)
            if step == start + 1 and step % cfg.training.log_every_steps and step != cfg.training.num_train_steps:
                jax.block_until_ready(metrics["loss"])  # compiled and run: the first row times the steps after it
                writer.restart_clock(step)
                data_wait = 0.0
            if step in (estimate_at - 1, estimate_at):  # the first steps after compilation, timed
                jax.block_until_ready(metrics["loss"])
                if step == estimate_at:
                    _log_estimate(cfg, time.perf_counter() - t_est, step)
                t_est = time.perf_counter()
            if step % cfg.training.log_every_steps == 0 or step == cfg.training.num_train_steps:
                record = writer.write(step, window_means(jax.device_get(window)), batch_size=cfg.data.batch_size,
                                      data_wait_s=data_wait, paused_s=paused)
                # Once per run, and not over the first row's steps, whose time is mostly compiling.
                if not input_bound_said and step - start > cfg.training.log_every_steps:
                    input_bound_said = _warn_if_input_bound(cfg, record["data_wait"], reads_from_memory(iterator))
                data_wait, paused, window = 0.0, 0.0, []
            save = step % cfg.training.save_and_sample_every == 0 or step == cfg.training.num_train_steps
            evaluate = bool(cfg.training.eval_every) and step % cfg.training.eval_every == 0
            if save or evaluate:
                jax.block_until_ready(state)  # the steps so far count as training time, what follows does not
                t_pause = time.perf_counter()
                if save:
                    _check_loss(pending, ckpt)
                    _save(ckpt, step, state, iterator, cfg, environment, window, origin)
                    if cfg.training.num_sample:
                        _sample_grid(cfg, sampler, state, step, workdir, run)
                if evaluate:
                    evaluator = evaluator or _Evaluator(cfg)
                    writer.write_eval(step, evaluator(sampler, state))
                paused += time.perf_counter() - t_pause
        _check_loss(pending, ckpt)
        if stop.stopped and step not in ckpt.all_steps():
            why = f"signal {stop.signal}" if stop.signal is not None else "another process's signal"
            log.info("%s: saving a checkpoint at step %d before exiting", why, step)
            _save(ckpt, step, state, iterator, cfg, environment, window, origin)
        ckpt.wait()
        if run is not None and cfg.wandb.log_model and step == cfg.training.num_train_steps and (
                _model_logged(workdir) != f"{run.id} {step}"):  # not yet, or a run killed before it finished
            _log_model(run, ckpt.directory, step)
            model_logged = step
        finished = True
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        disk_full = e  # e.g. metrics.jsonl, while an asynchronous checkpoint save filled the disk
    finally:
        closers = [stop.restore, iterator.close, writer.close, ckpt.close]
        if run is not None:
            closers.append(lambda: _finish_wandb(run, workdir, model_logged, 0 if finished else 1))
        _shut_down(closers, quiet=not finished)
    if disk_full is not None:  # reported once every save has settled, so the intact step is the newest
        raise ckpt.write_failure(str(disk_full.filename or "a file of the run"), NO_SPACE) from None
    return TrainResult(state, step, stop.stopped, train_step.traces)


def window_means(window: list[dict[str, Any]]) -> dict[str, float]:
    """A metrics row from the steps since the previous one (as the seed's ``get_metrics(...).mean()``): the
    mean of each metric over them, but the learning rate of the last (the one the row's step used)."""
    return {k: float(window[-1][k]) if k == "lr" else float(np.mean([m[k] for m in window])) for k in window[-1]}


INPUT_BOUND = 0.3
"""The share of training time spent waiting for batches above which the run says its input is the limit."""


def _warn_if_input_bound(cfg: Config, data_wait: float, from_memory: bool) -> bool:
    if data_wait <= INPUT_BOUND:
        return False
    if from_memory:  # workers only decode a cached split: neither setting would help
        remedy = "though the batches already come from memory (data.cache): the host's CPU cannot gather them faster"
    else:
        remedy = (f"faster with data.cache=true (if the split fits in memory) or data.num_workers="
                  f"{max(2 * cfg.data.num_workers, 2)} (now {cfg.data.num_workers})")
    log.warning("input-bound: %.0f%% of the time since the last metrics waited for batches (metrics.jsonl: "
                "data_wait); %s", 100 * data_wait, remedy)
    return True


def _shut_down(closers: list[Callable[[], Any]], *, quiet: bool) -> None:
    """Call every closer. After a failure (``quiet``) their own errors, often the same full disk, are
    logged rather than raised, so the first error is the one reported."""
    error: Exception | None = None
    for close in closers:
        try:
            close()
        except Exception as e:
            if not quiet:
                error = error or e
            else:
                log.warning("while stopping: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
    if error is not None:
        raise error


def _restore(ckpt: Checkpointer, skeleton: TrainState, iterator: Any, restore_from: str | Path | None,
             environment: dict[str, Any], layouts: Layouts = (), *,
             init_from: str | Path | None = None, cfg: Config | None = None
             ) -> tuple[TrainState, list[dict[str, Any]]] | None:
    """The newest checkpoint of this run, else of ``restore_from``, and the metrics of its steps since its last
    metrics row; None when there is none.

    Resuming this run's own checkpoint under other versions or devices than the ones that wrote it
    (``environment``) logs a warning; ``restore_from`` starts a new run, so there it is not compared. The run's
    own checkpoints win over ``restore_from`` and ``init_from`` (a resume), with a warning naming the flag. A
    ``restore_from`` trained with another config than ``cfg`` (:func:`ddpm_eqx.config.config_differences`) is
    continued with a warning naming the changes.
    """
    found = ckpt.restore_latest(skeleton, layouts=layouts)
    source = ckpt.directory
    for flag, given in (("--restore-from", restore_from), ("--init-from", init_from)):
        if found is not None and given is not None:
            log.warning("resuming this run's own step %d from %s; %s %s applies to a workdir without "
                        "checkpoints", found[0], ckpt.directory, flag, given)
    if found is None and restore_from is not None:
        source, step = _resolve_restore_from(restore_from)
        try:
            found = Checkpointer(source, read_only=True).restore_latest(skeleton, step=step, layouts=layouts)
        except ModelMismatch as e:
            raise CheckpointError(f"--restore-from {restore_from}: its checkpoints hold another model than this "
                                  f"run's config ({e.detail}); restore from a run of the same model") from None
        if found is None:
            raise FileNotFoundError(f"--restore-from {restore_from}: no checkpoint in {source}")
        theirs = found[3].get("config")
        if cfg is not None and isinstance(theirs, dict) and (changed := config_differences(theirs, to_dict(cfg))):
            log.warning("--restore-from %s: its step %d was trained with another config (%s); this run continues it "
                        "with this one", restore_from, found[0], "; ".join(changed))
    if found is None:
        return None
    step, state, data_state, meta = found
    ckpt.quarantine_after(step)  # process 0 only
    if jax.process_count() > 1:  # the others see the folders as process 0 left them
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("ddpm_eqx: unreadable checkpoints moved aside")
        ckpt.manager.reload()
    if data_state:
        iterator.set_state(data_state)
    log.info("resumed from %s at step %d", source, step)
    if source == ckpt.directory and (changes := differences(meta.get("environment", {}), environment)):
        log.warning("step %d was written with other software or devices (%s): training goes on, but need not be "
                    "bitwise the run it continues", step, "; ".join(changes))
    return state, _window_from_json(meta.get("metrics_window"))


def _resolve_restore_from(restore_from: str | Path) -> tuple[Path, int | None]:
    """The checkpoints folder to restore from, and the step when ``restore_from`` names one step's folder."""
    text = str(restore_from)
    if text.startswith("wandb:"):
        import wandb

        try:
            artifact = wandb.Api().artifact(text.removeprefix("wandb:"), type="model")
            return Path(artifact.download()) / "checkpoints", None
        except Exception as e:
            raise FileNotFoundError(f"could not fetch W&B artifact {text[6:]!r} ({type(e).__name__}); "
                                    "check the name and your login, or download it and pass the folder") from None
    path = Path(text).expanduser()
    if path.name.isdigit() and (path / "state").is_dir():  # <run>/checkpoints/<step>
        return path.parent, int(path.name)
    return (path / "checkpoints" if (path / "checkpoints").is_dir() else path), None


def initial_weights(cfg: Config, skeleton: eqx.Module, init_from: str | Path, workdir: Path | None = None) -> Any:
    """The model of ``cfg`` (``skeleton``: its shapes) with the EMA weights of another run's checkpoint (a run
    folder, its ``checkpoints/`` or one ``checkpoints/<step>``, or ``wandb:ENTITY/PROJECT/NAME:V``): where a
    fine-tuning run starts. The source is read with the config it was trained with (its optimizer, schedule or
    dataset may differ); its architecture must be this config's (:data:`ARCHITECTURE_KEYS`), and a changed
    diffusion, or class labels of another dataset, are named in a warning. ``workdir``: where ``init_from.json``
    records the source and its step (a restart before the first checkpoint starts from them again)."""
    source, step = _resolve_restore_from(init_from)
    reader = Checkpointer(source, read_only=True)
    try:
        steps = reader.all_steps() if step is None else reader.require(step)
        if not steps:
            raise FileNotFoundError(f"--init-from {init_from}: no checkpoint in {source}")
        try:
            trained: Config | None = from_dict(reader.restore_meta(steps[-1] if step is None else step)["config"])
        except Exception:  # noqa: BLE001  (no meta, or one of another version: read it with this run's shapes)
            trained = None
        if trained is not None:
            _check_fine_tuning(cfg, trained, init_from)
        theirs = state_skeleton(trained or cfg)
        try:
            found = reader.restore_latest(theirs, step=step, layouts=earlier_layouts(trained or cfg, theirs))
        except ModelMismatch as e:
            if trained is not None:
                raise
            raise CheckpointError(f"--init-from {init_from}: its checkpoints name no config, and their weights have "
                                  f"other shapes than this config's model ({e.detail}); --set the model to match "
                                  "them") from None
    finally:
        reader.close()
    if found is None:
        raise FileNotFoundError(f"--init-from {init_from}: no checkpoint in {source}")
    at, state = found[0], found[1]
    # The source's arrays in this config's model: its own non-array fields (e.g. dropout) are this run's.
    arrays, static = eqx.partition(skeleton, lambda x: isinstance(x, jax.ShapeDtypeStruct) or eqx.is_array(x))
    weights = jax.tree_util.tree_leaves(eqx.filter(state.ema_model, eqx.is_array))
    if trained is None:
        log.warning("--init-from %s: step %d holds no config this version reads; its weights fit this model's "
                    "shapes, so it is read as this config's architecture", init_from, at)
    log.info("initialised from the EMA weights of %s at step %d (a new run: step 0, fresh optimizer)", source, at)
    if workdir is not None and jax.process_index() == 0:
        write_text_atomic(Path(workdir) / INIT_FROM_FILE, json.dumps(
            {"init_from": str(init_from), "checkpoint": str(source / str(at)), "step": at}))
    return eqx.combine(jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(arrays), weights), static)


ARCHITECTURE_KEYS = (*(f"model.{k}" for k in (
    "dim", "init_dim", "out_dim", "dim_mults", "resnet_block_groups", "attn_heads", "attn_dim_head", "downsample",
    "random_fourier_features", "learned_sinusoidal_cond", "learned_sinusoidal_dim", "num_classes")),
    "data.channels", "ddpm.self_condition")
"""The settings a fine-tuning run must share with its source: they decide what each weight is, not only its shape
(``attn_heads=2, attn_dim_head=4`` has the shapes of ``1, 8``)."""


def _check_fine_tuning(cfg: Config, trained: Config, init_from: str | Path) -> None:
    """``CheckpointError`` naming the architecture settings that differ from the source's; a warning for the
    settings that make the source's weights mean something else than they will be trained for."""
    def value(c: Config, key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(c, section), name)

    def changes(keys: Collection[str]) -> list[str]:
        return [f"{k}={value(trained, k)!r} there, {value(cfg, k)!r} here" for k in keys
                if value(trained, k) != value(cfg, k)]

    if differ := changes(ARCHITECTURE_KEYS):
        raise CheckpointError(f"--init-from {init_from}: its model is another architecture than this config's "
                              f"({'; '.join(differ)}); --set the model to match it")
    relearn = changes(("ddpm.timesteps", "ddpm.beta_schedule"))
    if (was := trained.ddpm.resolved_objective) != (now := cfg.ddpm.resolved_objective):
        relearn.insert(0, f"objective {was!r} there, {now!r} here")
    if cfg.model.num_classes is not None and trained.data.dataset != cfg.data.dataset:
        relearn.append(f"class labels of {trained.data.dataset!r} there, of {cfg.data.dataset!r} here (the class "
                       "embeddings are reused label for label)")
    if relearn:
        log.warning("--init-from %s: the source was trained for something else (%s); fine-tuning starts from "
                    "weights that must re-learn it", init_from, "; ".join(relearn))


def _check_loss(pending: tuple[int, jax.Array] | None, ckpt: Checkpointer) -> None:
    """Stop at a non-finite loss. Step k's loss is computed from the parameters of step k - 1, which may have
    been saved already (a save is checked against the loss before it): that checkpoint is moved aside to
    ``checkpoints_nonfinite/`` (kept, never deleted), so that the resume the message advises starts from
    parameters whose loss was finite, not from the ones that gave this one."""
    if pending is None or _is_finite(pending[1]):
        return
    step = pending[0]
    ckpt.wait()  # a save of step - 1 still being written
    moved = ckpt.quarantine_after(step - 2, folder="checkpoints_nonfinite", why="non-finite-loss")  # process 0
    steps = [s for s in ckpt.all_steps() if s < step - 1]
    cause = f" (from step {step - 1}'s parameters, whose checkpoint moved to {moved[0]})" if moved else ""
    last = f"the last good checkpoint is step {steps[-1]}" if steps else "no good checkpoint remains"
    raise NonFiniteLossError(f"loss is {float(pending[1])} at step {step}{cause}; {last}. "
                             "Lower optim.lr or set optim.grad_clip, then resume with --force.")


def _save(ckpt: Checkpointer, step: int, state: TrainState, iterator: Any, cfg: Config,
          environment: dict[str, Any], window: list[dict[str, Any]], origin: dict[str, Any] | None) -> None:
    meta = {"step": step, "config": to_dict(cfg), "time": time.time(), "environment": environment,
            "metrics_window": _window_to_json(window), **({} if origin is None else {"init_from": origin})}
    ckpt.save(step, state, iterator.get_state(), meta)


def loss_weighting_note(cfg: Config) -> str | None:
    """A line where the loss weighting is not what its paper derives: min-SNR-gamma with a loss other than l2."""
    if cfg.ddpm.min_snr_gamma is None or cfg.training.loss_type == "l2":
        return None
    return (f"ddpm.min_snr_gamma with training.loss_type={cfg.training.loss_type}: min-SNR's weights are derived for "
            f"the squared error (Hang et al. 2023), so they do not balance an {cfg.training.loss_type} loss as the "
            "paper's do; --set training.loss_type=l2 for the paper's weighting")


def check_steps_left(cfg: Config, start: int, restored_elsewhere: bool, restore_from: str | Path | None) -> None:
    """``ConfigError`` where a run would train nothing: resumed past ``training.num_train_steps`` (a finished run
    rerun with its own length is fine: it says so), or restored from another run at or past it."""
    total = cfg.training.num_train_steps
    if restored_elsewhere and start >= total:
        raise ConfigError(f"--restore-from {restore_from} is at step {start}, not below training.num_train_steps="
                          f"{total}: nothing to train. It continues that run (weights, EMA, optimizer and its "
                          f"schedule, data position), so give training.num_train_steps above {start}")
    if start > total:
        raise ConfigError(f"this run is at step {start}, past training.num_train_steps={total}: nothing to train; "
                          f"give a larger training.num_train_steps to train on (its checkpoints are kept as they are)")


def _window_to_json(window: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics of the steps since the last row, exactly (float32 -> float is exact), with their dtypes."""
    rows = jax.device_get(window)
    return {"dtypes": {k: str(np.asarray(v).dtype) for k, v in rows[0].items()} if rows else {},
            "steps": [{k: float(v) for k, v in row.items()} for row in rows]}


def _window_from_json(stored: dict[str, Any] | None) -> list[dict[str, Any]]:
    """:func:`_window_to_json` read back, as the arrays :func:`window_means` averaged (so bitwise the same means);
    empty for a checkpoint written before the window was stored."""
    if not stored:
        return []
    dtypes = stored["dtypes"]
    return [{k: np.asarray(v, dtype=dtypes[k]) for k, v in row.items()} for row in stored["steps"]]


def _sample_grid(cfg: Config, sampler: ShardedSampler, state: TrainState, step: int, workdir: Path, run: Any) -> None:
    """EMA samples from fixed noise (the same keys every time), so grids are comparable across steps."""
    keys = jax.random.split(jax.random.key(cfg.seed + 1), cfg.training.num_sample)
    labels = None
    if cfg.model.num_classes is not None:
        labels = jnp.arange(cfg.training.num_sample, dtype=jnp.int32) % cfg.model.num_classes
    t0 = time.perf_counter()
    images = sampler(state.ema_model, keys, labels)
    assert isinstance(images, np.ndarray)
    if jax.process_index() != 0:
        return
    path = save_grid(images, workdir / "samples" / f"step_{step}.png")
    log.info("samples at step %d -> %s (%.1f s)", step, path, time.perf_counter() - t0)
    if run is not None and cfg.wandb.log_sample:
        import wandb

        run.log({"samples": wandb.Image(str(path))}, step=step)


class _Evaluator:
    """``training.eval_every``: fd_classifier/kid_classifier of ``training.eval_num`` EMA samples."""

    def __init__(self, cfg: Config):
        from ddpm_eqx.evaluate import ClassifierMetric

        self.cfg, self.metric = cfg, ClassifierMetric(cfg)

    def __call__(self, sampler: ShardedSampler, state: TrainState) -> dict[str, float]:
        cfg, n = self.cfg, self.cfg.training.eval_num
        keys = jax.random.split(jax.random.key(cfg.seed + 2), n)
        labels = None
        if cfg.model.num_classes is not None:
            labels = jnp.arange(n, dtype=jnp.int32) % cfg.model.num_classes
        images = sampler(state.ema_model, keys, labels)
        assert isinstance(images, np.ndarray)
        from ddpm_eqx.evaluate import NonFiniteSamples, as_scored

        try:
            return self.metric(as_scored(images))  # scored as `ddpm-eqx eval` scores them: at 8 bits
        except NonFiniteSamples as e:  # a diverging run: the row says so, the run goes on to its NaN check
            log.warning("evaluation skipped: %s", e)
            return {"nonfinite_samples": float(e.count)}


def _grid_missing(cfg: Config, workdir: Path, start: int, *, resumed: bool) -> bool:
    """Whether a resume starts at a checkpoint whose sample grid was not drawn (grids follow their checkpoint: a
    process stopped in between left none), as process 0 sees ``samples/``; the same answer in every process."""
    every, total = cfg.training.save_and_sample_every, cfg.training.num_train_steps
    if not (resumed and cfg.training.num_sample and start and (start % every == 0 or start == total)):
        return False
    missing = not (workdir / "samples" / f"step_{start}.png").is_file()
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))


def _log_model(run: Any, directory: Path, step: int) -> None:
    """The final checkpoint as a W&B model artifact, ``checkpoints/<step>/`` (what ``--restore-from wandb:...``
    reads). Only that step: W&B stages a copy of what it logs (offline, until synced), and the kept earlier
    steps would multiply it by ``training.max_to_keep``."""
    import wandb

    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata={"step": step})
    # W&B stages its copy under WANDB_DATA_DIR, by default in the home folder (~/.local/share/wandb), where an
    # offline run's copy stayed until synced: the run's own wandb/ folder instead, unless the user set one.
    user_set = "WANDB_DATA_DIR" in os.environ
    os.environ.setdefault("WANDB_DATA_DIR", str(directory.parent / "wandb"))
    try:
        artifact.add_dir(str(directory / str(step)), name=f"checkpoints/{step}")
    finally:
        if not user_set:
            del os.environ["WANDB_DATA_DIR"]
    run.log_artifact(artifact)


def _model_logged(workdir: Path) -> str | None:
    path = workdir / WANDB_MODEL_FILE
    return path.read_text().strip() if path.is_file() else None


def _finish_wandb(run: Any, workdir: Path, model_logged: int | None, exit_code: int) -> None:
    """``run.finish()`` (which waits for the uploads; a run that failed is marked so), then the record that the
    model artifact of step ``model_logged`` is logged: a process killed before this point leaves a rerun to log it."""
    run.finish(exit_code=exit_code)
    if model_logged is not None:
        write_text_atomic(workdir / WANDB_MODEL_FILE, f"{run.id} {model_logged}\n")


def _wandb_id(workdir: Path, cfg: Config, resumed_at: int | None) -> str:
    """The id of the W&B run this run logs into: the one ``wandb_id.txt`` names, or a new one. A new one also
    where a resume at step ``resumed_at`` with another config (``--force``) redoes steps that W&B run already
    has rows of: W&B keeps a step's first row, so the new rows would be dropped there."""
    import uuid

    path = workdir / WANDB_ID_FILE
    old = path.read_text().strip() if path.is_file() else None
    if old and resumed_at is not None and (last := _last_row(workdir, resumed_at)) is not None:
        theirs = trained_config_dict(workdir, [resumed_at])
        if theirs is not None and (changed := config_differences(theirs, to_dict(cfg))):
            new = uuid.uuid4().hex[:8]
            log.warning("W&B run %s has rows up to step %d, and this run redoes the steps after %d with another "
                        "config (%s); W&B keeps a step's first row, so it logs into a new W&B run, %s", old, last,
                        resumed_at, "; ".join(changed), new)
            write_text_atomic(path, new)
            return new
    if old:
        return old
    workdir.mkdir(parents=True, exist_ok=True)
    new = uuid.uuid4().hex[:8]
    write_text_atomic(path, new)
    return new


def _last_row(workdir: Path, after: int) -> int | None:
    """The last step of ``metrics.jsonl`` where it is past ``after`` (rows a resume at ``after`` redoes), else None."""
    path = workdir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            steps.append(int(json.loads(line)["step"]))
    return max(steps) if steps and max(steps) > after else None


def validate_setup(cfg: Config) -> None:
    """Fail fast, before anything is written: model shape, device split, dataset and its image shape.

    Raises ``ConfigError`` (or the data module's ``DataError``) with a one-line message.
    """
    try:
        state_skeleton(cfg)  # constructs nothing, checks the sizes (and is kept for the restore)
        check_divisible(cfg.data.batch_size, make_mesh(), cfg.training.grad_accum_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    info = prepare_dataset(cfg.data)
    if cfg.training.eval_every:
        from ddpm_eqx.evaluate import check_labelled

        check_labelled(cfg)  # at the first evaluation would be hours in
    if cfg.model.num_classes is not None and not info.labelled:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but {cfg.data.dataset} has no class labels of "
                          "two classes or more (a folder of images has them from class subfolders); drop "
                          "model.num_classes to train unconditionally")
    if cfg.model.num_classes is not None and info.num_classes is not None and cfg.model.num_classes != info.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but {cfg.data.dataset} has "
                          f"{info.num_classes} classes; set model.num_classes={info.num_classes}")


_LARGEST_FITTED = 128
"""The largest image size taken from the data unasked: above it Config()'s U-Net would be slow and large."""


def fit_to_data(cfg: Config, *, explicit: Collection[str] = ()) -> tuple[Config, str]:
    """``cfg`` with ``data.image_size`` and ``data.channels`` taken from the dataset's images (prepared first),
    except the keys in ``explicit`` (the user's ``--set``), and a line saying so: for ``--dataset`` without a
    ``configs/<name>.py``, where ``Config()``'s 28x28 grey would otherwise resize and grey any data silently.
    ``ConfigError`` where the images have no one square size and ``data.image_size`` was not given."""
    info = prepare_dataset(cfg.data)
    height, width, depth = (tuple(info.image_shape) + (None, None, None))[:3]
    data = cfg.data
    if "data.channels" not in explicit and depth is not None:
        data = dataclasses.replace(data, channels=1 if depth == 1 else 3)
    if "data.image_size" not in explicit:
        if height is None or height != width or height > _LARGEST_FITTED:
            shape = "of various sizes" if height is None or width is None else f"{height}x{width}"
            raise ConfigError(f"the images of {cfg.data.dataset} are {shape}: choose the square size to train at "
                              "with --set data.image_size=N, e.g. 32 or 64 (they are resized and centre-cropped to it)")
        data = dataclasses.replace(data, image_size=int(height))
    labels = (f"; its {info.num_classes} classes are not used (--set model.num_classes={info.num_classes} for a "
              "class-conditional model)") if info.num_classes and info.num_classes > 1 and not cfg.model.num_classes else ""
    given = set(explicit)
    sizes = ", ".join(f"{key}={getattr(data, key.split('.')[1])} ({'as given' if key in given else 'from the data'})"
                      for key in ("data.image_size", "data.channels"))
    note = f"no configs/{Path(cfg.data.dataset).name}.py: {sizes}, the rest Config()'s defaults{labels}"
    return dataclasses.replace(cfg, data=data), note


def undersized_machine(cfg: Config) -> bool:
    """True when a config sized for accelerators (a big global batch) runs on CPU only."""
    return jax.default_backend() == "cpu" and cfg.data.batch_size >= 256


def warn_if_undersized_machine(cfg: Config) -> None:
    if undersized_machine(cfg):
        setup_logging()
        log.warning("this config (global batch %d, %d steps) is sized for TPUs/GPUs and this machine has only "
                    "a CPU: the time to finish is estimated after the first steps. For a CPU run use "
                    "--config configs/fashion_mnist_cpu.py", cfg.data.batch_size, cfg.training.num_train_steps)


def _log_estimate(cfg: Config, seconds_per_step: float, step: int) -> None:
    left = (cfg.training.num_train_steps - step) * seconds_per_step
    log.warning("estimated time to finish on this CPU: %.1f h (%.2f s/step); for a CPU run use "
                "--config configs/fashion_mnist_cpu.py", left / 3600, seconds_per_step)


__all__ = ["train", "TrainResult", "NonFiniteLossError", "build_model", "build_state", "state_skeleton",
           "initial_weights", "warn_if_undersized_machine"]
