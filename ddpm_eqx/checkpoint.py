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
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import equinox as eqx
import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jaxtyping import PyTree

from ddpm_eqx.layers import kernels_as_oihw, kernels_from_oihw
from ddpm_eqx.parallel import P, make_mesh

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint; the message says where it looked and what to do."""


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


def _fix_for(reason: str) -> str:
    """What to do about a failed write, by its reason (an OSError's strerror or tensorstore's text)."""
    if "No space left" in reason:
        return "free space there"
    if "Permission denied" in reason or "Read-only file system" in reason:
        return "make the folder writable"
    return "fix that"


class Checkpointer:
    """A thin wrapper around ``ocp.CheckpointManager`` with items ``state``, ``data`` and ``meta``."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = Path(directory).absolute()
        quiet = {"max_to_keep": None, "save_interval_steps": 0} if read_only else {"max_to_keep": max_to_keep}
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, create=not read_only, read_only=read_only, **quiet
        )
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data", "meta"), options=options)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: PyTree, data_state: dict[str, Any] | None, meta: dict[str, Any]) -> None:
        """Start an (asynchronous) save; a failure of this or the previous save is a ``CheckpointError``."""
        arrays = eqx.filter(state, eqx.is_array)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(arrays),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta),
        )
        with self._clear_errors(step):
            self.manager.save(step, args=args, force=True)

    def wait(self) -> None:
        with self._clear_errors(None):
            self.manager.wait_until_finished()

    @contextlib.contextmanager
    def _clear_errors(self, step: int | None) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            # Disk full arrives as OSError or as tensorstore's ValueError("RESOURCE_EXHAUSTED ... [os_error_code='28']");
            # Orbax leaves the partial write in a *.orbax-checkpoint-tmp dir that it never lists as a step.
            text = str(e)
            if not isinstance(e, OSError) and "RESOURCE_EXHAUSTED" not in text and "os_error_code" not in text:
                raise
            reason = "No space left on device" if ("No space left" in text or "'28'" in text) else text.splitlines()[0][:120]
            what = f"a checkpoint{'' if step is None else f' at step {step}'} in {self.directory}"
            raise self.write_failure(what, reason, failed_step=step) from None

    def write_failure(self, what: str, reason: str, *, failed_step: int | None = None) -> CheckpointError:
        """The error for a failed write (of a checkpoint or any other file of the run): what failed, why,
        and which checkpoint a resume will start from."""
        good = [s for s in self.all_steps() if s != failed_step]
        kept = f"checkpoint step {good[-1]} is intact" if good else "no earlier checkpoint exists"
        return CheckpointError(f"could not write {what}: {reason}; {_fix_for(reason)} and resume ({kept})")

    def quarantine_after(self, step: int) -> list[Path]:
        """Move unreadable checkpoints newer than ``step`` aside (never delete), so training can redo them."""
        moved = []
        for bad in [s for s in self.all_steps() if s > step]:
            target = self.directory.parent / "checkpoints_unreadable" / f"{bad}-{int(time.time())}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(bad)), target)
            log.warning("moved unreadable checkpoint %s/%d to %s", self.directory, bad, target)
            moved.append(target)
        if moved:
            self.manager.reload()
        return moved

    def close(self) -> None:
        with self._clear_errors(None):
            self.manager.wait_until_finished()
            self.manager.close()

    def restore_meta(self, step: int) -> dict[str, Any]:
        result = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(result.meta)

    def restore(self, step: int, skeleton: PyTree) -> tuple[PyTree, dict[str, Any], dict[str, Any]]:
        """Restore ``step`` into the structure of ``skeleton`` (real arrays or ShapeDtypeStructs)."""
        abstract, static = eqx.partition(skeleton, _is_leaf_array)
        # Restore replicated over this process's devices, whatever the topology at save time.
        replicated = NamedSharding(make_mesh(), P())
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
        target, convert = abstract, None
        expected, stored = _shapes(abstract), self._stored_shapes(step)
        if stored != expected:
            legacy = kernels_as_oihw(abstract)
            if stored != _shapes(legacy):
                diff = sorted(set(expected) - set(stored)) or sorted(set(stored) - set(expected))
                raise _ShapeMismatch(f"expected array shape {diff[0] if diff else '?'} is not stored there; "
                                     f"{len(expected)} arrays expected, {len(stored)} stored")
            # Written before ddpm-eqx stored conv kernels HWIO: read them as stored, convert in memory.
            log.info("checkpoint %s/%d has OIHW convolution kernels (an older ddpm-eqx); converting them to HWIO",
                     self.directory, step)
            target, convert = legacy, kernels_from_oihw
        result = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
            ),
        )
        state = result.state if convert is None else convert(result.state)
        return eqx.combine(state, static), dict(result.data or {}), dict(result.meta)

    def _stored_shapes(self, step: int) -> list[tuple[int, ...]]:
        """The stored array shapes, from the metadata alone: a checkpoint of another model is reported as
        such, without a failing restore (whose async clean-up prints noise at exit)."""
        # The handler, not StandardCheckpointer: that one also looks for a per-item _CHECKPOINT_METADATA
        # (the manager writes it per step) and logs "Metadata file does not exist" on every restore.
        return _shapes(ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state"))

    def restore_latest(
        self, skeleton: PyTree, *, step: int | None = None
    ) -> tuple[int, PyTree, dict[str, Any], dict[str, Any]] | None:
        """The newest readable checkpoint (or ``step``), falling back past unreadable ones; None if none."""
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; steps there: {steps}")
            steps = [step]
        mismatches = []
        for s in reversed(steps):
            try:
                state, data, meta = self.restore(s, skeleton)
            except Exception as e:  # Orbax raises many types for truncated or missing files.
                first = str(e).splitlines()[0][:200] if str(e) else ""
                if _is_mismatch(e):
                    mismatches.append(first)
                log.warning("checkpoint %s/%d is unreadable (%s: %s); trying the previous one",
                            self.directory, s, type(e).__name__, first)
                continue
            return s, state, data, meta
        if steps and len(mismatches) == len(steps):
            raise CheckpointError(f"the checkpoints in {self.directory} do not match the model its config.json "
                                  f"describes ({mismatches[0][:160]}); was config.json edited or copied "
                                  "from another run?")
        if steps:
            raise CheckpointError(f"none of the checkpoints {steps} in {self.directory} could be read")
        return None


__all__ = ["Checkpointer", "CheckpointError"]
