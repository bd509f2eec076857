"""Data parallelism: a 1-D device mesh ``("data",)`` over all devices of all processes.

The batch is split along its first axis; parameters are replicated. Equinox has no
``filter_shard_map`` (its issue #978): callers partition modules into arrays and static parts,
pass the arrays through ``shard_map`` and close over the rest.

The mesh axis is ``Auto`` (not the 0.10 default ``Explicit``), so ordinary code around the
``shard_map`` (optimizer update, EMA) is left to GSPMD as replicated computation.
"""

from __future__ import annotations

import importlib.metadata
import math
import mmap
import os
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import PyTree

AXIS = "data"
T = TypeVar("T")


# XLA:CPU (jaxlib 0.10) hands convolutions to YNNPACK by default, whose weight gradients at large
# spatial size and few channels run at ~30-50 GFLOP/s; Eigen's run at 130-200. Measured on the seed's
# U-Net (batch 32, 2 cores): train step 3.2 s -> 1.9 s. Everything else stays with YNNPACK, whose
# reductions and small matmuls beat XLA's own emitters (turning YNNPACK off entirely: 3.4 s).
BASE_CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
# With AVX-512, XLA's elementwise fusions go to YNNPACK too (`+eltwise`) instead of an LLVM kernel of XLA's own
# each: the train step's XLA compile 25-30% shorter on both CPUs measured, the step 0-5% faster on a Zen 5 (AVX-512)
# but 0-5% slower on a Zen 3 (AVX2), where the compile is not worth it (benchmarks/RESULTS.md, sessions 18, 37).
# Only on the jaxlib it was measured with: the enum's value names are XLA's to change.
AVX512_CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,+eltwise",)


