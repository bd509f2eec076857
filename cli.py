"""ddpm-eqx command line: train, sample, eval, data, cache. Thin: parse, resolve the config, call one function.

Every expected failure (bad flag value, missing data or checkpoint, NaN loss) ends in one line on
stderr naming the problem and the fix, and exit code 2 (usage/config) or 1 (runtime).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from typer._click import exceptions as click_errors  # Typer >= 0.29 carries its own Click


class OneLineUsageErrors(TyperGroup):
    """Click's own usage errors (an unknown option, a value out of range, a missing --ckpt) as the one line every
    other error is, exit 2, instead of Typer's usage line, hint and boxed message."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001, ANN003, ANN201
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as e:  # the help is printed already
            sys.exit(e.exit_code)
        except click_errors.ClickException as e:
            ctx = getattr(e, "ctx", None)
            where = f" (see {ctx.command_path} --help)" if isinstance(e, click_errors.UsageError) and ctx else ""
            message = " ".join(e.format_message().split()).rstrip(".")
            typer.echo(f"error: {message}{where}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        # Outside standalone mode Click returns a typer.Exit's code (our one-line errors); commands return None.
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=OneLineUsageErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Denoising diffusion (DDPM/DDIM) in JAX + Equinox.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare datasets.")
app.add_typer(data_app, name="data")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def fail(message: str, code: int = 1) -> None:
    """One line on stderr and exit ``code``; DDPM_EQX_DEBUG=1 shows the traceback instead."""
    if os.environ.get("DDPM_EQX_DEBUG") and sys.exc_info()[0] is not None:
        raise
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


SAMPLERS = ("ddpm", "ddim")


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    """A flag outside its choices is a one-line error (exit 2), checked before JAX loads."""
    if value not in choices:
        fail(f"{flag} {value!r}: use {', '.join(choices[:-1])} or {choices[-1]}", 2)


def _reference_count(text: str) -> int | None:
    """``eval --reference``: a number of training images (2 or more: a covariance), or ``all`` (``None``)."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 2:
        fail(f"--reference {text!r}: give a number of training images (2 or more), or all for the whole split", 2)
    return int(text)


def _check_output(flag: str, path: Path | None, suffixes: tuple[str, ...]) -> Path | None:
    """An output file's path, checked before any sampling (minutes, or hours for ``eval``) is spent on it."""
    if path is None:
        return None
    path = path.expanduser()
    if path.is_dir():
        fail(f"{flag} {path} is a folder; give a file in it, e.g. {path / ('out' + suffixes[0])}", 2)
    if path.suffix.lower() not in suffixes:
        fail(f"{flag} {path}: the file name must end in {', '.join(suffixes)}", 2)
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        fail(f"{flag} {path}: {parent} is a file, not a folder", 2)
    if parent is not None and not os.access(parent, os.W_OK) or path.exists() and not os.access(path, os.W_OK):
        fail(f"{flag} {path}: {path if path.exists() else parent} cannot be written (permissions, or a read-only "
             "disk); give another path", 2)
    return path


def _check_ddim_options(sampler: str | None, steps: int | None, eta: float | None) -> None:
    """--steps and --eta are DDIM's; with DDPM (every timestep, its own noise) they are an error, not a no-op."""
    if sampler == "ddpm" and steps is not None:
        fail(f"--steps {steps} sets the DDIM sampler's steps; DDPM runs all the model's timesteps: drop --steps or "
             "use --sampler ddim", 2)
    if sampler == "ddpm" and eta not in (None, 0.0):
        fail(f"--eta {eta} sets the DDIM sampler's noise; DDPM draws its own: drop --eta or use --sampler ddim", 2)


def _fail_if_out_of_memory(e: RuntimeError, what: str, fix: str) -> None:
    """XLA's allocation failure (jax.errors.JaxRuntimeError) as one line; other errors pass through."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text and "memory" in text.lower():
        fail(f"out of memory with {what} ({text.splitlines()[0][:120]}); {fix}; checkpoints are untouched", 1)


def _init_runtime(host_devices: Optional[int], coordinator: Optional[str], num_processes: Optional[int],
                  process_id: Optional[int], *, batch: Optional[int] = None) -> None:
    """Device count on CPU and multi-process start-up; must run before JAX touches a backend. ``batch``: what
    each of this process's steps splits across its devices (the default count divides it)."""
    if host_devices is not None and host_devices < 1:
        fail(f"--host-devices {host_devices}: give a positive number of devices (default: one per core)", 2)
    if (num_processes is not None or process_id is not None) and not (
            coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        fail("--num-processes/--process-id need --coordinator host:port (or JAX_COORDINATOR_ADDRESS); without one "
             "this process would train alone", 2)
    from ddpm_eqx.parallel import set_host_device_count

    set_host_device_count(host_devices, batch=batch)
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # Persistent XLA cache: a resumed or repeated run skips the ~20 s compiles of its train step and
        # sampler. JAX_COMPILATION_CACHE_DIR (JAX's own variable) points it elsewhere.
        jax.config.update("jax_compilation_cache_dir", str(xla_cache_dir()))
    if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        # JAX's default (1 s) leaves out the start-up's small compiles (0.1-0.7 s each: random draws, splits).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    if coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        # CPU collectives across processes: gloo, jax's default in the versions pyproject allows (0.10.2's
        # DEFAULT_CPU_COLLECTIVES_IMPL). Not set by name: a jax that dropped the option would fail every start.
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)


def xla_cache_dir() -> Path:
    """The persistent XLA cache of the CLI's processes: ``$JAX_COMPILATION_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/ddpm_eqx/xla`` (``~/.cache/ddpm_eqx/xla``); the stored traces are in its ``ddpm_eqx_traces``."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm_eqx" / "xla"


def resolve_config(dataset: Optional[str], config_file: Optional[Path], overrides: list[str],  # noqa: ANN201
                   workdir: Optional[Path] = None):
    """The run's config: ``--config`` (a .py, or a run's config.json), else ``configs/<dataset>.py``, else
    ``Config()`` for ``--dataset`` (whose image size and channels :func:`ddpm_eqx.train.fit_to_data` then takes
    from the data), else the config of the run in ``workdir`` (continuing it: the one its newest checkpoint was
    trained with, else its config.json); ``overrides`` on top. A
    dataset given as a path is stored absolute (a relative one named another folder from elsewhere)."""
    import dataclasses

    from ddpm_eqx import config as C

    if config_file is not None:
        cfg = C.load_config_file(config_file.expanduser())
    elif dataset is not None and (named := _config_file_of(dataset)) is not None:
        cfg = C.load_config_file(named)
    elif dataset is not None:
        cfg = C.Config()
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset=dataset))
    elif workdir is not None and (trained := _trained_config(workdir.expanduser())) is not None:
        try:
            cfg = C.from_dict(trained)  # as its newest checkpoint was trained
        except (C.ConfigError, ValueError, TypeError, KeyError) as e:
            raise C.ConfigError(f"the config stored in {workdir}'s newest checkpoint does not load in this version "
                                f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); pass --config or "
                                "--dataset with --set") from None
    elif workdir is not None and (workdir.expanduser() / "config.json").is_file():
        cfg = C.load_config_file(workdir.expanduser() / "config.json")
    elif workdir is not None:
        raise C.ConfigError(f"--workdir {workdir} holds no run to continue (no checkpoint, no config.json); give "
                            "--dataset NAME or --config FILE to start one there")
    else:
        raise C.ConfigError("give --dataset NAME (e.g. fashion_mnist, or a folder of images), --config FILE, or "
                            "--workdir of a run to continue")
    if dataset is not None and config_file is not None:
        overrides = [f"data.dataset={dataset}", *overrides]
    cfg = C.apply_overrides(cfg, overrides)
    # Stored absolute: config.json is read from anywhere (a relative data_dir sent a resume elsewhere to prepare
    # the data again in its working directory).
    def absolute(folder: Optional[str]) -> Optional[str]:
        return None if folder is None else str(Path(folder).expanduser().resolve())

    return dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, dataset=_absolute_if_path(cfg.data.dataset), data_dir=absolute(cfg.data.data_dir),
        manual_dir=absolute(cfg.data.manual_dir)))


def _config_file_of(dataset: str) -> Optional[Path]:
    """``configs/<dataset>.py`` where there is one, for a bare name (``./fashion_mnist`` is a folder, not the
    config of TFDS's fashion_mnist)."""
    if Path(dataset).name != dataset:
        return None
    path = CONFIG_DIR / f"{dataset}.py"
    return path if path.is_file() else None


def _absolute_if_path(dataset: str) -> str:
    """A dataset that names an existing file or folder as its absolute path; a TFDS name as it is (also where a
    folder of that name is here: ``data_prepare.names_a_path``)."""
    path = Path(dataset).expanduser()
    if not path.exists():
        return dataset
    from ddpm_eqx.data_prepare import names_a_path  # TFDS's registry: only for a name that exists as a path

    return str(path.resolve()) if names_a_path(dataset) else dataset


def _config_differences(old: dict, new: dict) -> list[str]:
    """:func:`ddpm_eqx.config.config_differences` of a workdir's config and the new one, a dataset stored relative
    (before 0.3; now absolute) read as the folder it names here."""
    from ddpm_eqx.config import config_differences

    stored_dataset = old.get("data", {}).get("dataset")
    if isinstance(stored_dataset, str):
        old = {**old, "data": {**old["data"], "dataset": _absolute_if_path(stored_dataset)}}
    return config_differences(old, new)


def _differences_from_text(text: str, new: dict) -> list[str]:
    """:func:`_config_differences` of a config.json's text (none where it is not JSON: it is rewritten anyway)."""
    try:
        return _config_differences(json.loads(text), new)
    except (ValueError, AttributeError, TypeError):
        return []


def _same_weight_shapes(old: dict, cfg) -> bool:  # noqa: ANN001
    """Whether a run of config ``old`` (a config as JSON reads it) has the train state's shapes ``cfg`` has: a
    checkpoint of one restores into the other (no model built: shapes only)."""
    import jax

    from ddpm_eqx.config import ConfigError, from_dict
    from ddpm_eqx.state import state_skeleton

    try:
        before = state_skeleton(from_dict(old))
    except (ConfigError, ValueError, TypeError, KeyError):  # a config of another version that no longer loads
        return True  # the restore's own check then names what does not match

    def arrays(state: object) -> list[tuple[str, tuple[int, ...], object]]:  # as Orbax stores them: by path
        return [(jax.tree_util.keystr(path), x.shape, x.dtype)
                for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
                if isinstance(x, jax.ShapeDtypeStruct)]  # not a module's plain fields (Dropout's p, a float)

    return arrays(before) == arrays(state_skeleton(cfg))


_LOCKS: dict[Path, object] = {}  # workdir -> its open lock file: held until this process exits, however it exits


def _lock_workdir(workdir: Path) -> None:
    """One trainer per workdir: a second one (a resume started while the pre-empted run still lives) would
    append to a metrics.jsonl the first has replaced and prune the first's checkpoints. An advisory ``flock``
    on ``<workdir>/.lock``, released by the kernel when the holder exits (SIGKILL included)."""
    import fcntl

    if workdir.resolve() in _LOCKS:
        return
    lock = open(workdir / ".lock", "a+")  # noqa: SIM115 (held open on purpose)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        fail(f"{workdir} is in use by another ddpm-eqx train (pid {holder}); wait for it to end, stop it, or use "
             "another --workdir")
    except OSError as e:  # a file system without locks (NFS without lockd: ENOLCK): train, unguarded
        lock.close()
        typer.echo(f"warning: cannot lock {workdir} ({e.strerror}); make sure no other train uses it", err=True)
        return
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    _LOCKS[workdir.resolve()] = lock


