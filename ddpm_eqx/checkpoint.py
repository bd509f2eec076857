"""Orbax checkpoints of the train state, the data-iterator state and the config.

Orbax writes each step into a temporary directory and renames it when complete, so a
half-written checkpoint is never listed. A checkpoint that is listed but unreadable (truncated
or deleted files) is skipped with a warning naming it, and the previous one is used; nothing is
ever deleted by a restore. Checkpoints of an older ddpm-eqx, whose convolution kernels were stored OIHW
(``eqx.nn.Conv2d``), are recognised by their shapes and converted to HWIO as they are read.

Restore goes into an ``eqx.filter_eval_shape`` skeleton: note that ``eqx.is_array`` is False for
``jax.ShapeDtypeStruct``, so the skeleton is filtered with ``_is_leaf_array`` (see STACK_NOTES).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jaxtyping import PyTree

from ddpm_eqx.layers import kernels_as_oihw, kernels_from_oihw
from ddpm_eqx.parallel import P, make_mesh

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint; the message says where it looked and what to do."""


class ModelMismatch(CheckpointError):
    """Readable checkpoints of another model than the skeleton's; ``detail`` names the first difference found."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


class _ShapeMismatch(ValueError):
    """The stored arrays are not the ones the skeleton expects (another model's checkpoint)."""


def _is_mismatch(e: Exception) -> bool:
    """A readable checkpoint of another model (shapes or tree structure differ), not a damaged one."""
    text = str(e).lower()
    return isinstance(e, _ShapeMismatch) or (isinstance(e, ValueError) and "stored shape" in text)


def _is_leaf_array(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _shapes(tree: PyTree) -> list[tuple[int, ...]]:
    return sorted(tuple(x.shape) for x in jax.tree_util.tree_leaves(tree))


def _paths(tree: PyTree) -> set[tuple[str, ...]]:
    """The arrays' paths as Orbax names them in a checkpoint (``("opt_state", "1", "mu", ...)``)."""
    return set(ocp.tree.to_flat_dict(eqx.filter(tree, _is_leaf_array)))


Layouts = Sequence[tuple[PyTree, Callable[[PyTree], PyTree]]]


_ORBAX = f"{os.sep}orbax{os.sep}"
# The reason every full-disk error of a run gives (whatever the writer reported); `_fix_for` keys on it.
NO_SPACE = "No space left on device"


def is_write_failure(e: BaseException) -> bool:
    """A failed file write: an ``OSError``, or tensorstore's ``ValueError`` carrying RESOURCE_EXHAUSTED or an
    ``os_error_code`` (how Orbax reports a full disk)."""
    text = str(e)
    return isinstance(e, OSError) or "RESOURCE_EXHAUSTED" in text or "os_error_code" in text


class _WriteFailureEcho(logging.Filter):
    """Drops Orbax's and asyncio's own reports of a failed checkpoint write (one per background thread and
    task, each with a traceback): the failure reaches the caller once, as a ``CheckpointError``. Only
    records logged by Orbax, or whose exception passed through Orbax: a write failure of anything else
    (TFDS and Grain also log through absl) still prints."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if record.levelno < logging.ERROR or error is None or not is_write_failure(error):
            return True
        frames = traceback.extract_tb(error.__traceback__)
        return not any(_ORBAX in path for path in [record.pathname, *(f.filename for f in frames)])


def quiet_failed_async_saves() -> None:
    """For applications (the CLI): after an asynchronous save fails, Orbax's threads and tensorstore's
    callbacks report it dozens of times (error logs with tracebacks, and "Event loop is closed" from
    callbacks into the event loop Orbax closed). Keep the one ``CheckpointError`` instead: drop those
    log records, and those unraisable exceptions. Other errors and exceptions are untouched."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _WriteFailureEcho) for f in logger.filters):
            logger.addFilter(_WriteFailureEcho())
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    if getattr(previous, "__name__", "") != "_quiet_unraisable":
        hook.__name__ = "_quiet_unraisable"
        sys.unraisablehook = hook


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _fix_for(reason: str) -> str:
    """What to do about a failed write, by its reason (an OSError's strerror or tensorstore's text)."""
    if "No space left" in reason:
        return "free space there"
    if "Permission denied" in reason or "Read-only file system" in reason:
        return "make the folder writable"
    return "fix that"


def _not_orbax_read_only_notice(record: logging.LogRecord) -> bool:
    # Orbax logs "Given directory is read only=..." as a warning whenever a manager is opened read-only.
    # Ours are read-only on purpose (sampling, evaluating, warm-starting never write), and the line reads
    # like a permission problem to whoever runs `ddpm-eqx sample`.
    return not record.getMessage().startswith("Given directory is read only")


def _array_registry() -> Any:  # a TypeHandlerRegistry (a Protocol beartype cannot check)
    """Orbax's handlers for ``np.ndarray`` (what a single process saves) and ``jax.Array`` (what a
    multi-process run saves: an array's replicas span the processes, and each process writes its share).

    A single process hands Orbax its state as NumPy arrays (:func:`_as_saved`): Orbax's ``jax.Array``
    handler spends ~3 ms of Python per array on shardings, replica slices and transfers, so a checkpoint of
    the tests' tiny state (643 arrays) cost 2.0-2.3 s, 0.3-0.6 s of it blocking the training loop, against
    0.8-1.3 s and 0.1-0.5 s as NumPy (and no device slices to compile and dispatch on a first save: 5.4-5.7 s
    for the seed's state with Orbax's replica-parallel writes). The files hold the same arrays, and a restore
    reads them back as sharded ``jax.Array`` objects either way. The NumPy handler's own deep copy is off:
    :func:`_as_saved` copies where a copy is needed, and only there.
    """
    handler = ocp.type_handlers.get_type_handler(jax.Array)  # Orbax's default (replica-parallel, array metadata)
    host = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)  # _as_saved's arrays are the save's own
    return ocp.type_handlers.create_type_handler_registry((jax.Array, handler), (np.ndarray, host))


def _host_copy_of_its_own(x: Any) -> bool:
    """Whether ``jax.device_get(x)`` is host memory nothing else writes: a copy out of an accelerator's memory
    (cached on the ``jax.Array`` until that is deleted). On a CPU it is a view of XLA's buffer."""
    return isinstance(x, jax.Array) and all(d.platform != "cpu" for d in x.devices())


def _as_saved(arrays: PyTree) -> PyTree:
    """What ``save`` hands Orbax: in a single process NumPy arrays that belong to the save (see
    :func:`_array_registry`), the ``jax.Array`` objects otherwise.

    On a CPU ``device_get`` returns views of XLA's buffers, and XLA does not donate a buffer that has one (the
    next train step would copy the state): those are copied before ``save`` returns (``tests/test_checkpoint.py``
    donates the state while its save is still writing), as are NumPy arrays, which their owner may change. An
    accelerator's arrays arrive as host copies already: copying them again (Orbax's default) held the state
    twice in host memory while it was written.
    """
    if jax.process_count() > 1:
        return arrays
    host = jax.device_get(arrays)
    return jax.tree_util.tree_map(lambda h, x: h if _host_copy_of_its_own(x) else np.array(h, copy=True),
                                  host, arrays)


class Checkpointer:
    """A thin wrapper around ``ocp.CheckpointManager`` with items ``state``, ``data`` and ``meta``."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = Path(directory).absolute()
        quiet = {"max_to_keep": None, "save_interval_steps": 0} if read_only else {"max_to_keep": max_to_keep}
        # cleanup_tmp_directories: a save killed mid-write (SIGKILL, a pre-emption's hard stop) leaves its
        # <step>.orbax-checkpoint-tmp folder, as large as a checkpoint, which only a save of that same step removed.
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only, **quiet
        )
        handlers = {"state": ocp.PyTreeCheckpointHandler(type_handler_registry=_array_registry()),
                    "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        absl_log = logging.getLogger("absl")
        absl_log.addFilter(_not_orbax_read_only_notice)
        try:
            self.manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)
        finally:
            absl_log.removeFilter(_not_orbax_read_only_notice)
        self._pending: int | None = None  # the step of an asynchronous save that may still be running

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def require(self, step: int) -> list[int]:
        """All steps here; a ``CheckpointError`` naming them where ``step`` is not one of them."""
        steps = self.all_steps()
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; steps there: {steps}")
        return steps

    def save(self, step: int, state: PyTree, data_state: dict[str, Any] | None, meta: dict[str, Any]) -> None:
        """Start an (asynchronous) save; a failure of this or the previous save is a ``CheckpointError``."""
        arrays = eqx.filter(state, eqx.is_array)
        self.wait()  # Orbax waits for the previous save anyway; here its failure is reported as its own step
        self._check_space(step, arrays)
        args = ocp.args.Composite(
            state=ocp.args.PyTreeSave(_as_saved(arrays)),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta),
        )
        with self._clear_errors(step):
            self.manager.save(step, args=args, force=True)
        self._pending = step

    def wait(self) -> None:
        """Wait for the asynchronous save in flight; its failure is a ``CheckpointError`` naming its step."""
        pending, self._pending = self._pending, None
        with self._clear_errors(pending):
            self.manager.wait_until_finished()

    def _check_space(self, step: int, arrays: PyTree) -> None:
        """Refuse a save that cannot fit, before anything is written (a disk that fills mid-write fails
        Orbax's background threads one by one). The estimate is meant as a lower bound of a trained
        state's checkpoint: 0.95 of the array bytes (random float32 data compressed to 0.98 here) plus
        512 bytes per array (Orbax's per-array metadata measured 800-900). A fresh state full of zeros
        compresses further (to 0.52), so its save may be refused when the disk is within one checkpoint
        of full, where the next save would fail anyway. Single-process only: processes that disagreed
        (their disks, or the moment they looked) would leave the others waiting in Orbax's save barrier."""
        if jax.process_count() > 1:
            return
        leaves = jax.tree_util.tree_leaves(arrays)
        needed = int(0.95 * sum(x.size * x.dtype.itemsize for x in leaves)) + 512 * len(leaves)
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            reason = f"{NO_SPACE} (it needs ~{_mb(needed)}, {_mb(free)} free)"
            raise self.write_failure(f"a checkpoint at step {step} in {self.directory}", reason, failed_step=step)

    @contextlib.contextmanager
    def _clear_errors(self, step: int | None) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            # Disk full arrives as OSError or as tensorstore's ValueError("RESOURCE_EXHAUSTED ... [os_error_code='28']");
            # Orbax leaves the partial write in a *.orbax-checkpoint-tmp dir that it never lists as a step.
            text = str(e)
            if not is_write_failure(e):
                raise
            reason = NO_SPACE if ("No space left" in text or "'28'" in text) else text.splitlines()[0][:120]
            what = f"a checkpoint{'' if step is None else f' at step {step}'} in {self.directory}"
            raise self.write_failure(what, reason, failed_step=step) from None

    def write_failure(self, what: str, reason: str, *, failed_step: int | None = None) -> CheckpointError:
        """The error for a failed write (of a checkpoint or any other file of the run): what failed, why,
        and which checkpoint a resume will start from."""
        good = [s for s in self.all_steps() if s != failed_step]
        kept = f"checkpoint step {good[-1]} is intact" if good else "no earlier checkpoint exists"
        return CheckpointError(f"could not write {what}: {reason}; {_fix_for(reason)} and resume ({kept})")

    def quarantine_after(self, step: int, *, folder: str = "checkpoints_unreadable",
                         why: str = "unreadable") -> list[Path]:
        """Move the checkpoints newer than ``step`` aside into ``<run>/<folder>/<step>-<time>`` (never delete),
        so training redoes them: unreadable ones, or ones whose parameters give a non-finite loss. Only process 0
        moves them (the others would race it on the same folders); the others reload after their next barrier."""
        moved: list[Path] = []
        if jax.process_index() != 0:
            return moved
        for bad in [s for s in self.all_steps() if s > step]:
            stamp = f"{bad}-{int(time.time())}"
            # A free name: shutil.move into an existing folder (the same step moved twice in a second) nests it.
            target = next(t for n in itertools.count() if not (t := self.directory.parent / folder / (
                stamp if n == 0 else f"{stamp}-{n}")).exists())
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(bad)), target)
            log.warning("moved %s checkpoint %s/%d to %s", why, self.directory, bad, target)
            moved.append(target)
        if moved:
            self.manager.reload()
        return moved

    def close(self) -> None:
        try:
            self.wait()
        except CheckpointError:
            with contextlib.suppress(Exception):  # Orbax raises the same failure again
                self.manager.close()
            raise
        self.manager.close()

    def restore_meta(self, step: int) -> dict[str, Any]:
        result = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(result.meta)

    def restore(
        self, step: int, skeleton: PyTree, *, layouts: Layouts = ()
    ) -> tuple[PyTree, dict[str, Any], dict[str, Any]]:
        """Restore ``step`` into the structure of ``skeleton`` (real arrays or ShapeDtypeStructs).

        ``layouts``: (earlier skeleton, its conversion to ``skeleton``'s structure) pairs, for checkpoints that
        hold the same arrays in another tree (an earlier optimizer's chain); the one whose paths were stored
        is read and converted."""
        metadata = self._metadata(step)
        stored_flat = ocp.tree.to_flat_dict(metadata)  # path -> the stored array's metadata, in the stored order
        stored_paths = set(stored_flat)
        to_current: Callable[[PyTree], PyTree] | None = None
        if _paths(skeleton) != stored_paths:
            for earlier, conversion in layouts:
                if _paths(earlier) == stored_paths:
                    log.info("checkpoint %s/%d holds an earlier layout of the state; converting it as it is read",
                             self.directory, step)
                    skeleton, to_current = earlier, conversion
                    break
        abstract, static = eqx.partition(skeleton, _is_leaf_array)
        # Restore replicated over this process's devices, whatever the topology at save time.
        replicated = NamedSharding(make_mesh(), P())
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
        target, convert = abstract, None
        expected, stored = _shapes(abstract), _shapes(metadata)
        if stored != expected:
            legacy = kernels_as_oihw(abstract)
            if stored != _shapes(legacy):
                lacking, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
                which = (f"expected array shape {lacking[0]} is not stored there" if lacking else
                         f"stored array shape {extra[0]} is not expected" if extra else "other arrays are stored")
                raise _ShapeMismatch(f"{which}; {len(expected)} arrays expected, {len(stored)} stored")
            # Written before ddpm-eqx stored conv kernels HWIO: read them as stored, convert in memory.
            log.info("checkpoint %s/%d has OIHW convolution kernels (an older ddpm-eqx); converting them to HWIO",
                     self.directory, step)
            target, convert = legacy, kernels_from_oihw
        # Read in the stored tree's own structure, each array as the target's at its path, then placed by path:
        # the skeleton may differ from it where it holds no arrays (a Dropout module where the run had none, after
        # `--force --set model.dropout=...`), which Orbax would take for a damaged checkpoint.
        wanted = ocp.tree.to_flat_dict(target)
        if set(wanted) != stored_paths:  # the shapes match (checked above), the names do not
            missing = sorted(set(wanted) - stored_paths)
            raise _ShapeMismatch(f"the same arrays stored under other names, e.g. {'/'.join(missing[0])} is not "
                                 "stored there")
        as_stored = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(metadata),
                                                 [wanted[k] for k in stored_flat])
        result = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    as_stored, restore_args=ocp.checkpoint_utils.construct_restore_args(as_stored)),
                data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
            ),
        )
        by_path = ocp.tree.to_flat_dict(result.state)
        arrays = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), [by_path[k] for k in wanted])
        state = eqx.combine(arrays if convert is None else convert(arrays), static)
        return (state if to_current is None else to_current(state)), dict(result.data or {}), dict(result.meta)

    def _metadata(self, step: int) -> PyTree:
        """The stored arrays' metadata alone: a checkpoint of another model is reported as such, without a
        failing restore (whose async clean-up prints noise at exit)."""
        # The handler, not StandardCheckpointer: that one also looks for a per-item _CHECKPOINT_METADATA
        # (the manager writes it per step) and logs "Metadata file does not exist" on every restore.
        return ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state").tree

    def restore_latest(
        self, skeleton: PyTree, *, step: int | None = None, layouts: Layouts = ()
    ) -> tuple[int, PyTree, dict[str, Any], dict[str, Any]] | None:
        """The newest readable checkpoint (or ``step``), falling back past unreadable ones; None if none."""
        everything = self.all_steps() if step is None else self.require(step)
        steps = everything if step is None else [step]
        mismatches, reasons = [], []
        for s in reversed(steps):
            try:
                state, data, meta = self.restore(s, skeleton, layouts=layouts)
            except Exception as e:  # Orbax raises many types for truncated or missing files.
                first = str(e).splitlines()[0][:200] if str(e) else ""
                if _is_mismatch(e):
                    mismatches.append(first)
                reasons.append(f"{type(e).__name__}: {first[:120]}")
                log.warning("checkpoint %s/%d is unreadable (%s: %s); trying the previous one",
                            self.directory, s, type(e).__name__, first)
                continue
            return s, state, data, meta
        if steps and len(mismatches) == len(steps):
            detail = mismatches[0][:160]
            raise ModelMismatch(f"the checkpoints in {self.directory} do not match the model its config.json "
                                f"describes ({detail}); was config.json edited or copied from another run?", detail)
        if steps and step is not None:
            others = [s for s in everything if s != step]
            raise CheckpointError(f"checkpoint {step} in {self.directory} cannot be read ({reasons[0]}); "
                                  + (f"pick another --step (steps there: {others})" if others else "it is the only one"))
        if steps:
            raise CheckpointError(f"none of the checkpoints {steps} in {self.directory} could be read (step "
                                  f"{steps[-1]}: {reasons[0]}); is the disk or a copy of them damaged?")
        return None


__all__ = ["Checkpointer", "CheckpointError", "ModelMismatch", "is_write_failure", "quiet_failed_async_saves"]