def cpu_has_avx512(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has AVX-512 (``avx512f`` among the flags of Linux's ``/proc/cpuinfo``); ``False`` where
    that cannot be read (other systems, other architectures)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and "avx512f" in line.split() for line in text.splitlines())


def cpu_xla_flags(*, avx512: bool | None = None, jaxlib_version: str | None = None) -> tuple[str, ...]:
    """The XLA:CPU flags ``ddpm-eqx`` sets (:data:`AVX512_CPU_XLA_FLAGS` on a CPU with AVX-512 and the jaxlib
    they were measured with, else :data:`BASE_CPU_XLA_FLAGS`); the arguments stand in for this machine's."""
    avx512 = cpu_has_avx512() if avx512 is None else avx512
    version = jaxlib_version if jaxlib_version is not None else _jaxlib_version() or ""
    return AVX512_CPU_XLA_FLAGS if avx512 and version.startswith(MEASURED_JAXLIB) else BASE_CPU_XLA_FLAGS


def available_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity mask (``taskset``, a batch scheduler's cpuset), capped by
    the cgroup's CPU quota where one is set (a container's ``--cpus``; v2 ``cpu.max``, v1 ``cpu.cfs_*``).
    ``os.cpu_count()`` is the machine's, whatever this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            text = (cgroup / quota_file).read_text().split()
            quota, period = text[0], text[1] if period_file is None else (cgroup / period_file).read_text().strip()
            if quota not in ("max", "-1"):
                cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
        except (OSError, ValueError, IndexError):
            continue
    return max(cores, 1)


def default_host_devices(batch: int | None = None, *, cores: int | None = None) -> int:
    """One XLA:CPU device per available core (:func:`available_cores`); for a batch that ``cores`` does not
    divide, the most devices that do (a 6-core machine trains a batch of 32 on 4), so a config that runs on
    one machine is not refused on another for its core count."""
    cores = cores or available_cores()
    if not batch:
        return cores
    return max(d for d in range(1, cores + 1) if batch % d == 0)


def set_host_device_count(count: int | None, *, batch: int | None = None) -> None:
    """Split the CPU into ``count`` XLA devices and set :data:`CPU_XLA_FLAGS`. Without a ``count``: the user's
    own ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` where there is one, else
    :func:`default_host_devices` for ``batch`` (what each step splits across this process's devices).

    Must run before JAX starts a backend. Flags already in ``XLA_FLAGS`` win over ours. On a CPU,
    host devices are how all cores get used: one XLA:CPU device keeps ~1.4-1.8 of 2 cores busy.
    """
    flags = os.environ.get("XLA_FLAGS", "").split()
    users = [f for f in flags if f.startswith("--xla_force_host_platform_device_count=")]
    if count is None and users and users[-1].partition("=")[2].isdigit():
        count = int(users[-1].partition("=")[2])
    if count is None:
        count = default_host_devices(batch)
    flags = [f for f in flags if "host_platform_device_count" not in f]
    ours = [f for f in CPU_XLA_FLAGS if not any(g.split("=")[0] == f.split("=")[0] for g in flags)]
    unknown = [f for f in ours if not xla_knows(f)]
    if unknown:
        warnings.warn(f"this jaxlib ({_jaxlib_version() or 'not installed as a package'}) has no {', '.join(unknown)}: "
                      "left unset, so the CPU's convolutions may run slower (see ddpm_eqx/parallel.py)", stacklevel=2)
    ours = [f for f in ours if f not in unknown]
    os.environ["XLA_FLAGS"] = " ".join(flags + ours + [f"--xla_force_host_platform_device_count={count}"])


# The jaxlib CPU_XLA_FLAGS were measured with. XLA aborts the process on a flag it does not know, and the
# experimental ones get renamed: another jaxlib is searched for them first.
MEASURED_JAXLIB = "0.10."


def xla_knows(flag: str, *, jaxlib_version: str | None = None) -> bool:
    """Whether the installed jaxlib has the XLA flag ``--name[=value]``: yes for :data:`MEASURED_JAXLIB`, else
    whether its name is in jaxlib's shared libraries (~0.3 s where it is not; a false "yes" is possible only
    for a name XLA still spells somewhere after dropping the flag)."""
    name = flag.lstrip("-").partition("=")[0].encode()
    try:
        dist = importlib.metadata.distribution("jaxlib")
    except importlib.metadata.PackageNotFoundError:  # built from source: nothing to search, so not set
        return bool(jaxlib_version and jaxlib_version.startswith(MEASURED_JAXLIB))
    if (jaxlib_version or dist.version).startswith(MEASURED_JAXLIB):
        return True
    for file in dist.files or ():
        path = Path(str(dist.locate_file(file)))
        if ".so" not in file.name or not path.is_file() or path.stat().st_size == 0:
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m.find(name) >= 0:
                return True
    return False


def _jaxlib_version() -> str | None:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


CPU_XLA_FLAGS = cpu_xla_flags()


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    return Mesh(np.asarray(devices), (AXIS,), axis_types=(AxisType.Auto,))


def check_divisible(global_batch: int, mesh: Mesh, micro_batches: int = 1) -> None:
    """The batch splits evenly over the devices, and each device's share into ``micro_batches``."""
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(
            f"the global batch {global_batch} does not divide by the {n} devices; "
            f"set data.batch_size to a multiple of {n} (e.g. {max(n, global_batch // n * n)})"
        )
    per_device = global_batch // n
    if per_device % micro_batches:
        divisors = [d for d in range(2, per_device + 1) if per_device % d == 0][:4] or [1]
        raise ValueError(
            f"training.grad_accum_steps={micro_batches} does not divide the {per_device} examples each of the "
            f"{n} devices gets (data.batch_size={global_batch}); use a divisor of {per_device} "
            f"(e.g. {', '.join(map(str, divisors))})"
        )


def replicate(tree: T, mesh: Mesh) -> T:
    """Put every array of ``tree`` on all devices (the same values on every process)."""
    sharding = NamedSharding(mesh, P())

    def put(x: Any) -> Any:
        if not isinstance(x, (jax.Array, np.ndarray)):
            return x
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x  # already replicated on this mesh (e.g. restored, or replicated before)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        # Always the mesh's own sharding, even on one device: a step whose inputs came back with another
        # (equivalent) sharding would be traced and compiled a second time.
        host = np.asarray(x)  # a local value, the same on every process
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree)