def _checkpoint_steps(workdir: Path) -> set[str]:
    folder = workdir / "checkpoints"
    return {p.name for p in folder.iterdir() if p.name.isdigit()} if folder.is_dir() else set()


def _trained_config(workdir: Path, steps: set[str] | None = None) -> Optional[dict]:
    """The config the run's newest checkpoint was trained with, or None where no checkpoint has a readable one."""
    from ddpm_eqx.config import trained_config_dict

    return trained_config_dict(workdir, None if steps is None else map(int, steps))


def _prepare_workdir(workdir: Path, cfg, force: bool, source: Optional[str] = None) -> Callable[[], None]:  # noqa: ANN001
    """Check ``workdir`` and write ``cfg`` as its config.json. Checkpoints make it a run, whose config is the one
    its newest checkpoint was trained with (else config.json's): another config continues it only with ``force``
    and only where the train state keeps its shapes (the old file kept as config.N.json; likewise a config.json
    that said otherwise than the checkpoints, with a note); without checkpoints config.json is an attempt that
    never saved, replaced, and so are its ``init_from.json`` (where this command names another source, ``source``:
    --restore-from or --init-from, or another config) and ``wandb_id.txt`` (another config). Fewer steps than the
    run has done is refused. Returns the undo for a run that fails before it saves a checkpoint (a failed restore,
    a bad split): those files as they were (none where there was none)."""
    from ddpm_eqx._io import INIT_FROM_FILE, WANDB_ID_FILE, write_text_atomic
    from ddpm_eqx.config import to_dict, to_json

    created = not workdir.exists()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        fail(f"cannot write to workdir {workdir} ({e.strerror}); pass --workdir to a writable folder")
    _lock_workdir(workdir)
    path, text, backup = workdir / "config.json", None, None
    steps = _checkpoint_steps(workdir)
    if path.is_file():
        text = path.read_text()

    def keep_old() -> Path:  # config.json as it was, beside it: numbered after the highest (counting overwrote one)
        taken = [int(n) for p in workdir.glob("config.*.json") if (n := p.name[len("config."):-len(".json")]).isdigit()]
        kept = path.with_name(f"config.{max(taken, default=-1) + 1}.json")
        write_text_atomic(kept, text or "")
        return kept

    if text is not None and not steps and not _is_ours(text):  # another tool's folder (a model's config.json)
        if not force:
            fail(f"{path} is not a ddpm-eqx config (another tool's folder?); use another --workdir, or --force to "
                 "replace it (kept as config.N.json)", 2)
        backup = keep_old()
    if steps:  # fewer steps than the run has done: refused before config.json is touched
        from ddpm_eqx.config import ConfigError
        from ddpm_eqx.train import check_steps_left

        try:
            check_steps_left(cfg, max(map(int, steps)), False, None)
        except ConfigError as e:
            fail(str(e), 2)
    # What the checkpoints were trained with: the newest one's config, else config.json (which a forced start
    # rewrites before it saves, and a SIGKILL leaves so).
    old = _trained_config(workdir, steps)
    if old is None and text is not None and steps:
        try:
            old = json.loads(text)
        except ValueError:
            fail(f"{path} is not valid JSON (edited by hand?); restore it, or use another --workdir", 2)
    if old is not None:
        diffs = _config_differences(old, to_dict(cfg))
        listed = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
        if diffs and not _same_weight_shapes(old, cfg):
            fail(f"{workdir} holds a run whose checkpoints have other shapes than this config's train state "
                 f"({listed}), so not even --force can continue it; use another --workdir, or continue it as it was "
                 f"with `ddpm-eqx train --workdir {workdir}`", 2)
        if diffs and not force:
            fail(f"{workdir} holds a run with a different config ({listed}); use another --workdir, --force to "
                 f"continue it with the new config, or `ddpm-eqx train --workdir {workdir}` to continue it as it was", 2)
        edited = None if diffs or text is None else _differences_from_text(text, to_dict(cfg))
        if (diffs or edited) and text is not None:
            backup = keep_old()
        if edited:  # config.json said otherwise than the checkpoints (edited by hand, or a start that never saved)
            typer.echo(f"note: {path} differed from the config the newest checkpoint was trained with "
                       f"({'; '.join(edited[:5])}), which this run continues; kept as {backup}. To train with other "
                       "settings pass them with --set (another run's config: --force)", err=True)
    # Files of an attempt that stopped before its first checkpoint, which only a rerun of that attempt (its config)
    # continues: the fine-tuning source it starts from again, the W&B run it logs into (from step 0 again).
    origin, wandb_id = workdir / INIT_FROM_FILE, workdir / WANDB_ID_FILE
    kept = {f: f.read_text() if f.is_file() else None for f in (origin, wandb_id)}
    another = not steps and any(kept.values()) and _another_attempt(text, to_dict(cfg))
    if kept[origin] is not None and not steps and (source is not None or another):
        if source is None:
            typer.echo(f"note: {origin} (a start from {_origin_of(kept[origin])} that stopped before its first "
                       "checkpoint) is dropped: this command's config is another; give --init-from to start from it",
                       err=True)
        origin.unlink()
    if kept[wandb_id] is not None and another:
        wandb_id.unlink()
    if text != (new := to_json(cfg)):  # a plain resume leaves the file as it is
        write_text_atomic(path, new)

    def undo() -> None:
        if _checkpoint_steps(workdir) != steps:
            return
        for file, before in kept.items():
            if (file.read_text() if file.is_file() else None) != before:
                if before is None:
                    file.unlink(missing_ok=True)
                else:
                    write_text_atomic(file, before)
        if text != new:
            if text is None:  # this command's attempt, refused before it saved: no config.json to mislead the next
                path.unlink(missing_ok=True)
                if created:  # nor the folder it made, where nothing else was written there
                    _remove_if_empty_run(workdir)
                return
            write_text_atomic(path, text)
            if backup is not None:
                backup.unlink(missing_ok=True)

    return undo


