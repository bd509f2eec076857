"""``ddpm-eqx sample``: restore a run's EMA weights and write a grid, raw images, a trajectory."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_eqx.checkpoint import CheckpointError, Checkpointer
from ddpm_eqx.config import Config, from_dict, from_json, program_json, trained_config_dict
from ddpm_eqx.generate import ShardedSampler
from ddpm_eqx.images import save_grid, save_trajectory, to_uint8
from ddpm_eqx.logging_utils import log, setup_logging
from ddpm_eqx.parallel import make_mesh, replicate
from ddpm_eqx.sample import Sampler


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    ckpt: Path
    step: int | None = None
    out: Path | None = None
    npz: Path | None = None
    num: int = 64
    batch_size: int = 64
    sampler: str | None = None
    """ddpm or ddim; None: the run's ``sampling.sampler`` (with its steps and eta), or ddim where ``steps`` or
    ``eta`` is given."""
    steps: int | None = None
    eta: float | None = None
    seed: int = 0
    label: int | None = None
    guidance: float | None = None
    """None: the run's ``sampling.guidance``."""
    trajectory: Path | None = None
    trace_cache: Path | None = None
    """Where the traced sampler is kept for the next process (see :mod:`ddpm_eqx.trace_cache`)."""
    default_steps: int | None = None
    """DDIM steps where ``steps`` is None, at most the model's timesteps (None: all of them)."""

    def for_run(self, cfg: Config) -> SampleRequest:
        """The request as drawn from the run of ``cfg``: what was not given taken from its ``sampling`` config
        (how its training grids were drawn) where no sampler option is given at all; otherwise DDIM's steps
        default to ``default_steps`` (at most the model's timesteps), its eta to 0. DDIM's steps are explicit."""
        s, timesteps = cfg.sampling, cfg.ddpm.timesteps
        # A stored config an earlier version accepted may hold settings its grids ignored (guidance for a model
        # that cannot be guided, DDIM's steps with DDPM): taken as the grids took them, not as errors.
        guidable = cfg.model.num_classes is not None and cfg.training.cond_drop_prob > 0
        guidance = (s.guidance if guidable else 1.0) if self.guidance is None else self.guidance
        sampler: str
        if self.sampler is None and self.steps is None and self.eta is None:
            sampler, steps, eta = s.sampler, s.steps, s.eta
            if sampler == "ddpm":
                steps, eta = None, 0.0
        else:
            sampler, steps, eta = self.sampler or "ddim", self.steps, self.eta or 0.0
            if steps is None and sampler == "ddim" and self.default_steps is not None:
                steps = min(self.default_steps, timesteps)
        if sampler == "ddim" and steps is None:
            steps = timesteps
        return dataclasses.replace(self, sampler=sampler, steps=steps, eta=eta, guidance=guidance)


def find_run(ckpt: Path) -> tuple[Path, Path, int | None]:
    """(run folder, checkpoints folder, step) for a run folder, its ``checkpoints/`` or one step's folder in it
    (``checkpoints/<step>``, the one step it names; otherwise None)."""
    ckpt = ckpt.expanduser()
    if not ckpt.exists():
        raise CheckpointError(f"--ckpt {ckpt} does not exist; pass a run folder written by `ddpm-eqx train`")
    step = None
    if ckpt.name.isdigit() and ckpt.parent.name == "checkpoints" and (ckpt / "state").is_dir():
        step, ckpt = int(ckpt.name), ckpt.parent
    run = ckpt.parent if ckpt.name == "checkpoints" else ckpt
    ckpt_dir = run / "checkpoints"
    if not ckpt_dir.is_dir() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        raise CheckpointError(f"--ckpt {ckpt} holds no checkpoints (expected {ckpt_dir}/<step>/); "
                              "train first or point at another run")
    if not (run / "config.json").is_file():
        raise CheckpointError(f"--ckpt {ckpt}: no config.json in {run}; is this a ddpm-eqx run folder?")
    return run, ckpt_dir, step


