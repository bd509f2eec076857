"""Traced programs kept on disk (``jax.export``): a restarted run skips tracing and lowering its train step and
sampler, and so does every ``ddpm-eqx sample`` after the first of its kind.

XLA's persistent cache (the CLI turns it on) skips the *compile* of a program it has seen, but it is keyed by
the lowered program, so every process still traces the step first: JAX walks the whole U-Net, its gradient
and the optimizer in Python, ~6-15 s on 2 CPU cores for the seed's model (5-9 s for the tests' tiny one),
again on every resume of a pre-empted run. Here the traced program is serialised with ``jax.export`` on the
first run and deserialised on the next (~0.03 s); XLA's cache then serves its compile as before.

A stored program is used only where everything that shapes the trace is the same: the key hashes the
source of this package, the versions of the libraries and devices (:func:`ddpm_eqx.environment.describe`),
every ``jax.config`` value, what the caller says determines the function (the config), and the shapes,
dtypes and shardings of the arguments; not code outside the package that patches it in the same process,
which is why the CLI (``train``, ``sample``, ``eval``) uses it and :func:`ddpm_eqx.train.train` and
:class:`ddpm_eqx.generate.ShardedSampler` only when given a folder.
``DDPM_EQX_TRACE_CACHE=0`` turns it off. Files are written whole (a temporary file, then a rename); one
that cannot be read is replaced, with a warning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
from jax import export

from ddpm_eqx import _source
from ddpm_eqx.environment import describe
from ddpm_eqx.logging_utils import log


def enabled() -> bool:
    """False where ``DDPM_EQX_TRACE_CACHE=0``."""
    return os.environ.get("DDPM_EQX_TRACE_CACHE", "1") != "0"


def _all_agree(**values: str) -> bool:
    """Whether every process of the run holds the same ``values`` (a collective; true for one process). The
    processes of a multi-process run must run one program: they read a stored trace only where all read the same
    file, else all trace it."""
    from ddpm_eqx.parallel import processes_differing

    return not any(processes_differing(**values).values())


def default_directory() -> Path | None:
    """``<XLA's persistent cache>/ddpm_eqx_traces``, or None when that cache is off or this one is disabled (in
    every process of a run where it is so in any: each use is a collective, see :func:`stored_program`)."""
    xla_cache = jax.config.values.get("jax_compilation_cache_dir")
    directory = Path(xla_cache) / "ddpm_eqx_traces" if xla_cache and enabled() else None
    if not _all_agree(trace_cache=str(directory is not None)):
        log.warning("stored traces are off in some processes of this run (DDPM_EQX_TRACE_CACHE, or no XLA cache): "
                    "every process traces")
        return None
    return directory


@functools.cache
def _source_digest() -> str:
    """The package's source, read once per process (each stored program's key needs it). It is the code this
    process runs only while the files are as they were at import: :func:`stored_program` checks that."""
    digest = hashlib.sha256()
    for path in _source.files():
        digest.update(path.relative_to(_source.PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _describe_args(args: Sequence[Any]) -> list[Any]:
    return [[list(x.shape), str(x.dtype), str(getattr(x, "sharding", None))] for x in jax.tree_util.tree_leaves(args)]


def cache_key(name: str, determines: str, args: Sequence[Any]) -> str:
    """The file name of ``name``'s program for these arguments (see the module docstring for what it covers)."""
    parts = {"name": name, "determines": determines, "source": _source_digest(), "environment": describe(),
             "jax_config": jax.config.values, "args": _describe_args(args)}
    return f"{name}-{hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:40]}"


def load_or_export(
    name: str, fn: Callable[..., Any], args: Sequence[Any], *, determines: str, directory: Path,
    in_shardings: Any = None, donate_argnums: tuple[int, ...] = (),
) -> tuple[export.Exported, bool]:
    """``(exported, loaded)``: ``fn`` traced for ``args`` (``jax.jit`` with these shardings and donation), read
    from ``directory`` when a run before stored it, else traced now and stored.

    ``fn`` takes and returns pytrees of arrays whose containers ``jax.export`` can serialise (lists, tuples,
    dicts); ``determines`` is everything else ``fn`` depends on, e.g. its config as JSON.
    """
    path = directory / f"{cache_key(name, determines, args)}.jaxexport"
    stored, read = None, "none"
    if path.is_file():
        try:
            data = path.read_bytes()
            stored, read = export.deserialize(bytearray(data)), hashlib.sha256(data).hexdigest()
        except Exception as e:  # noqa: BLE001  (any unreadable file: trace again and replace it)
            log.warning("could not read the stored trace %s (%s: %s); tracing again", path, type(e).__name__, e)
    if _all_agree(stored_trace=read) and stored is not None:
        return stored, True
    exported = export.export(jax.jit(fn, in_shardings=in_shardings, donate_argnums=donate_argnums))(*args)
    tmp: Path | None = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.")
        tmp = Path(tmp_name)
        with os.fdopen(handle, "wb") as f:
            f.write(exported.serialize())
        os.replace(tmp, path)
    except OSError as e:  # a full or read-only disk costs the next run a trace, nothing else
        log.warning("could not store the traced %s in %s: %s", name, directory, e)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return exported, False


def stored_program(
    name: str, fn: Callable[..., Any], args: Sequence[Any], *, determines: str, directory: Path,
    donate_argnums: tuple[int, ...] = (), on_trace: Callable[[], None] | None = None,
) -> Callable[..., Any] | None:
    """``fn`` as a jitted callable that runs its program for ``args``'s shapes, dtypes and shardings, read from
    ``directory`` or traced now and stored there (:func:`load_or_export`; ``name`` with spaces in the log, with
    underscores in the file name). None, with a warning, where ``jax.export`` refuses ``fn`` (e.g. a custom call
    it cannot serialise on this backend), or where the package's source files changed on disk since this
    process imported them: the caller then traces it as without the cache.

    ``on_trace`` is called whenever JAX traces the returned callable (a compile; the program itself is not
    traced again). With several processes it is a collective (every process calls it at the same point): they
    read a stored program only where all read the same file from unchanged sources, else all trace.
    """
    unchanged = _source.unchanged()
    if not _all_agree(source_unchanged=str(unchanged)) or not unchanged:
        log.warning("ddpm_eqx's source files changed after %s imported them: the %s is traced, not read or stored (a "
                    "stored program is keyed by the source on disk)",
                    "another process of the run" if unchanged else "this process", name)
        return None
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, tuple(args))
    try:
        exported, loaded = load_or_export(name.replace(" ", "_"), fn, args, determines=determines,
                                          directory=directory, in_shardings=shardings, donate_argnums=donate_argnums)
    except Exception as e:  # noqa: BLE001  (whatever jax.export refuses: trace as without the cache)
        log.warning("the %s cannot be stored (%s: %s); it is traced in every process", name, type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
        return None
    log.info("%s %s %s", name, "read from" if loaded else "traced and stored in", directory)

    def call(*args: Any) -> Any:
        if on_trace is not None:
            on_trace()
        return exported.call(*args)

    return jax.jit(call, donate_argnums=donate_argnums)


__all__ = ["cache_key", "default_directory", "enabled", "load_or_export", "stored_program"]
