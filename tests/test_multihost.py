"""Two processes on 127.0.0.1 (jax.distributed, gloo collectives on CPU) train one model together."""

import re
import socket
import subprocess

import pytest

from _cli import SAMPLES, _env, _final_params, _train_args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_local_processes_train_and_checkpoint_together(fashion_mnist_data_dir, tmp_path):
    workdir, port = tmp_path / "run", _free_port()
    procs = []
    for pid in range(2):
        args = _train_args(fashion_mnist_data_dir, workdir, 4, SAMPLES)
        args = [a if a != "2" or args[i - 1] != "--host-devices" else "1" for i, a in enumerate(args)]
        args += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid)]
        procs.append(subprocess.Popen(args, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
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