def _remove_if_empty_run(workdir: Path) -> None:
    """Remove ``workdir`` where it holds no more than a start leaves before its first checkpoint: its lock and an
    empty ``checkpoints/``."""
    entries = {p.name: p for p in workdir.iterdir()}
    if not set(entries) <= {".lock", "checkpoints"}:
        return
    if "checkpoints" in entries:
        if not entries["checkpoints"].is_dir() or any(entries["checkpoints"].iterdir()):
            return
        entries["checkpoints"].rmdir()
    (workdir / ".lock").unlink(missing_ok=True)
    workdir.rmdir()


def _is_ours(text: str) -> bool:
    """Whether a config.json's text is a ddpm-eqx config (of this version or an earlier one)."""
    from ddpm_eqx.config import from_json

    try:
        from_json(text)
        return True
    except Exception:  # noqa: BLE001  (not JSON, another tool's keys, values this version refuses)
        return False


def _another_attempt(text: Optional[str], new: dict) -> bool:
    """Whether ``new`` is another config than the stopped attempt's ``config.json`` (``text``)."""
    try:
        return text is None or bool(_config_differences(json.loads(text), new))
    except (ValueError, AttributeError):
        return True


def _origin_of(text: Optional[str]) -> str:
    try:
        return str(json.loads(text or "")["init_from"])
    except (ValueError, KeyError, TypeError):
        return "another run"


