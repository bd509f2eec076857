"""Two processes on 127.0.0.1 (jax.distributed, gloo collectives on CPU) train one model together."""

import re
import signal
import socket
import subprocess
import time
from contextlib import contextmanager

import pytest

from _cli import SAMPLES, _env, _final_params, _train_args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(data_dir, tmp_path, steps, *extra, each=None, streams=None):  # noqa: ANN001, ANN002, ANN202
    """Start the two processes of a run in tmp_path/run (``each(pid)``: more arguments for one of them;
    ``streams(pid)``: its stdout/stderr, pipes by default)."""
    workdir, port, procs = tmp_path / "run", _free_port(), []
    for pid in range(2):
        args = _train_args(data_dir, workdir, steps, *extra)
        args = [a if a != "2" or args[i - 1] != "--host-devices" else "1" for i, a in enumerate(args)]
        args += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid)]
        args += each(pid) if each else []
        procs.append(subprocess.Popen(args, env=_env(tmp_path), text=True, **(
            streams(pid) if streams else {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE})))
    return workdir, procs


@pytest.mark.slow
def test_two_local_processes_train_and_checkpoint_together(fashion_mnist_data_dir, tmp_path):
    workdir, procs = _two_processes(fashion_mnist_data_dir, tmp_path, 4, SAMPLES)
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "finished at step 4" in out
    # Both processes computed the same global loss (a pmean over both processes' devices) ...
    losses = [re.findall(r"loss (\d+\.\d+)", err) for _, err in outs]
    assert losses[0] and losses[0] == losses[1]
    assert "on 2 device(s), global batch 8" in outs[0][1]
    # ... one checkpoint holds the state, and only process 0 wrote metrics and sample grids.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 2
    assert (workdir / "samples" / "step_4.png").is_file()
    assert len(_final_params(workdir, 4)) > 10
    # A resume past an unreadable newest checkpoint: both processes moved it aside (process 1 then stopped on the
    # vanished folder, the other hung), now process 0 moves it and both resume from step 2.
    victim = max((p for p in (workdir / "checkpoints" / "4").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:10])
    workdir, procs = _two_processes(fashion_mnist_data_dir, tmp_path, 6)  # grids off (not another run): no sampler
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "finished at step 6" in out, err[-3000:]
        assert "resumed from" in err and "at step 2" in err
        assert "train step read from" in err  # both processes read the step the first launch stored
    assert [p.name.split("-")[0] for p in (workdir / "checkpoints_unreadable").iterdir()] == ["4"]
    # Process 0 refuses the workdir (another config than its run's): the other process is told, not left waiting.
    workdir, procs = _two_processes(fashion_mnist_data_dir, tmp_path, 6, SAMPLES, "optim.lr=0.01")
    errors = [err.strip().splitlines()[-1] for _, err in (p.communicate(timeout=600) for p in procs)]
    assert [p.returncode for p in procs] == [2, 2]
    assert errors[0].startswith(f"error: {workdir} holds a run with a different config (optim.lr: 0.001 -> 0.01)")
    assert errors[1] == f"error: process 0 could not prepare {workdir} (its error says why)"


@pytest.mark.slow
@pytest.mark.parametrize("flag, named", [(["--set", "optim.lr=0.05"], "config"), (["--workdir", "elsewhere"],
                                                                                 "--workdir")])
def test_processes_started_with_other_flags_stop_with_one_line(fashion_mnist_data_dir, tmp_path, flag, named):
    """Another lr on one process trained replicas that silently differed (the checkpoints saying the first lr);
    another workdir hung both processes at the first save."""
    _, procs = _two_processes(fashion_mnist_data_dir, tmp_path, 4, each=lambda pid: flag if pid == 1 else [])
    for p, (_, err) in zip(procs, [p.communicate(timeout=600) for p in procs]):
        assert p.returncode == 2, err[-3000:]
        assert err.strip().splitlines()[-1] == (f"error: processes [1] were started with another {named} than "
                                                "process 0; start every process of a run with the same flags")


@contextmanager
def _two_processes_training(data_dir, tmp_path):  # noqa: ANN001, ANN202
    """Two processes of a long run, each step logged, none saved in flight, once both are training (in each step's
    collectives): ``(workdir, processes, their log files)``; killed at the end if still running."""
    logs = [tmp_path / f"process_{pid}.log" for pid in range(2)]
    files = [log.open("w") for log in logs]
    workdir, procs = _two_processes(data_dir, tmp_path, 100_000, "training.log_every_steps=1",
                                    "training.save_and_sample_every=100000",
                                    streams=lambda pid: {"stdout": files[pid], "stderr": subprocess.STDOUT})
    try:
        deadline = time.monotonic() + 500
        while "step 2/" not in logs[0].read_text():
            assert procs[0].poll() is None and time.monotonic() < deadline, logs[0].read_text()[-3000:]
            time.sleep(0.5)
        yield workdir, procs, logs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in files:
            f.close()


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_after_the_same_step_with_a_checkpoint(fashion_mnist_data_dir, tmp_path):
    """SIGTERM to one process (a pre-emption reaches hosts at different moments): it stopped alone and waited in
    its checkpoint's barrier, the other in the next step's collective: both hung until killed, nothing saved."""
    with _two_processes_training(fashion_mnist_data_dir, tmp_path) as (workdir, procs, logs):
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], texts[1][-3000:]
    [step] = {int(m) for t in texts for m in re.findall(r"stopped at step (\d+)", t)}
    assert "signal 15: saving a checkpoint" in texts[1] and "another process's signal: saving" in texts[0]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [step]


@pytest.mark.slow
def test_a_process_that_dies_stops_the_other_with_one_line(fashion_mnist_data_dir, tmp_path):
    """The survivor printed a long traceback, waited ~100 s in JAX's shutdown for the dead peer, then aborted."""
    with _two_processes_training(fashion_mnist_data_dir, tmp_path) as (_, procs, logs):
        procs[1].send_signal(signal.SIGKILL)  # no save in flight: a collective fails
        start = time.monotonic()
        code = procs[0].wait(timeout=120)
        took = time.monotonic() - start
    text = logs[0].read_text()
    last = text.strip().splitlines()[-1]
    assert code == 1 and took < 60, (code, took, text[-3000:])
    assert last.startswith("error: a step across the processes failed (") and last.endswith(
        "did another process of this run stop? Its checkpoints are intact: start every process again to resume")
    assert "Traceback" not in text
