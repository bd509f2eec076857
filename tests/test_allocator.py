"""The caching allocator (ddpm_eqx.allocator): when it applies, that the CLI re-executes under it exactly once,
that it removes the per-execution page faults it is there for, and that results do not change under it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _cli import ROOT, _env
from ddpm_eqx import allocator
from ddpm_eqx.allocator import AllocatorError, preload_env

needs_tbb = pytest.mark.skipif(allocator.tbbmalloc_proxy() is None or not sys.platform.startswith("linux"),
                               reason="the tbb wheel (Linux x86-64) is not installed")
BASE = {"PATH": os.environ.get("PATH", ""), "JAX_PLATFORMS": "cpu"}


@needs_tbb
def test_preload_env_puts_tbbmalloc_first_and_keeps_what_was_preloaded():
    env = preload_env({**BASE, "LD_PRELOAD": "/opt/libfoo.so:/opt/libbar.so"})
    assert env is not None
    entries = env["LD_PRELOAD"].split()
    assert [Path(e).name for e in entries] == ["libtbbmalloc.so.2", "libtbbmalloc_proxy.so.2", "libfoo.so",
                                               "libbar.so"]
    assert all(Path(e).is_file() for e in entries[:2])
    assert int(env["TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD"]) == allocator.HUGE_THRESHOLD_BYTES
    assert env["PATH"] == BASE["PATH"]
    # Applied once: the re-executed process does not re-execute again.
    assert preload_env(env) is None


@needs_tbb
@pytest.mark.parametrize("extra", [
    {"DDPM_EQX_MALLOC": "system"},                           # the opt-out
    {"JAX_PLATFORMS": "cuda"},                               # an accelerator: not measured, left alone
    {"JAX_PLATFORMS": "tpu,cpu"},
    {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},  # the user's own allocator wins
])
def test_preload_env_does_not_apply(extra):
    assert preload_env({**BASE, **extra}) is None


def test_preload_env_does_not_apply_off_linux_or_without_tbb(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert preload_env(BASE) is None
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(allocator, "tbbmalloc_proxy", lambda: None)
    assert preload_env(BASE) is None


def test_an_unknown_choice_is_an_error_naming_the_choices():
    with pytest.raises(AllocatorError, match="DDPM_EQX_MALLOC='tcmalloc'.*tbb, system"):
        preload_env({**BASE, "DDPM_EQX_MALLOC": "tcmalloc"})
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--help"], capture_output=True, text=True,
                         env={**_env(ROOT / "x"), "DDPM_EQX_MALLOC": "tcmalloc"})
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: DDPM_EQX_MALLOC='tcmalloc' is not an allocator here; use one of tbb, system"]


# The CLI's entry point with a stand-in app: what re-executes, how often, and whether pid and argv survive.
PROBE = """
import os, sys, cli
from ddpm_eqx import allocator
print("start", os.getpid(), allocator.active(), sys.argv[1:], flush=True)
cli.app = lambda: print("app", os.getpid(), allocator.active(), sys.argv[1:])
cli.main()
"""


@needs_tbb
def test_the_cli_reexecutes_itself_once_under_tbbmalloc_with_the_same_pid_and_arguments(tmp_path):
    env = {**_env(tmp_path), "JAX_PLATFORMS": "cpu"}  # _env drops DDPM_EQX_MALLOC: the CLI's default
    env.pop("LD_PRELOAD", None)
    out = subprocess.run([sys.executable, "-c", PROBE, "train", "--x"], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=True).stdout.splitlines()
    pid = out[0].split()[1]
    assert out == [f"start {pid} None ['train', '--x']", f"start {pid} tbbmalloc ['train', '--x']",
                   f"app {pid} tbbmalloc ['train', '--x']"]
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**env, "DDPM_EQX_MALLOC": "system"}).stdout.splitlines()
    assert [line.split(maxsplit=2)[::2] for line in out] == [["start", "None []"], ["app", "None []"]]


# Each call of `f` needs a 128 MiB temporary (the first product), above glibc's 32 MiB mmap ceiling; its
# input and output are 2 MiB each.
FAULTS = """
import json, resource, sys
import jax, jax.numpy as jnp
from ddpm_eqx import allocator
f = jax.jit(lambda x, w: jnp.sin(x @ w) @ w.T)
x = jax.random.normal(jax.random.key(0), (8192, 64)); w = jax.random.normal(jax.random.key(1), (64, 4096)) / 8
y = f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    y = f(x, w).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 6
print(json.dumps({"faults": faults, "malloc": allocator.active(), "sum": float(jnp.sum(y)), "y00": float(y[0, 0])}))
"""


@needs_tbb
def test_tbbmalloc_removes_the_page_faults_of_xla_cpu_temporaries_and_changes_no_result():
    env = {**BASE, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    runs = {}
    for name, run_env in (("system", {**env, "DDPM_EQX_MALLOC": "system"}), ("tbb", preload_env(env))):
        assert run_env is not None
        out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, env=run_env, check=True)
        runs[name] = json.loads(out.stdout.splitlines()[-1])
    pages = 8192 * 4096 * 4 / os.sysconf("SC_PAGESIZE")  # 32,768 pages of 4 KiB
    assert runs["system"]["malloc"] is None and runs["tbb"]["malloc"] == "tbbmalloc"
    assert runs["system"]["faults"] > 0.9 * pages, runs       # glibc: a fresh mapping every call
    # tbbmalloc: a re-faulted temporary alone would be `pages` faults per call. Measured: 250-300, at times
    # ~5,800 (something of ~23 MiB besides the temporary), against 33,000 for glibc.
    assert runs["tbb"]["faults"] < 0.5 * pages, runs
    assert runs["tbb"]["sum"] == runs["system"]["sum"] and runs["tbb"]["y00"] == runs["system"]["y00"]


# That results do not change under tbbmalloc: a whole run under glibc is compared bitwise with the reference
# run (tbbmalloc) in test_cli_train.py::test_sigkill_then_resume_under_glibc_is_bitwise_the_uninterrupted_run.