def _named_step(ckpt: Path, step: int | None) -> tuple[Path, Path, int | None]:
    """(run folder, checkpoints folder, step) as ``find_run``, the step from ``--ckpt``'s folder or ``--step``."""
    run, ckpt_dir, named = find_run(ckpt)
    if named is not None and step not in (None, named):
        raise CheckpointError(f"--ckpt names step {named}'s folder but --step is {step}; drop one of them")
    return run, ckpt_dir, named if step is None else step


def resolve_step(ckpt: Path, step: int | None = None) -> tuple[Path, Path, int | None]:
    """:func:`_named_step`, the step checked to be there (``Checkpointer.require``), before any long work."""
    run, ckpt_dir, step = _named_step(ckpt, step)
    if step is not None:
        manager = Checkpointer(ckpt_dir, read_only=True)
        try:
            manager.require(step)
        finally:
            manager.close()
    return run, ckpt_dir, step


def _trained(stored: dict[str, Any] | None, fallback: Config) -> Config:
    try:
        return fallback if stored is None else from_dict(stored)
    except (ValueError, TypeError):  # a config of another version: config.json's
        return fallback


def checkpoint_config(run: Path, step: int | None = None) -> Config:
    """The config checkpoint ``step`` (None: the newest) of ``run`` was trained with, read without JAX;
    ``config.json``'s where it names none this version reads."""
    return _trained(trained_config_dict(run, None if step is None else [step]),
                    from_json((run / "config.json").read_text()))


def load_ema_model(ckpt: Path, step: int | None = None) -> tuple[Config, eqx.Module, int]:
    """The config checkpoint ``step`` (the newest readable one by default) was trained with, and its EMA model.

    The config is the checkpoint's own: ``config.json`` is rewritten by a ``--force`` start with another diffusion
    (schedule, objective, ...) on the same weight shapes, whose older checkpoints must still be drawn as trained."""
    from ddpm_eqx.state import earlier_layouts, state_skeleton

    run, ckpt_dir, step = _named_step(ckpt, step)  # restore_latest checks that the step is there

    def restore(cfg: Config, step: int | None) -> tuple[int, Any, dict[str, Any]]:
        skeleton = state_skeleton(cfg)
        manager = Checkpointer(ckpt_dir, read_only=True)
        try:
            found = manager.restore_latest(skeleton, step=step, layouts=earlier_layouts(cfg, skeleton))
        finally:
            manager.close()  # an open manager's async machinery prints errors at interpreter exit
        assert found is not None
        return found[0], found[1], found[3]

    cfg = checkpoint_config(run, step)
    restored_step, state, meta = restore(cfg, step)
    trained = _trained(meta.get("config"), cfg)
    if trained.model != cfg.model:  # past an unreadable newer step of a --force start with another model.dropout
        restored_step, state, _ = restore(trained, restored_step)
    return trained, state.ema_model, restored_step


def draw_images(req: SampleRequest) -> tuple[Config, np.ndarray, int]:
    """The run's config, ``req.num`` images (model layout, [-1, 1]) and the checkpoint step used."""
    setup_logging()
    cfg, model, step = load_ema_model(req.ckpt, req.step)
    images, _ = _draw(req, cfg, model)
    return cfg, images, step


class _Setup(NamedTuple):
    """What drawing the images built, reused for a trajectory of the same images."""

    process: Any
    model: Any
    shape: tuple[int, int, int]
    mesh: Any
    kwargs: dict[str, Any]
    keys: jax.Array
    labels: jax.Array | None


def check_request(req: SampleRequest, cfg: Config) -> SampleRequest:
    """``req`` for the run of ``cfg`` (:meth:`SampleRequest.for_run`), or a ``ValueError`` naming an option this
    model cannot use: checked from the run's config alone, before anything long (eval prepares a dataset)."""
    num_classes = cfg.model.num_classes
    if req.label is not None and num_classes is None:
        raise ValueError(f"--label {req.label}: this model is not class-conditional; drop --label")
    if req.label is not None and not 0 <= req.label < (num_classes or 0):
        raise ValueError(f"--label {req.label} is out of range; this model has classes 0..{(num_classes or 1) - 1}")
    req = req.for_run(cfg)
    if req.guidance != 1.0 and num_classes is None:
        raise ValueError(f"--guidance {req.guidance}: this model is not class-conditional; drop --guidance")
    if req.guidance != 1.0 and cfg.training.cond_drop_prob == 0:
        raise ValueError(f"--guidance {req.guidance}: this model was trained with training.cond_drop_prob=0, so it "
                         "never learnt the unconditional prediction guidance needs; drop --guidance")
    if req.steps is not None and not 1 <= req.steps <= cfg.ddpm.timesteps:
        raise ValueError(f"--steps {req.steps} must be in 1..{cfg.ddpm.timesteps}")
    return req


