"""Data parallelism: 1 and 2 fake CPU devices give the same parameters after several steps."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("_parallel_worker.py")


def _run(counts: tuple[int, ...], out: Path, optimizer: str) -> dict[int, dict]:
    subprocess.run([sys.executable, str(WORKER), ",".join(map(str, counts)), str(out), optimizer], check=True,
                   cwd=WORKER.parents[1], capture_output=True)
    return {n: dict(np.load(out / f"{n}.npz")) for n in counts}


@pytest.mark.slow
def test_device_count_does_not_change_the_result(tmp_path):
    """SGD exposes a gradient scaled by the device count (shard_map's replicated-input trap); Adam
    would hide it. Tolerance: fp32 round-off of a reordered reduction (observed ~1e-8 relative)."""
    results = _run((1, 2), tmp_path, "sgd")  # meshes of 1 and 2 of one process's 2 host devices
    base = results[1]
    assert int(base["traces"]) == 1
    names = [k for k in base if k.startswith("arr_")]
    assert len(names) > 10
    assert int(results[2]["traces"]) == 1
    np.testing.assert_allclose(results[2]["loss"], base["loss"], rtol=1e-5)
    for k in names:
        np.testing.assert_allclose(results[2][k], base[k], rtol=1e-4, atol=1e-6, err_msg=f"2 devices, {k}")
    # The steps did move the parameters: the comparison is not between untouched initialisations.
    assert float(base["moved"]) > 1e-4
    # The memory check counts the devices of the mesh, not all of the process's: on 1 of 2 it passes with the
    # temporaries of one copy free (it was refused with twice those needed), and refuses a byte less.
    assert [r["memory_checks"].tolist() for r in results.values()] == [[True, False], [True, False]]


def test_host_device_flags_keep_the_users_own(monkeypatch):
    from ddpm_eqx.parallel import CPU_XLA_FLAGS, set_host_device_count

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=7 --xla_dump_to=/tmp/x")
    set_host_device_count(3)
    flags = os.environ["XLA_FLAGS"].split()
    assert flags.count("--xla_force_host_platform_device_count=3") == 1 and "--xla_dump_to=/tmp/x" in flags
    assert not any(f.endswith("=7") for f in flags) and all(f in flags for f in CPU_XLA_FLAGS)
    # A user's own setting of one of our flags wins.
    name = CPU_XLA_FLAGS[0].split("=")[0]
    monkeypatch.setenv("XLA_FLAGS", f"{name}=")
    set_host_device_count(None)
    flags = os.environ["XLA_FLAGS"].split()
    assert f"{name}=" in flags and CPU_XLA_FLAGS[0] not in flags


def test_the_default_device_count_divides_the_batch_and_follows_the_cores_this_process_may_use(
        monkeypatch, tmp_path):
    """One device per usable core; a batch those do not divide gets the most devices that do (a 6-core machine
    ran the shipped CPU config, batch 32, only with --host-devices); the affinity mask and a container's CPU
    quota (cgroup v2 and v1) count, not the machine's cores; a count the user set in XLA_FLAGS is kept."""
    from ddpm_eqx import parallel

    assert [parallel.default_host_devices(32, cores=c) for c in (1, 2, 3, 4, 5, 6, 8, 12)] == [1, 2, 2, 4, 4, 4, 8, 8]
    assert parallel.default_host_devices(None, cores=6) == 6 and parallel.default_host_devices(7, cores=6) == 1

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert parallel.available_cores(tmp_path) == 8  # affinity, not the machine's 64
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # docker --cpus 2.5 (cgroup v2)
    assert parallel.available_cores(tmp_path) == 3
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert parallel.available_cores(tmp_path) == 8
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")  # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert parallel.available_cores(tmp_path) == 2

    monkeypatch.setattr(parallel, "available_cores", lambda: 6)
    monkeypatch.setenv("XLA_FLAGS", "")
    parallel.set_host_device_count(None, batch=32)
    assert "--xla_force_host_platform_device_count=4" in os.environ["XLA_FLAGS"].split()
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
    parallel.set_host_device_count(None, batch=32)  # the user's own count stays
    assert "--xla_force_host_platform_device_count=3" in os.environ["XLA_FLAGS"].split()
    parallel.set_host_device_count(2)  # --host-devices wins over it
    flags = os.environ["XLA_FLAGS"].split()
    assert "--xla_force_host_platform_device_count=2" in flags and not any(f.endswith("=3") for f in flags)


def test_flags_another_jaxlib_lacks_are_left_out_not_fatal(monkeypatch):
    """XLA aborts the process on a flag it does not know (`Unknown flag in XLA_FLAGS`), and our CPU flag is an
    experimental one: with a jaxlib other than the one it was measured on, it is looked up in jaxlib's libraries
    (the real ones here), and left out with a warning where it is not there."""
    from ddpm_eqx import parallel

    flag = parallel.CPU_XLA_FLAGS[0]
    assert parallel.xla_knows(flag, jaxlib_version="0.99.0")  # found by the search, not the version
    assert not parallel.xla_knows("--xla_cpu_no_such_flag_abc=1", jaxlib_version="0.99.0")
    assert parallel.xla_knows("--xla_cpu_no_such_flag_abc=1")  # the measured jaxlib is trusted (why: above)
    monkeypatch.setattr(parallel, "CPU_XLA_FLAGS", (flag, "--xla_cpu_no_such_flag_abc=1"))
    monkeypatch.setattr(parallel, "MEASURED_JAXLIB", "0.99.")
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.warns(UserWarning, match="has no --xla_cpu_no_such_flag_abc=1: left unset"):
        parallel.set_host_device_count(2)
    flags = os.environ["XLA_FLAGS"]
    assert flag in flags and "no_such_flag" not in flags
    # A jaxlib built from source (no package metadata to search): the flags are left out, and said so.
    def not_installed(name: str) -> None:
        raise parallel.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(parallel.importlib.metadata, "version", not_installed)
    monkeypatch.setattr(parallel.importlib.metadata, "distribution", not_installed)
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.warns(UserWarning, match="not installed as a package"):
        parallel.set_host_device_count(2)
    assert "ynn_fusion_type" not in os.environ["XLA_FLAGS"]
    # What the check prevents: the same flag in XLA_FLAGS kills a process that starts a backend.
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_no_such_flag_abc=1", "JAX_PLATFORMS": "cpu"}
    killed = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode != 0 and "Unknown flag in XLA_FLAGS" in killed.stderr


def test_elementwise_fusions_go_to_ynnpack_only_with_avx512_on_the_measured_jaxlib(tmp_path):
    """AVX512_CPU_XLA_FLAGS where the CPU has AVX-512 and jaxlib is the measured one, else the base flags; the
    AVX-512 flag is one this jaxlib takes, and it does what it is set for: an elementwise program becomes a
    YNNPACK fusion instead of XLA's own loop kernel."""
    from ddpm_eqx import parallel

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert parallel.cpu_has_avx512(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512_bf16 avx512fx\n")  # whole words only
    assert not parallel.cpu_has_avx512(info)
    info.write_text("processor\t: 0\nFeatures\t: fp asimd sve avx512f\n")  # an Arm CPU's line, not x86 flags
    assert not parallel.cpu_has_avx512(info)
    assert not parallel.cpu_has_avx512(tmp_path / "missing")
    assert parallel.cpu_xla_flags(avx512=True, jaxlib_version="0.10.2") == parallel.AVX512_CPU_XLA_FLAGS
    assert parallel.cpu_xla_flags(avx512=False, jaxlib_version="0.10.2") == parallel.BASE_CPU_XLA_FLAGS
    assert parallel.cpu_xla_flags(avx512=True, jaxlib_version="0.11.0") == parallel.BASE_CPU_XLA_FLAGS
    assert parallel.CPU_XLA_FLAGS == parallel.cpu_xla_flags(avx512=parallel.cpu_has_avx512())

    program = ("import jax, jax.numpy as jnp; "
               "print(jax.jit(lambda x: jnp.tanh(x) * 2 + x).lower(jnp.ones((64, 64))).compile().as_text())")
    kinds = {}
    for name, flags in (("avx512", parallel.AVX512_CPU_XLA_FLAGS), ("base", parallel.BASE_CPU_XLA_FLAGS)):
        env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
        done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        kinds[name] = done.stdout
    assert "__ynn_fusion" in kinds["avx512"] and "kind=kLoop" not in kinds["avx512"]
    assert "__ynn_fusion" not in kinds["base"] and "kind=kLoop" in kinds["base"]
