"""Checkpointer behaviour that needs several devices in one process (a subprocess with 2 host devices)."""

import json
import subprocess
import sys
import textwrap

from _cli import ROOT

# Saves a replicated state of a few distinct shapes twice, logging every XLA compile, then restores it.
_SCRIPT = textwrap.dedent("""
    import json, logging, sys
    from ddpm_eqx.parallel import set_host_device_count
    set_host_device_count(2)
    import jax, numpy as np
    from jax.sharding import NamedSharding
    from ddpm_eqx.checkpoint import Checkpointer
    from ddpm_eqx.parallel import P, make_mesh

    compiles = []
    class Compiles(logging.Handler):
        def emit(self, record):
            if "Finished XLA compilation" in record.getMessage():
                compiles.append(record.getMessage())
    logging.getLogger("jax").addHandler(Compiles())

    rng = np.random.default_rng(0)
    shapes = [(3, 3, 4, 8), (8,), (16, 6), (2, 10, 4), (2048, 4096)]  # 32 MiB: written after save returns
    state = [jax.device_put(rng.normal(size=s).astype(np.float32), NamedSharding(make_mesh(), P())) for s in shapes]
    ckpt = Checkpointer(sys.argv[1])
    with jax.log_compiles():
        for step in (1, 2):
            ckpt.save(step, state, {"step": step}, {})
            ckpt.wait()
    # The next train step donates the state while the save is still writing it: the save must hold copies,
    # not views of XLA's buffers (XLA would not donate them, and the step would copy the state).
    donated = [jax.device_put(np.array(x), x.sharding) for x in state]
    ckpt.save(3, donated, {"step": 3}, {})
    jax.jit(lambda xs: [x * 2 for x in xs], donate_argnums=0)(donated)
    ckpt.close()
    step, restored, _, _ = Checkpointer(sys.argv[1], read_only=True).restore_latest(
        [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in state])
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(state, restored))
    print(json.dumps({"devices": jax.device_count(), "compiles": compiles, "step": step, "same": same,
                      "donated": all(x.is_deleted() for x in donated)}))
""")


def test_a_single_process_save_dispatches_no_device_slices(tmp_path):
    """Orbax's replica-parallel writing cuts each replicated ``jax.Array`` into one slice per device, a jitted
    slice compiled per shape on the first save (5.7 s for the seed's state) and dispatched on every save
    before it returns. One process saves NumPy arrays instead: saving a replicated state over 2 devices
    compiles nothing, and the arrays read back bitwise. A save holds copies of its own (Orbax's NumPy handler
    deep-copies ``device_get``'s views): the arrays can be donated to the next step while it writes."""
    result = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "ckpt")], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 2
    assert report["compiles"] == []
    assert report["step"] == 3 and report["same"] and report["donated"]


def test_a_save_of_numpy_arrays_writes_them_as_they_were_when_it_was_called(tmp_path):
    """NumPy arrays in a state may be changed by their owner while an asynchronous save still writes them:
    the save holds its own copy (Orbax's NumPy handler no longer copies; ``_as_saved`` does, except for an
    accelerator's arrays, which ``device_get`` has already copied to the host)."""
    import jax
    import numpy as np

    from ddpm_eqx.checkpoint import Checkpointer

    array = np.ones((2048, 4096), np.float32)  # 32 MiB: still being written after save returns
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, [array], {"step": 1}, {})
    array[:] = 0
    ckpt.close()
    _, restored, _, _ = Checkpointer(tmp_path / "ckpt", read_only=True).restore_latest(
        [jax.ShapeDtypeStruct(array.shape, array.dtype)])
    assert np.all(np.asarray(restored[0]) == 1)


def test_an_unreadable_checkpoint_names_why_and_what_to_do(tmp_path):
    """`sample --step N` on a damaged checkpoint said only "none of the checkpoints [N] could be read"."""
    import jax
    import numpy as np
    import pytest

    from ddpm_eqx.checkpoint import CheckpointError, Checkpointer

    ckpt = Checkpointer(tmp_path / "ckpt")
    for step in (1, 2):
        ckpt.save(step, [np.full((64, 64), step, np.float32)], {"step": step}, {})
        ckpt.wait()
    ckpt.close()
    for step in (1, 2):
        victim = max((p for p in (tmp_path / "ckpt" / str(step) / "state").rglob("*") if p.is_file()),
                     key=lambda p: p.stat().st_size)
        victim.write_bytes(victim.read_bytes()[:10])
    skeleton = [jax.ShapeDtypeStruct((64, 64), np.float32)]
    reader = Checkpointer(tmp_path / "ckpt", read_only=True)
    with pytest.raises(CheckpointError, match=r"checkpoint 2 in .*ckpt cannot be read \(\w+: .*\); pick another --step "
                                              r"\(steps there: \[1\]\)"):
        reader.restore_latest(skeleton, step=2)
    with pytest.raises(CheckpointError, match=r"none of the checkpoints \[1, 2\] in .* could be read \(step 2: \w+: .*\); "
                                              "is the disk or a copy of them damaged"):
        reader.restore_latest(skeleton)
    reader.close()


def test_a_save_killed_mid_write_leaves_no_folder_behind_the_next_writer(tmp_path):
    """A SIGKILL during an asynchronous save leaves ``<step>.orbax-checkpoint-tmp`` (as large as a checkpoint),
    which only a later save of that same step removed: with another save cadence, never. The next run's
    checkpointer removes it; a reader (``sample`` during training) leaves the writer's folders alone."""
    import numpy as np

    from ddpm_eqx.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, [np.ones(4, np.float32)], {"step": 1}, {})
    ckpt.close()
    torn = tmp_path / "ckpt" / "2.orbax-checkpoint-tmp"
    (torn / "state").mkdir(parents=True)
    (torn / "state" / "shard").write_bytes(bytes(1000))
    reader = Checkpointer(tmp_path / "ckpt", read_only=True)
    assert reader.all_steps() == [1] and torn.is_dir()
    reader.close()
    writer = Checkpointer(tmp_path / "ckpt")  # removes it in the background; its first save waits for that
    writer.save(3, [np.ones(4, np.float32)], {"step": 3}, {})
    writer.close()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "3"]


def test_the_same_step_moved_aside_twice_in_a_second_is_kept_twice_side_by_side(tmp_path, monkeypatch):
    """Folders were named <step>-<seconds>: a second move of that step within the second went inside the first."""
    import types

    import numpy as np

    import ddpm_eqx.checkpoint
    from ddpm_eqx.checkpoint import Checkpointer

    monkeypatch.setattr(ddpm_eqx.checkpoint, "time", types.SimpleNamespace(time=lambda: 1_000.0))  # one second

    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=5)
    moved = []
    for value in (1.0, 2.0):
        for step in (1, 2):
            if step not in ckpt.all_steps():
                ckpt.save(step, [np.full(4, value, np.float32)], {"step": step}, {})
                ckpt.wait()
        moved += ckpt.quarantine_after(1)
    ckpt.close()
    assert [p.name for p in moved] == ["2-1000", "2-1000-1"]
    assert all(p.parent == tmp_path / "checkpoints_unreadable" and (p / "state").is_dir() and not (p / "2").exists()
               for p in moved)
