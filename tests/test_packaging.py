"""constraints.txt (what ./run.sh installs) pins every dependency pyproject.toml declares, within its bounds;
the package declares what it imports; ./run.sh picks jax's accelerator plugin for the machine;
benchmarks/device_kit.sh carries what a device image lacks."""

import ast
import glob
import importlib.metadata
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not a NAME==VERSION pin"
            assert canonicalize_name(name) not in pins, f"constraints.txt pins {name} twice"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_constraints_pin_every_declared_dependency_within_its_bounds():
    project = _project()
    extras = project["optional-dependencies"]
    declared = [Requirement(r) for r in project["dependencies"] + extras["prepare"] + extras["test"]]
    pins = _pins()
    # Pinned on Linux x86-64 (the header says where); platform-only dependencies apply there.
    env = {"sys_platform": "linux", "platform_machine": "x86_64"}
    for req in declared:
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in constraints.txt: run ./run.sh lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]} outside pyproject's {req.specifier}: run ./run.sh lock")


# Imported only inside a function that says what to install when it is missing.
OPTIONAL_IMPORTS = {"torch": "inception.convert_pth_to_npz, a one-off conversion of pytorch-fid's weights"}


def test_every_third_party_import_of_the_package_is_a_declared_dependency():
    """What the package imports must be in pyproject's dependencies, not merely installed by another package
    (psutil and absl-py were, through wandb and TFDS, until this test)."""
    modules: set[str] = set()
    for path in [ROOT / "cli.py", *(ROOT / "ddpm_eqx").glob("*.py"), *(ROOT / "configs").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.partition(".")[0])
    modules -= set(sys.stdlib_module_names) | {"__future__", "ddpm_eqx", "configs", "cli", *OPTIONAL_IMPORTS}
    assert {"jax", "grain", "PIL"} <= modules  # the scan found the imports
    owners = importlib.metadata.packages_distributions()
    declared = {canonicalize_name(Requirement(r).name) for r in _project()["dependencies"]}
    for module in sorted(modules):
        dists = {canonicalize_name(d) for d in owners.get(module, [])}
        assert dists, f"{module} is imported by the package but not installed"
        assert dists & declared, f"{module} (from {sorted(dists)}) is imported but not declared in pyproject.toml"


def test_the_device_kit_carries_what_the_device_image_lacks_at_the_pinned_versions():
    """`benchmarks/device_kit.sh missing`: this venv's dependency closure of ddpm-eqx, less the device image's
    packages and the ones a kit run never imports (wandb, tbb), each at the version installed here."""
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_kit.sh"), "missing"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    carried = dict(line.split("==") for line in result.stdout.split())
    names = {canonicalize_name(n) for n in carried}
    lines = (ROOT / "benchmarks" / "device_image_packages.txt").read_text().splitlines()
    image = {canonicalize_name(line) for line in lines if line.strip() and not line.startswith("#")}
    assert {"jax", "equinox", "optax", "orbax-checkpoint"} <= image
    assert {"grain", "tensorflow-datasets", "array-record", "beartype"} <= names  # imported, not in the image
    assert "promise" in names  # a dependency of a dependency (TFDS), not declared here
    assert not names & (image | {"wandb", "tbb", "ddpm-eqx"})
    assert not names & {"cwevals", "opentelemetry-sdk"}  # wandb's own, left out with it
    for name, version in carried.items():
        assert importlib.metadata.version(name) == version


def test_constraints_do_not_pin_this_project():
    assert "ddpm-eqx" not in _pins()  # installed editable from the checkout, never from an index


