"""The environment stored with each checkpoint, and the warning when a run resumes under another one."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
import pytest

from ddpm_eqx.checkpoint import Checkpointer
from ddpm_eqx.environment import describe, differences
from ddpm_eqx.state import TrainState
from ddpm_eqx.train import _restore


def test_describe_names_the_versions_the_modules_report_and_this_process_devices():
    env = describe()
    # The modules' own version attributes, not importlib.metadata again: a wrong distribution name fails.
    for name, module in [("jax", jax), ("jaxlib", jaxlib), ("equinox", eqx), ("optax", optax), ("numpy", np)]:
        assert env["packages"][name] == module.__version__, name
    assert env["packages"]["ddpm-eqx"] is not None  # the package is installed (editable in the tests)
    assert (env["backend"], env["devices"], env["processes"]) == (jax.default_backend(), jax.device_count(), 1)
    assert env["device_kind"] == jax.devices()[0].device_kind


def test_differences_name_each_change_and_skip_what_an_older_checkpoint_lacks():
    now = {"python": "3.11.9", "packages": {"jax": "0.10.3", "grain": None, "numpy": "2.1.0"}, "devices": 2}
    assert differences(now, now) == []
    assert differences({}, now) == []  # written before environments were stored
    was = {"python": "3.11.9", "packages": {"jax": "0.10.2", "grain": "0.2.18", "numpy": "2.1.0"}, "devices": 8}
    assert differences(was, now) == ["jax 0.10.2 -> 0.10.3", "grain 0.2.18 -> absent", "devices 8 -> 2"]
    assert differences({"packages": {"wandb": "0.31.0"}, "gpu_count": 1}, now) == ["wandb 0.31.0 -> absent"]


def _state(w: jax.Array) -> TrainState:
    return TrainState(jnp.array(4), {"w": w}, {"w": w}, ())


def _checkpoint(directory, environment):  # noqa: ANN001, ANN202
    ckpt = Checkpointer(directory, async_save=False)
    ckpt.save(4, _state(jnp.arange(3.0)), None, {"step": 4, "environment": environment})
    ckpt.close()


def test_resuming_under_other_versions_or_devices_warns_with_what_changed(tmp_path, warnings_logged):
    now = describe()
    then = {**now, "packages": {**now["packages"], "jax": "0.0.1"}, "devices": now["devices"] + 7}
    _checkpoint(tmp_path / "run" / "checkpoints", then)
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    state, _ = _restore(ckpt, _state(jnp.zeros(3)), None, None, now)
    ckpt.close()
    np.testing.assert_array_equal(state.model["w"], np.arange(3.0))  # resumed all the same
    [line] = warnings_logged
    assert f"jax 0.0.1 -> {jax.__version__}; devices {now['devices'] + 7} -> {now['devices']}" in line
    assert "step 4" in line and "bitwise" in line


@pytest.mark.parametrize("case", ["same environment", "written before environments were stored", "restore_from"])
def test_no_warning_on_the_same_environment_an_older_checkpoint_or_a_new_run(tmp_path, warnings_logged, case):
    now = describe()
    other = {**now, "packages": {**now["packages"], "jax": "0.0.1"}}
    source = tmp_path / "other" / "checkpoints"
    _checkpoint(source, {"same environment": now, "restore_from": other}.get(case, {}))
    ckpt = Checkpointer(source if case != "restore_from" else tmp_path / "new" / "checkpoints")
    state, _ = _restore(ckpt, _state(jnp.zeros(3)), None, source if case == "restore_from" else None, now)
    ckpt.close()
    np.testing.assert_array_equal(state.model["w"], np.arange(3.0))
    assert warnings_logged == []