def _draw(req: SampleRequest, cfg: Config, model: eqx.Module) -> tuple[np.ndarray, _Setup]:
    req = check_request(req, cfg)
    num_classes = cfg.model.num_classes
    assert req.eta is not None and req.guidance is not None  # resolved
    from ddpm_eqx.diffusion import make_diffusion

    mesh = make_mesh()
    process = make_diffusion(cfg.ddpm, cfg.training.loss_type)
    model = replicate(model, mesh)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    sampler_name: Sampler = "ddim" if req.sampler == "ddim" else "ddpm"
    kwargs = dict(sampler=sampler_name, steps=req.steps, eta=req.eta, guidance=req.guidance,
                  conditional=num_classes is not None, trace_cache=req.trace_cache, determines=program_json(cfg))
    draw = ShardedSampler(process, model, shape, mesh, **kwargs)  # type: ignore[arg-type]
    keys = jax.random.split(jax.random.key(req.seed), req.num)
    labels = _labels(req, num_classes)
    from tqdm import tqdm

    chunks = []
    for lo in tqdm(range(0, req.num, req.batch_size), desc="sampling", unit="batch", disable=None):
        hi = min(lo + req.batch_size, req.num)
        chunks.append(draw(model, keys[lo:hi], None if labels is None else labels[lo:hi]))
    return np.concatenate(chunks), _Setup(process, model, shape, mesh, kwargs, keys, labels)


def run_sample(req: SampleRequest) -> list[Path]:
    setup_logging()
    cfg, model, step = load_ema_model(req.ckpt, req.step)
    req = req.for_run(cfg)  # the grid's default name gives what was drawn
    images, setup = _draw(req, cfg, model)
    labels = setup.labels
    run = find_run(req.ckpt)[0]
    out = req.out or run / "samples" / default_name(req, step)
    written = [save_grid(images, out)]
    if req.npz is not None:
        req.npz.parent.mkdir(parents=True, exist_ok=True)
        # What `--dataset` imports: no label array for an unconditional model (a scalar -1 was refused there).
        if labels is None:
            np.savez_compressed(req.npz, image=to_uint8(images))
        else:
            np.savez_compressed(req.npz, image=to_uint8(images), label=np.asarray(labels))
        written.append(req.npz)
    if req.trajectory is not None:
        tracer = ShardedSampler(setup.process, setup.model, setup.shape, setup.mesh, return_path=True,
                                **setup.kwargs)
        n = min(8, req.num)
        _, path = tracer(setup.model, setup.keys[:n], None if labels is None else labels[:n])
        written.append(save_trajectory(path, req.trajectory))
    log.info("sampled %d images from step %d", req.num, step)
    return written


def default_name(req: SampleRequest, step: int) -> str:
    """``sample_<step>_<sampler><steps>[_eta<e>][_label<l>][_guidance<g>][_n<num>]_seed<seed>.png``: every
    option that changes the grid, the ones at their defaults left out, so another draw never overwrites it."""
    extra = [f"eta{req.eta:g}" if req.eta else "", f"label{req.label}" if req.label is not None else "",
             f"guidance{req.guidance:g}" if req.guidance not in (None, 1.0) else "", f"n{req.num}" if req.num != 64 else ""]
    return "_".join(["sample", str(step), f"{req.sampler}{req.steps or ''}", *filter(None, extra), f"seed{req.seed}"]) + ".png"


def _labels(req: SampleRequest, num_classes: int | None) -> jax.Array | None:
    if num_classes is None:
        return None
    if req.label is not None:
        return jnp.full((req.num,), req.label, jnp.int32)
    return jnp.arange(req.num, dtype=jnp.int32) % num_classes


logging.getLogger("absl").setLevel(logging.WARNING)