def test_run_sh_installs_the_cuda_plugin_where_nvidia_smi_lists_a_gpu(tmp_path):
    """Plain jax runs on the CPU only: `./run.sh main` on a GPU machine must add jax[cuda12] (or it trains there
    on the CPU). Decided from nvidia-smi, faked here; DDPM_EQX_JAX_EXTRA overrides the guess."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "DDPM_EQX_JAX_EXTRA"}
    env["PATH"] = f"{fake.parent}{os.pathsep}{env['PATH']}"

    def extra(script: str, **override: str) -> str:
        fake.write_text(f"#!/bin/sh\n{script}\n")
        fake.chmod(0o755)
        result = subprocess.run([str(ROOT / "run.sh"), "jax-extra"], env={**env, **override}, capture_output=True,
                                text=True, timeout=60, check=True)
        return result.stdout.strip()

    assert extra('echo "GPU 0: NVIDIA H200 (UUID: GPU-5c1e)"') == "cuda12"
    no_gpu = "tpu" if glob.glob("/dev/accel*") else ""  # a TPU VM's devices
    failing_driver = 'echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver."; exit 9'
    assert extra(failing_driver) == no_gpu
    assert extra('echo "GPU 0: NVIDIA H200 (UUID: GPU-5c1e)"', DDPM_EQX_JAX_EXTRA="cuda13") == "cuda13"
    assert extra('echo "GPU 0: NVIDIA H200 (UUID: GPU-5c1e)"', DDPM_EQX_JAX_EXTRA="") == ""


def test_a_users_script_outside_the_checkout_is_type_checked_against_the_package(tmp_path):
    """With setuptools' default editable install (an import hook) mypy found no ``ddpm_eqx`` in a user's script
    and every imported type was Any; run.sh installs it in compat mode (a path). The overloads of ``sample``
    give ``Array`` without ``return_path``."""
    script = tmp_path / "user.py"
    script.write_text(textwrap.dedent("""\
        import jax
        from ddpm_eqx.diffusion import GaussianDiffusion
        from ddpm_eqx.sample import sample
        from ddpm_eqx.unet import UNet

        model = UNet(dim=8, channels=1, image_size=8, key=jax.random.key(0))
        process = GaussianDiffusion(timesteps=30)
        keys = jax.random.split(jax.random.key(1), 2)
        images: jax.Array = sample(process, model, keys, (1, 8, 8))
        pair: tuple[jax.Array, jax.Array] = sample(process, model, keys, (1, 8, 8), return_path=True)
        wrong: int = sample(process, model, keys, (1, 8, 8))
    """))
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(script)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert "Cannot find implementation" not in result.stdout, ("mypy finds no ddpm_eqx: install it editable with "
                                                               "--config-settings editable_mode=compat, as run.sh does")
    assert len(errors) == 1 and "user.py:11: error: Incompatible types in assignment" in errors[0], result.stdout


def test_run_sh_main_samples_the_workdir_it_trained(tmp_path):
    """`./run.sh main --workdir elsewhere` trained there but sampled runs/fashion_mnist (a stale run, or none)."""
    venv, log = tmp_path / "venv", tmp_path / "calls"
    (venv / "bin").mkdir(parents=True)
    fakes = {"pip": "exit 0",  # installs: nothing to do here
             "python": 'if [ "$1" = "-m" ]; then exit 0; fi; exit 1',  # `-m uv pip install`; jax on the CPU
             "ddpm-eqx": f'echo "$@" >> {log}'}
    for name, body in fakes.items():
        (venv / "bin" / name).write_text(f"#!/bin/sh\n{body}\n")
        (venv / "bin" / name).chmod(0o755)
    env = {**os.environ, "VENV": str(venv), "TFDS_DATA_DIR": str(tmp_path / "tfds"), "DDPM_EQX_JAX_EXTRA": ""}
    for args, workdir in ((["--workdir", "elsewhere", "--set", "a=1"], "elsewhere"), (["--workdir=w2"], "w2"),
                          (["--set", "a=1"], "runs/fashion_mnist")):
        log.unlink(missing_ok=True)
        subprocess.run([str(ROOT / "run.sh"), "main", *args], env=env, capture_output=True, text=True, timeout=60,
                       check=True)
        train, sample = log.read_text().splitlines()
        assert train.startswith("train --config configs/fashion_mnist_cpu.py") and train.endswith(" ".join(args))
        assert f"--workdir {workdir} " in f"{train} " or f"--workdir={workdir}" in train
        assert sample.startswith(f"sample --ckpt {workdir} ") and f"--out {workdir}/final_samples.png" in sample