@app.command()
def train(
    dataset: Annotated[Optional[str], typer.Option(
        help="TFDS name (picks configs/NAME.py if there is one), a folder of images or an .npz")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="A config file with get_config(), or a run's config.json")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override, e.g. optim.lr=2e-4 (repeatable)")] = None,
    workdir: Annotated[Optional[Path], typer.Option(
        help="Run folder (default runs/<dataset>); alone, continues the run there with the config its newest "
             "checkpoint was trained with (--set on top)")] = None,
    restore_from: Annotated[Optional[str], typer.Option(
        help="Continue another run (folder, or wandb:ENTITY/PROJECT/NAME:V) in a new --workdir")] = None,
    init_from: Annotated[Optional[str], typer.Option(
        help="Fine-tune: start a new run in --workdir from another run's EMA weights (folder, one checkpoints/STEP, "
             "or wandb:...) at step 0 with a fresh optimizer; the model must have the same architecture")] = None,
    force: Annotated[bool, typer.Option(help="Continue a workdir whose config differs")] = False,
    host_devices: Annotated[Optional[int], typer.Option(
        help="XLA devices to split a CPU into (default: the cores, or the most of them that divide the batch)")] = None,
    coordinator: Annotated[Optional[str], typer.Option(help="Multi-process: coordinator host:port")] = None,
    num_processes: Annotated[Optional[int], typer.Option(help="Multi-process: process count")] = None,
    process_id: Annotated[Optional[int], typer.Option(help="Multi-process: this process's index")] = None,
    progress: Annotated[Optional[bool], typer.Option(help="Progress bar (default: on a terminal)")] = None,
) -> None:
    """Train a model; resumes automatically from the newest checkpoint in --workdir."""
    from ddpm_eqx.config import ConfigError

    if restore_from is not None and init_from is not None:
        fail("--restore-from continues another run, --init-from starts a new one from its weights: give one of them", 2)
    try:  # before JAX and the data libraries load (~4 s): a mistyped --set is an instant error
        cfg = resolve_config(dataset, config, set_ or [], workdir)
    except ConfigError as e:
        fail(str(e), 2)
    # The batch each process splits across its devices; unknown where the process count is detected by
    # jax.distributed (a cluster's variables), where the default stays one device per core.
    multi = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    split, rest = divmod(cfg.data.batch_size, (num_processes or 1) * cfg.training.grad_accum_steps)
    known = not rest and (num_processes is not None or not multi)
    _init_runtime(host_devices, coordinator, num_processes, process_id, batch=split if known else None)
    from ddpm_eqx.checkpoint import CheckpointError, quiet_failed_async_saves
    from ddpm_eqx.data_import import DataError, first_line
    from ddpm_eqx import trace_cache
    from ddpm_eqx.train import (
        NonFiniteLossError, fit_to_data, train as run_train, validate_setup, warn_if_undersized_machine,
    )

    workdir = (workdir or Path("runs") / Path(cfg.data.dataset).name).expanduser()
    try:  # everything that can be checked before a workdir is touched
        if config is None and dataset is not None and _config_file_of(dataset) is None:
            cfg, note = fit_to_data(cfg, explicit={s.split("=", 1)[0].strip() for s in set_ or []})
            typer.echo(note, err=True)
        validate_setup(cfg)
    except ConfigError as e:
        fail(str(e), 2)
    except DataError as e:
        fail(str(e).splitlines()[0], 1)
    import jax

    try:
        undo = _prepare_run_folder(workdir, cfg, force, restore_from or init_from)
    except OSError as e:  # one process: a full disk or a lock file that cannot be opened
        fail(f"cannot prepare {workdir} ({e.strerror or e}); free space there or pass another --workdir", 1)
    warn_if_undersized_machine(cfg)
    if not os.environ.get("DDPM_EQX_DEBUG"):  # a failed save is our one line, not Orbax's dozens of tracebacks
        quiet_failed_async_saves()
    try:
        result = run_train(cfg, workdir, restore_from=restore_from, init_from=init_from, progress=progress,
                           trace_cache=trace_cache.default_directory())
    except BaseException as e:
        undo()
        known = isinstance(e, (ConfigError, DataError, CheckpointError, NonFiniteLossError, OSError, ValueError))
        if not known and isinstance(e, RuntimeError):  # OSError above: e.g. EACCES
            _fail_if_out_of_memory(e, f"data.batch_size={cfg.data.batch_size}", "lower it with --set data.batch_size=N")
        across = type(e).__name__ == "JaxRuntimeError" and jax.process_count() > 1
        message = (first_line(e, 10_000) or type(e).__name__) if known or across else None
        code = 2 if isinstance(e, ConfigError) else 1
        if message is not None and jax.process_count() > 1 and not os.environ.get("DDPM_EQX_DEBUG"):
            if any(word in message for word in ("Gloo", "onnection", "heartbeat", "barrier", "UNAVAILABLE")):
                # A collective with a process that died ("Connection reset by peer", a barrier timed out)
                message = (f"a step across the processes failed ({message[:160]}): did another process of this run "
                           "stop? Its checkpoints are intact: start every process again to resume")
            # JAX's shutdown would wait ~100 s at exit for a dead peer, then abort with a native stack trace.
            typer.echo(f"error: {message}", err=True)
            sys.stderr.flush()
            os._exit(code)
        if message is not None:
            fail(message, code)
        raise
    typer.echo(f"{'stopped' if result.stopped_by_signal else 'finished'} at step {result.step}; run in {workdir}")