def split_global(x: jax.Array, mesh: Mesh) -> jax.Array:
    """``x`` (the same values on every process, e.g. keys drawn from one seed) split over ``data`` across all
    processes' devices. PRNG key arrays go through their key data: ``jax.device_put`` onto a sharding that
    spans another process's devices is refused."""
    sharding = NamedSharding(mesh, P(AXIS))
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    typed = jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    host = np.asarray(jax.random.key_data(x) if typed else x)
    out = jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.random.wrap_key_data(out, impl=jax.random.key_impl(x)) if typed else out


def shard_batch(local: PyTree, mesh: Mesh) -> PyTree:
    """Assemble each process's slice of the global batch into arrays split over ``data``."""
    sharding = NamedSharding(mesh, P(AXIS))
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def batch_sharded(fn: Callable[..., Any], mesh: Mesh, in_specs: tuple[Any, ...], out_specs: Any) -> Callable[..., Any]:
    """``shard_map`` with the project's conventions: ``P()`` replicated, ``P("data")`` split."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def processes_differing(**values: str) -> dict[str, list[int]]:
    """For each named text, the processes whose copy differs from process 0's (empty where all agree): the
    processes of a run must share its config and folders, and a mismatch shows up otherwise as a silently
    inconsistent model, a collective that hangs, or a native abort. Every process must call it (a collective);
    one process alone returns no differences."""
    if jax.process_count() == 1:
        return {name: [] for name in values}
    import hashlib

    from jax.experimental import multihost_utils

    digests = np.stack([np.frombuffer(hashlib.sha256(v.encode()).digest()[:8], np.uint32) for v in values.values()])
    gathered = np.asarray(multihost_utils.process_allgather(digests))  # [processes, names, 2]
    return {name: [p for p in range(gathered.shape[0]) if (gathered[p, i] != gathered[0, i]).any()]
            for i, name in enumerate(values)}


def gather(x: jax.Array) -> np.ndarray:
    """A global array to host numpy on every process (all-gathers across processes when needed)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))






def check_fits_in_memory(what: str, program: Any, *args: Any) -> None:
    """On a CPU, a ``RuntimeError`` worded as XLA's own allocation failure on an accelerator (``RESOURCE_EXHAUSTED``,
    which the CLI reports in one line) where the jitted ``program``'s temporaries for ``args`` (XLA's buffer
    assignment, times this process's devices that hold ``args``: each runs its own copy) exceed the memory available now. The
    kernel's OOM killer otherwise ends the process when the program first runs, with no message (the seed's train
    step, batch 1024 on 2 host devices: 17.7 GiB each). The compile is the one the first call then uses (JAX's
    in-memory caches: one backend compile, one trace)."""
    if jax.default_backend() != "cpu":
        return
    import psutil

    analysis = program.lower(*args).compile().memory_analysis()
    if analysis is None:
        return
    need = analysis.temp_size_in_bytes * _local_devices_holding(args)
    available = psutil.virtual_memory().available
    if need > available:
        raise RuntimeError(f"RESOURCE_EXHAUSTED: {what} needs {need / 2**30:.1f} GiB of memory, "
                           f"{available / 2**30:.1f} GiB are available")


def _local_devices_holding(args: Any) -> int:
    """How many of this process's devices the arrays of ``args`` are on (a mesh may use only some of them); all of
    them where ``args`` holds no placed array."""
    local = set(jax.local_devices())
    holding = {d for leaf in jax.tree.leaves(args) if isinstance(leaf, jax.Array) for d in leaf.sharding.device_set}
    return len(holding & local) or len(local)


__all__ = ["AXIS", "P", "make_mesh", "check_divisible", "check_fits_in_memory", "replicate", "split_global",
           "shard_batch", "batch_sharded", "gather", "set_host_device_count", "CPU_XLA_FLAGS", "cpu_xla_flags",
           "xla_knows", "available_cores", "default_host_devices"]
