"""A caching ``malloc`` for XLA:CPU, put in place by re-executing the process under ``LD_PRELOAD``.

XLA:CPU allocates an executable's temporaries afresh on every execution (one ~1 GiB block per train step of
the seed's fashion_mnist model) and frees them when it ends. glibc serves a block that large with a fresh
``mmap`` and unmaps it on ``free`` (its mmap threshold is capped at 32 MiB), so every step faults in ~265k
new pages that the kernel must zero: 0.4-0.7 s of kernel time per ~1.5 s step on 2 cores. oneTBB's scalable
allocator (the ``tbb`` wheel on PyPI) keeps blocks above ``TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD`` for reuse,
so one block serves every step (measured in ``benchmarks/RESULTS.md``, session 8).

An allocator must be in place before the process's first ``malloc``, hence ``LD_PRELOAD`` and a re-exec.
``ddpm-eqx`` does it on start (:func:`reexec_with_caching_allocator`); research code can start Python with
the variables of :func:`preload_env`. ``DDPM_EQX_MALLOC=system`` keeps glibc's allocator. Applies to Linux
runs whose JAX backend is the CPU; with an accelerator the host allocator was not measured, so it is left as is.
This module imports nothing heavy: it runs before JAX is loaded.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

CHOICE_VAR = "DDPM_EQX_MALLOC"
CHOICES = ("tbb", "system")
# Blocks at least this large are cached without time-out. XLA:CPU's temporaries are one block per execution
# (hundreds of MiB), its outputs and parameters a few MiB each; smaller allocations keep oneTBB's default
# policy. Seed's step: 1 MiB left ~23k faults, 16 MiB ~47k (1.5-3% slower), 128 KiB no fewer than 1 MiB.
HUGE_THRESHOLD_BYTES = 2**20


class AllocatorError(ValueError):
    """A bad ``DDPM_EQX_MALLOC`` value."""


def tbbmalloc_proxy() -> Path | None:
    """``libtbbmalloc_proxy.so.2`` of the installed ``tbb`` wheel (it replaces malloc/free when preloaded)."""
    try:
        dist = importlib.metadata.distribution("tbb")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == "libtbbmalloc_proxy.so.2":
            path = Path(str(dist.locate_file(file))).resolve()
            if path.is_file() and path.with_name("libtbbmalloc.so.2").is_file():
                return path
    return None


def _accelerator_possible(environ: Mapping[str, str]) -> bool:
    """Whether JAX may pick a non-CPU backend: JAX_PLATFORMS names one, or a PJRT plugin / libtpu is installed."""
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms != ["cpu"]
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    return any(importlib.util.find_spec(name) is not None for name in ("jax_plugins", "libtpu"))


def _preloaded(environ: Mapping[str, str]) -> list[str]:
    # ld.so separates LD_PRELOAD entries by spaces or colons.
    return environ.get("LD_PRELOAD", "").replace(":", " ").split()


def preload_env(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """``environ`` plus what runs a new process under the caching allocator; None where that does not apply.

    None when: ``DDPM_EQX_MALLOC=system``; not Linux; JAX may use an accelerator; ``tbb`` is not installed; or
    a ``*malloc*`` library is preloaded already (this one after a re-exec, or the user's own tcmalloc/jemalloc).
    Raises :class:`AllocatorError` for an unknown ``DDPM_EQX_MALLOC``.
    """
    env = dict(os.environ if environ is None else environ)
    choice = env.get(CHOICE_VAR, "") or "tbb"
    if choice not in CHOICES:
        raise AllocatorError(f"{CHOICE_VAR}={choice!r} is not an allocator here; use one of {', '.join(CHOICES)}")
    if choice == "system" or not sys.platform.startswith("linux") or _accelerator_possible(env):
        return None
    if any("malloc" in Path(entry).name for entry in _preloaded(env)):
        return None
    proxy = tbbmalloc_proxy()
    if proxy is None:
        return None
    # The proxy's dependency by path too, so no LD_LIBRARY_PATH is needed (ld.so matches it by soname).
    env["LD_PRELOAD"] = " ".join([str(proxy.with_name("libtbbmalloc.so.2")), str(proxy), *_preloaded(env)])
    env.setdefault("TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD", str(HUGE_THRESHOLD_BYTES))
    return env


def active() -> str | None:
    """The caching allocator this process runs under ("tbbmalloc"), read from its memory map; None otherwise."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return "tbbmalloc" if "libtbbmalloc_proxy" in maps else None


def reexec_with_caching_allocator() -> None:
    """Replace this process by itself (same pid, arguments and stdio) under the caching allocator, if it applies.

    Returns without doing anything where :func:`preload_env` gives None. Call it first thing in a program's
    entry point: whatever the process did before is lost.
    """
    env = preload_env()
    if env is None or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