def _prepare_run_folder(workdir: Path, cfg, force: bool, source: Optional[str]) -> Callable[[], None]:  # noqa: ANN001
    """``_prepare_workdir`` on process 0 (others would race it on config.json), and for a multi-process run the
    checks that the processes share one run: the same config, workdir and ``source`` (``--restore-from`` or
    ``--init-from``; a mismatch trained replicas that silently differed, hung at the first save, or aborted in a
    collective), process 0's outcome (its refusal stopped only itself; the others hung), and a workdir they all see
    (checkpoints are written by all)."""
    import jax

    if jax.process_count() == 1:
        return _prepare_workdir(workdir, cfg, force, source)
    from jax.experimental import multihost_utils

    from ddpm_eqx.config import to_json
    from ddpm_eqx.parallel import processes_differing

    flags = {"config": to_json(cfg), "--workdir": str(workdir.resolve()), "--restore-from/--init-from": str(source)}
    differ = {name: ps for name, ps in processes_differing(**flags).items() if ps}
    if differ:
        others = sorted({p for ps in differ.values() for p in ps})
        fail(f"processes {others} were started with another {' and '.join(differ)} than process 0; start every "
             "process of a run with the same flags", 2)
    undo: Callable[[], None] = lambda: None
    stopped: typer.Exit | None = None
    if jax.process_index() == 0:
        try:
            undo = _prepare_workdir(workdir, cfg, force, source)
        except typer.Exit as e:  # its one-line error is printed; the others are told below
            stopped = e
        except Exception as e:  # noqa: BLE001  (a full disk, a lock file that cannot be opened): the same
            from ddpm_eqx.data_import import first_line

            typer.echo(f"error: cannot prepare {workdir} ({type(e).__name__}: {first_line(e, 200)})", err=True)
            stopped = typer.Exit(1)
    multihost_utils.sync_global_devices("ddpm_eqx: workdir prepared")
    if processes_differing(prepared=str(stopped is None))["prepared"]:  # process 0 and the others disagree
        if stopped is not None:
            raise stopped
        fail(f"process 0 could not prepare {workdir} (its error says why)", 2)
    path = workdir / "config.json"
    try:
        shared = path.is_file() and path.read_text() == to_json(cfg)
    except OSError:  # unreadable here: as unseen (every process must reach the agreement below)
        shared = False
    if blind := processes_differing(sees=str(shared))["sees"]:
        fail(f"processes {blind} do not see the {path} process 0 wrote: the processes of a run need its workdir on "
             "one shared file system (every process writes its part of each checkpoint)", 2)
    return undo


