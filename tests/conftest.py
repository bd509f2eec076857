"""Test-wide setup: runtime shape checks, no writes outside temporary folders, and real data fixtures.

pytest imports this file before any test module, so the import hook below is installed before the first
``import ddpm_eqx``: every function and dataclass of the package is then checked by beartype against its
jaxtyping annotations (shapes included) while the tests run.
"""

import fcntl
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import jaxtyping
import pytest

# W&B and TFDS must write nothing to ~: point them at a throwaway folder before anything imports them.
_SCRATCH = Path(tempfile.mkdtemp(prefix="ddpm_eqx_tests_"))
os.environ["WANDB_MODE"] = "disabled"
os.environ["WANDB_SILENT"] = "true"
for _var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
    os.environ[_var] = str(_SCRATCH / _var.lower())
os.environ["TFDS_DATA_DIR"] = str(_SCRATCH / "tensorflow_datasets")  # tests pass their own data_dir anyway

# The suite is built on (fake) CPU devices: on an accelerator machine, where `./run.sh main` installs jax's plugin
# into the same venv, it still runs on the CPU. Set JAX_PLATFORMS yourself to try another backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XDG_CACHE_HOME"] = str(_SCRATCH / "cache")  # the CLI's persistent XLA cache
# In-process tests share one persistent XLA cache (as do the subprocesses they start that do not set their own):
# tests that build the same program (the same tiny config trained by several reliability tests) compile it once.
# The folder is the first process's: pytest-xdist's workers inherit this environment from the controller, so
# the whole run shares it. Programs under 0.5 s are not worth the write.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_SCRATCH / "jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# JAX writes cache entries unlocked (`lru_cache.put`: `write_bytes`) unless its LRU eviction is on, which reads
# and writes under a file lock (the `filelock` package): on, with a limit no test run reaches, so that two
# workers compiling the same program never interleave their writes or read one half-written.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(64 << 30))

# As mypy reads annotations (PEP 484): an int is a float. beartype by default refused `min_snr_gamma=5`.
jaxtyping.install_import_hook("ddpm_eqx", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")

from ddpm_eqx.parallel import CPU_XLA_FLAGS  # noqa: E402  (after the hook, before any backend starts)
from _archives import FASHION_MNIST_FILES, SHARED_DATA  # noqa: E402
from _cli import FAST_COMPILE  # noqa: E402

# In-process tests compile with the XLA:CPU flags the CLI uses (subprocesses get them from the CLI).
# The tests compile far more than they compute, so XLA's generated code is built for compile speed
# (_cli.FAST_COMPILE): a 2-device worker of test_parallel took 37 s at the default level, 19 s at level 0.
# Library kernels (Eigen, YNNPACK) are unaffected; bitwise comparisons are between runs under the same flags.
# Subprocesses (the CLI, workers) inherit them; a flag already in XLA_FLAGS wins.
_OURS = tuple(f for f in (*CPU_XLA_FLAGS, *FAST_COMPILE) if f.split("=")[0] not in os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_OURS]).strip()



def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_SCRATCH, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_file() -> Callable[..., Path]:
    """``shared_file("mnist", "mnist_train.npz")``: a file of ``../shared/data``; skips the test, saying
    where it looked, when the file is absent."""

    def find(*parts: str) -> Path:
        path = SHARED_DATA.joinpath(*parts)
        if not path.exists():
            pytest.skip(f"real test data not found: {path} (expected ../shared/data beside the checkout)")
        return path

    return find


@contextmanager
def _built_once(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[tuple[Path, bool]]:
    """``(folder, ready)`` for a session fixture built once per test run, also under pytest-xdist.

    Under xdist (``addopts``: one worker per core) each worker has its own session, so a session fixture
    would be built once per worker; here the first worker builds ``folder`` in the run's shared temporary
    root while holding a lock, and the others wait for it and find ``ready`` true. Building must end
    by writing ``folder / "ready"`` (a failed build leaves it absent and the next worker retries).
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' basetemps are siblings under the run's root
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            ready = (folder / "ready").is_file()
            if not ready:
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
            yield folder, ready
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def fashion_mnist_data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A TFDS data dir (a ``str``, ready for ``DataConfig(data_dir=...)``) holding the real fashion_mnist.

    Prepared once per test run from the official archives in ``../shared/data/fashion_mnist`` through TFDS's
    manual dir (no network; about 13-30 s). Splits: train 60,000, test 10,000.
    """
    source = SHARED_DATA / "fashion_mnist"
    missing = [name for name in FASHION_MNIST_FILES if not (source / name).is_file()]
    if missing:
        pytest.skip(f"Fashion-MNIST archives not found in {source}: {', '.join(missing)}")
    from ddpm_eqx.config import DataConfig
    from ddpm_eqx.data import prepare_dataset

    with _built_once(tmp_path_factory, "tfds_fashion_mnist") as (data_dir, ready):
        if not ready:
            manual = data_dir / "downloads" / "manual" / "fashion_mnist"  # its own: MNIST's files have its names
            manual.mkdir(parents=True)
            for name in FASHION_MNIST_FILES:
                try:
                    (manual / name).symlink_to(source / name)
                except OSError:  # no symlinks (some Windows/CI file systems): copy, 30 MB
                    shutil.copy(source / name, manual / name)
            prepare_dataset(DataConfig(dataset="fashion_mnist", data_dir=str(data_dir)), download=False)
            (data_dir / "ready").touch()
    return str(data_dir)


@pytest.fixture(scope="session")
def reference_run(fashion_mnist_data_dir: str, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """An uninterrupted 8-step tiny run through the CLI (checkpoints at 2, 4, 6, 8): ``(workdir, result)``.

    The reference for the resume tests; copy it before changing anything in it (xdist workers share it).
    """
    from _cli import SAMPLES, _train

    with _built_once(tmp_path_factory, "reference_run") as (tmp, ready):
        if not ready:
            # The run's XLA cache is this worker's, as for every other CLI run of its tests (``_cli._env``).
            done = _train(fashion_mnist_data_dir, tmp / "run", 8, tmp_path_factory.getbasetemp() / "reference_run",
                          SAMPLES)
            (tmp / "result.json").write_text(json.dumps([done.args, done.returncode, done.stdout, done.stderr]))
            (tmp / "ready").touch()
    return tmp / "run", subprocess.CompletedProcess(*json.loads((tmp / "result.json").read_text()))


class _Messages(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _logged(level: int) -> Iterator[list[str]]:
    """The messages of the ``ddpm_eqx`` logger (and its children) at ``level`` and above while open; the logger
    lets them through meanwhile. It stops propagating to pytest's handlers once the CLI's logging is set up in
    the process, so caplog would miss them."""
    from ddpm_eqx.logging_utils import log

    handler, previous = _Messages(level), log.level
    log.addHandler(handler)
    log.setLevel(min(level, log.getEffectiveLevel()))
    try:
        yield handler.messages
    finally:
        log.removeHandler(handler)
        log.setLevel(previous)


@pytest.fixture
def warnings_logged() -> Iterator[list[str]]:
    """The warnings of the ``ddpm_eqx`` logger during the test."""
    with _logged(logging.WARNING) as messages:
        yield messages


@pytest.fixture
def info_logged() -> Iterator[list[str]]:
    """The ``ddpm_eqx`` logger's messages of level INFO and above during the test."""
    with _logged(logging.INFO) as messages:
        yield messages
