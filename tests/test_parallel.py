"""Data parallelism: 1, 2 and 4 fake CPU devices give the same parameters after several steps."""

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
    results = _run((1, 2, 4), tmp_path, "sgd")  # meshes of 1, 2 and 4 of one process's 4 host devices
    base = results[1]
    assert int(base["traces"]) == 1
    names = [k for k in base if k.startswith("arr_")]
    assert len(names) > 10
    for n in (2, 4):
        assert int(results[n]["traces"]) == 1
        np.testing.assert_allclose(results[n]["loss"], base["loss"], rtol=1e-5)
        for k in names:
            np.testing.assert_allclose(results[n][k], base[k], rtol=1e-4, atol=1e-6, err_msg=f"{n} devices, {k}")
    # The steps did move the parameters: the comparison is not between untouched initialisations.
    assert float(base["moved"]) > 1e-4


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