@app.command()
def sample(
    ckpt: Annotated[Path, typer.Option(help="A run folder, its checkpoints/ folder, or one checkpoints/<step>")],
    step: Annotated[Optional[int], typer.Option(help="Checkpoint step (default: newest)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Image grid, .png/.jpg/.jpeg/.webp (default: <run>/samples/sample_<step>_<sampler><steps>[_<options>]_seed<seed>.png)")] = None,
    npz: Annotated[Optional[Path], typer.Option(
        help="Also write the raw images here (uint8 NHWC 'image', and 'label' for a class-conditional model; "
             "an .npz --dataset imports)")] = None,
    num: Annotated[int, typer.Option(min=1, help="Images to draw")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per sampler call (lower it for memory)")] = 64,
    sampler: Annotated[Optional[str], typer.Option(
        help="ddpm or ddim (default: the run's sampling.sampler, steps and eta, as its training grids; ddim where "
             "--steps or --eta is given)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="DDIM steps (default: 100, or the model's timesteps if fewer)")] = None,
    eta: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="DDIM noise (0: deterministic, 1: DDPM's)")] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Noise seed (0..2^32-1)")] = 0,
    label: Annotated[Optional[int], typer.Option(help="Class for a class-conditional model")] = None,
    guidance: Annotated[Optional[float], typer.Option(
        min=0.0, help="Classifier-free guidance scale (default: the run's sampling.guidance)")] = None,
    trajectory: Annotated[Optional[Path], typer.Option(help="Save the denoising path of 8 images (.gif/.png)")] = None,
    host_devices: Annotated[Optional[int], typer.Option(help="XLA devices to split a CPU into (default: its cores)")] = None,
) -> None:
    """Sample from a checkpoint's EMA weights into a PNG grid (same seed -> same images)."""
    if sampler is not None:
        _check_choice("--sampler", sampler, SAMPLERS)
    _check_ddim_options(sampler, steps, eta)
    ckpt = ckpt.expanduser()
    out = _check_output("--out", out, (".png", ".jpg", ".jpeg", ".webp"))
    npz = _check_output("--npz", npz, (".npz",))
    trajectory = _check_output("--trajectory", trajectory, (".gif", ".png"))
    _init_runtime(host_devices, None, None, None)
    from ddpm_eqx.checkpoint import CheckpointError, quiet_failed_async_saves
    from ddpm_eqx import trace_cache
    from ddpm_eqx.generate_cli import SampleRequest, run_sample

    if not os.environ.get("DDPM_EQX_DEBUG"):  # an unreadable checkpoint: our one line, not Orbax's echoes of it
        quiet_failed_async_saves()
    request = SampleRequest(ckpt=ckpt, step=step, out=out, npz=npz, num=num, batch_size=batch_size,
                            sampler=sampler, steps=steps, eta=eta, seed=seed, label=label, guidance=guidance,
                            trajectory=trajectory, default_steps=100, trace_cache=trace_cache.default_directory())
    try:
        written = run_sample(request)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        fail(str(e).splitlines()[0], 1)
    except OSError as e:  # a write the check above could not foresee (a full disk)
        fail(f"cannot write {e.filename or 'an output'} ({e.strerror or type(e).__name__}); the checkpoint is untouched", 1)
    except RuntimeError as e:
        _fail_if_out_of_memory(e, f"--batch-size {batch_size}", "lower --batch-size")
        raise
    for path in written:
        typer.echo(str(path))


@app.command("eval")
def eval_(
    ckpt: Annotated[Path, typer.Option(help="A run folder, its checkpoints/ folder, or one checkpoints/<step>")],
    num: Annotated[int, typer.Option(min=2, help="Images to sample and score")] = 10_000,
    step: Annotated[Optional[int], typer.Option(help="Checkpoint step (default: newest)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per sampler call (lower it for memory)")] = 256,
    sampler: Annotated[str, typer.Option(help="ddpm or ddim")] = "ddim",
    steps: Annotated[Optional[int], typer.Option(help="DDIM steps (default: 100, or the model's timesteps if fewer)")] = None,
    eta: Annotated[float, typer.Option(min=0.0, max=1.0, help="DDIM noise (0: deterministic, 1: DDPM's)")] = 0.0,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Noise seed (0..2^32-1)")] = 0,
    guidance: Annotated[float, typer.Option(min=0.0, help="Classifier-free guidance scale (class-conditional "
                                                         "models; the classes are drawn in turn)")] = 1.0,
    metric: Annotated[str, typer.Option(help="classifier, inception or all")] = "all",
    fid_weights: Annotated[Optional[str], typer.Option(help="pt_inception-2015-12-05 weights (.pth/.npz)")] = None,
    reference: Annotated[str, typer.Option(
        help="Training images the reference statistics are taken on: a fixed random subset of this many, or all "
             "(the published FID protocol, with --num 50000)")] = "10000",
    out: Annotated[Optional[Path], typer.Option(help="Write the results as JSON here too")] = None,
    host_devices: Annotated[Optional[int], typer.Option(help="XLA devices to split a CPU into (default: its cores)")] = None,
) -> None:
    """Sample --num images and score them against the training split (FID/KID and fd_classifier)."""
    _check_choice("--metric", metric, ("classifier", "inception", "all"))
    _check_choice("--sampler", sampler, SAMPLERS)
    _check_ddim_options(sampler, steps, eta)
    reference_count = _reference_count(reference)
    ckpt = ckpt.expanduser()
    out = _check_output("--out", out, (".json",))
    _init_runtime(host_devices, None, None, None)
    from ddpm_eqx.checkpoint import CheckpointError
    from ddpm_eqx.data_import import DataError
    from ddpm_eqx import trace_cache
    from ddpm_eqx.generate_cli import SampleRequest, draw_images

    request = SampleRequest(ckpt=ckpt, step=step, num=num, batch_size=batch_size, sampler=sampler,
                            steps=steps, eta=eta, seed=seed, guidance=guidance, default_steps=100,
                            trace_cache=trace_cache.default_directory())
    try:
        from ddpm_eqx.evaluate import check_metrics_available, evaluate_images, small_sample_warning
        from ddpm_eqx.generate_cli import check_request, checkpoint_config, resolve_step

        run, _, named = resolve_step(ckpt, step)  # what would fail after the sampling (or the data's preparation), first
        stored = checkpoint_config(run, named)
        check_request(request, stored)
        scored = check_metrics_available(stored, metric, fid_weights)  # type: ignore[arg-type]
        if (warning := small_sample_warning(num, scored)) is not None:
            typer.echo(f"warning: {warning}", err=True)
        cfg, images, used_step = draw_images(request)
        results = evaluate_images(cfg, images, metric=metric, fid_weights=fid_weights, seed=seed,  # type: ignore[arg-type]
                                  reference=reference_count)
    except (CheckpointError, DataError, ValueError, FileNotFoundError) as e:
        fail(str(e).splitlines()[0], 1)
    except RuntimeError as e:
        _fail_if_out_of_memory(e, f"--batch-size {batch_size}", "lower --batch-size")
        raise
    results = {"ckpt": str(run), "step": used_step, "num": num, "sampler": sampler, "steps": request.for_run(cfg).steps,
               "eta": eta, "seed": seed, **({"guidance": guidance} if guidance != 1.0 else {}), **results}
    typer.echo(json.dumps(results, indent=2))  # first: an --out that cannot be written loses nothing
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))
        except OSError as e:
            fail(f"cannot write --out {out} ({e.strerror}); the results are printed above", 1)


