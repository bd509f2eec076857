"""What people see: metrics.jsonl, a progress bar on a terminal (plain lines otherwise), W&B."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from ddpm_eqx._io import write_text_atomic
from ddpm_eqx.config import Config, WandbConfig, WandbMode, to_dict

log = logging.getLogger("ddpm_eqx")


def setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def wandb_mode(cfg: WandbConfig) -> WandbMode:
    """``wandb.mode``, turned down by W&B's own switches: ``WANDB_MODE=disabled`` (or ``WANDB_DISABLED=true``)
    turns it off, ``WANDB_MODE=offline`` keeps an online run offline. The environment never turns it on."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if cfg.mode == "disabled" or env == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1"):
        return "disabled"
    return "offline" if env in ("offline", "dryrun") else cfg.mode


def start_wandb(cfg: WandbConfig, config: Config, workdir: Path, *, resume_id: str | None = None) -> Any:
    """A W&B run, or None when disabled (:func:`wandb_mode`). Online without credentials falls back to offline, with
    a warning. W&B's files go under ``workdir/wandb`` unless ``WANDB_DIR`` says otherwise."""
    mode = wandb_mode(cfg)
    if mode != cfg.mode:
        log.info("wandb.mode=%s, but the environment (WANDB_MODE/WANDB_DISABLED) makes it %s", cfg.mode, mode)
    if mode == "disabled":
        return None
    import wandb

    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _wandb_logged_in()):
        log.warning("wandb.mode=online but no W&B login (WANDB_API_KEY or `wandb login`); logging offline "
                    "to %s instead (sync later with `wandb sync`)", workdir / "wandb")
        mode = "offline"
    os.environ.setdefault("WANDB_DIR", str(workdir))

    def init(mode: Any) -> Any:  # wandb's Literal of modes
        return wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.name, job_type=cfg.job_type, mode=mode,
            config=to_dict(config), dir=str(workdir), id=resume_id, resume="allow" if resume_id else None,
        )

    if mode != "online":
        return init(mode)
    try:
        return init(mode)
    except Exception as e:  # noqa: BLE001  (wandb's CommError, timeouts, a bad key: W&B must not stop training)
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        log.warning("W&B could not start online (%s); logging offline to %s instead (sync later with "
                    "`wandb sync`)", reason, workdir / "wandb")
        wandb.teardown()  # the failed run keeps its id in wandb's service: "run ID ... is in use" otherwise
        return init("offline")


def _wandb_logged_in() -> bool:
    netrc = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def duration(seconds: float) -> str:
    """``H:MM:SS``, the hours counted on past a day (a 700k-step run's 38.9 h is 38:54:00, not 14:54:00)."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors it to W&B."""

    def __init__(self, workdir: Path, run: Any, *, total_steps: int, start_step: int, progress: bool | None = None,
                 log_train: bool = True):
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / "metrics.jsonl"
        self._truncate_after(start_step)
        self.run = run
        self.log_train = log_train  # wandb.log_train: the rows go to W&B too (metrics.jsonl has them either way)
        self.total = total_steps
        self.bar = None
        if progress if progress is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._last = (time.perf_counter(), start_step)
        self._first_row: tuple[float, int] | None = None  # (time, step) of the first row: the ETA's origin

    def restart_clock(self, step: int) -> None:
        """Time the next row from here, at ``step``: called once the first step after a start has run, so that its
        compile is not counted as training (a row of that step alone is timed with it)."""
        self._last = (time.perf_counter(), step)

    def eta_s(self, now: float, step: int, row_wall_s: float, row_steps: int) -> float:
        """Seconds to the last step at the wall-clock pace since the first row (checkpoints, grids and evaluations
        included: they take that time too; the first row's compile left out); at the first row, its own pace."""
        if self._first_row is None:
            self._first_row = (now, step)
        origin_time, origin_step = self._first_row
        seconds, steps = (now - origin_time, step - origin_step) if step > origin_step else (row_wall_s, row_steps)
        return (self.total - step) * seconds / max(steps, 1)

    def _truncate_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: drop their rows (and a line torn by a
        killed process), so each step appears once and every line parses."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
        write_text_atomic(self.path, "".join(kept))

    def write(self, step: int, metrics: dict[str, float], *, batch_size: int,
              data_wait_s: float | None = None, paused_s: float = 0.0) -> dict[str, float | int]:
        """One row: ``metrics`` with the throughput since the previous row and, given the seconds spent waiting
        for batches since then, ``data_wait``: that share of the time (near 1: the input pipeline is the limit).
        ``paused_s``: seconds of that time spent on other things than training (checkpoints, sample grids,
        evaluations), left out of both."""
        now, (then, then_step) = time.perf_counter(), self._last
        self._last = (now, step)
        elapsed = max(now - then - paused_s, 1e-9)
        rate = (step - then_step) / elapsed
        record = {"step": step, **metrics, "steps_per_s": rate, "images_per_s": rate * batch_size}
        if data_wait_s is not None:
            record["data_wait"] = min(data_wait_s / elapsed, 1.0)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None and self.log_train:
            self.run.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        else:
            eta = self.eta_s(now, step, now - then, step - then_step)
            log.info("step %d/%d loss %.4f  %.2f steps/s  eta %s", step, self.total, metrics["loss"], rate,
                     duration(eta))
        return record

    def write_eval(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}}) + "\n")
        if self.run is not None:
            self.run.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        log.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