@app.command()
def cache(
    clear: Annotated[bool, typer.Option(help="Delete the compiled programs and the stored traces")] = False,
) -> None:
    """Where the compiled programs (XLA's persistent cache) and the stored traces are kept, and their size.

    Nothing prunes them; either may be deleted at any time (the next run compiles or traces again). --clear
    deletes only their own files: JAX's *-cache and *-atime entries and ddpm-eqx's *.jaxexport traces,
    with the temporary files of writes that were killed, never anything else a shared folder holds.
    """
    folder = xla_cache_dir()
    # (folder, its entries, the files that go with them: JAX's access times, a killed write's temporary file)
    kinds = {"compiled programs": (folder, "*-cache", "*-atime"),
             "stored traces": (folder / "ddpm_eqx_traces", "*.jaxexport", ".*.jaxexport.*")}
    for what, (where, entries, extras) in kinds.items():
        main, extra = ([p for p in where.glob(pattern) if p.is_file()] for pattern in (entries, extras))
        size = sum(p.stat().st_size for p in main + extra) / 2**20
        torn = sum(p.name.startswith(".") for p in extra)
        note = f"; {torn} temporary files of interrupted writes" if torn else ""
        if clear:
            for p in main + extra:
                p.unlink(missing_ok=True)
        typer.echo(f"{what}: {'deleted ' if clear else ''}{len(main)} ({size:.1f} MiB) in {where}{note}")


@data_app.command("prepare")
def data_prepare(
    dataset: Annotated[str, typer.Argument(help="TFDS name or image folder / .npz")],
    data_dir: Annotated[Optional[Path], typer.Option(help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")] = None,
    manual_dir: Annotated[Optional[Path], typer.Option(help="Archives to use instead of downloading")] = None,
) -> None:
    """Prepare a dataset as ArrayRecord (offline from --manual-dir when the archives are there)."""
    from ddpm_eqx.config import DataConfig
    from ddpm_eqx.data import prepare_dataset
    from ddpm_eqx.data_import import DataError

    cfg = DataConfig(dataset=dataset, data_dir=str(data_dir) if data_dir else None,
                     manual_dir=str(manual_dir) if manual_dir else None)
    try:
        info = prepare_dataset(cfg)
    except DataError as e:
        fail(str(e), 1)
    typer.echo(f"{info.name}: {info.splits} in {info.builder_dir}")


def main() -> None:
    """Console-script entry: re-execute under the caching allocator (``ddpm_eqx.allocator``), then run the app."""
    from ddpm_eqx.allocator import AllocatorError, reexec_with_caching_allocator

    try:
        reexec_with_caching_allocator()
    except AllocatorError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    app()


if __name__ == "__main__":
    main()
