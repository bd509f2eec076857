"""Run configuration: frozen, typed dataclasses with the seed's field names.

Every field of the seed's ``ml_collections`` config keeps its dotted name (``data.batch_size``,
``ddpm.beta_schedule``, ``training.num_train_steps`` ...), so a seed user's overrides carry over.
Config files in ``configs/`` expose ``get_config() -> Config`` and derive variants with
``dataclasses.replace``. Overrides (``--set a.b=value``) are parsed against the field's annotation
and validated by each section's ``__post_init__``; any error is a ``ConfigError`` with one line
naming the problem and the fix.
"""

from __future__ import annotations

import contextvars
import dataclasses
import importlib.util
import json
import traceback
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from ddpm_eqx._io import first_line

BetaSchedule = Literal["linear", "cosine", "sigmoid"]
Objective = Literal["pred_noise", "pred_x0", "pred_v"]
LossType = Literal["l1", "l2"]
Downsample = Literal["conv", "pixel_unshuffle"]
WandbMode = Literal["online", "offline", "disabled"]


class ConfigError(ValueError):
    """A configuration value or override is invalid; the message says how to fix it."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


_STORED = contextvars.ContextVar("_STORED", default=False)
"""True while :func:`from_dict` reads a config a run already trained with (its ``config.json``)."""


def _require_useful(ok: bool, message: str) -> None:
    """A check against an option that would do nothing (or not what it says), for new configs only: a run whose
    stored config.json an earlier version accepted still samples, evaluates and resumes as it trained."""
    if not _STORED.get():
        _require(ok, message)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion_mnist"
    """A TFDS dataset name, or a path to a folder of images."""
    split: str = "train"
    batch_size: int = 1024
    """The global batch, over all devices of all processes."""
    cache: bool | None = None
    """Decode the split once into host memory, then shuffle/batch from there (the same batches). None: when the
    run reads at least the whole split and it fits in half the available memory. Reading from disk decodes
    every image every epoch: ~4.6k images/s per process here, below what an accelerator trains on."""
    image_size: int = 28
    channels: int = 1
    random_flip: bool = True
    data_dir: str | None = None
    """TFDS data dir; None means $TFDS_DATA_DIR or ~/tensorflow_datasets."""
    manual_dir: str | None = None
    """Where archives are taken from instead of downloading; None: <data_dir>/downloads/manual."""
    num_workers: int = 0
    """Grain worker processes (0: in the main process)."""
    prefetch: int = 2

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, f"data.batch_size must be positive, got {self.batch_size}")
        _require(self.image_size > 0, f"data.image_size must be positive, got {self.image_size}")
        _require(self.channels in (1, 3), f"data.channels must be 1 or 3, got {self.channels}")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _require(self.prefetch >= 0, f"data.prefetch must be >= 0, got {self.prefetch}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    dim: int = 64
    init_dim: int | None = None
    out_dim: int | None = None
    dim_mults: tuple[int, ...] = (1, 2, 4)
    resnet_block_groups: int = 8
    attn_heads: int = 4
    attn_dim_head: int = 32
    downsample: Downsample = "conv"
    random_fourier_features: bool = False
    learned_sinusoidal_cond: bool = False
    learned_sinusoidal_dim: int = 16
    dropout: float = 0.0
    num_classes: int | None = None
    """Class-conditional model when set (labels 0..num_classes-1; num_classes is the null class)."""

    def __post_init__(self) -> None:
        _require(self.dim > 0, f"model.dim must be positive, got {self.dim}")
        _require(self.dim >= 4 or self.random_fourier_features or self.learned_sinusoidal_cond,
                 f"model.dim must be at least 4 for the sinusoidal time embedding (two frequencies), got {self.dim}")
        for name in ("init_dim", "out_dim"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"model.{name} must be positive or None, got {value}")
        for name in ("resnet_block_groups", "attn_heads", "attn_dim_head"):
            _require(getattr(self, name) > 0, f"model.{name} must be positive, got {getattr(self, name)}")
        _require(len(self.dim_mults) > 0 and all(m > 0 for m in self.dim_mults),
                 f"model.dim_mults must be positive integers, got {self.dim_mults}")
        _require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        _require(self.num_classes is None or self.num_classes > 0,
                 f"model.num_classes must be positive or None, got {self.num_classes}")


@dataclasses.dataclass(frozen=True)
class DDPMConfig:
    beta_schedule: BetaSchedule = "linear"
    timesteps: int = 1000
    objective: Objective = "pred_noise"
    pred_x0: bool = False
    """The seed's switch; True is the same as objective='pred_x0'."""
    self_condition: bool = False
    p2_loss_weight_gamma: float = 0.0
    """P2 weighting (Choi et al. 2022): 0 is uniform, 1 is recommended."""
    p2_loss_weight_k: float = 1.0
    min_snr_gamma: float | None = None
    """Min-SNR-gamma weighting (Hang et al. 2023), e.g. 5.0; None disables it."""
    offset_noise_strength: float = 0.0

    def __post_init__(self) -> None:
        _require(self.timesteps > 0, f"ddpm.timesteps must be positive, got {self.timesteps}")
        _require(self.beta_schedule != "linear" or self.timesteps >= 21,
                 f"ddpm.timesteps={self.timesteps} is too small for the linear schedule (betas 1e-4..20/T); use >= 21")
        _require(self.p2_loss_weight_gamma >= 0, "ddpm.p2_loss_weight_gamma must be >= 0")
        _require(self.p2_loss_weight_k > 0, "ddpm.p2_loss_weight_k must be > 0")
        _require(self.min_snr_gamma is None or self.min_snr_gamma > 0, "ddpm.min_snr_gamma must be > 0")
        _require(self.offset_noise_strength >= 0, "ddpm.offset_noise_strength must be >= 0")
        _require(not (self.pred_x0 and self.objective not in ("pred_noise", "pred_x0")),
                 "ddpm.pred_x0=True contradicts ddpm.objective; set only ddpm.objective")

    @property
    def resolved_objective(self) -> Objective:
        return "pred_x0" if self.pred_x0 else self.objective


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    num_train_steps: int = 12_000
    log_every_steps: int = 100
    loss_type: LossType = "l1"
    half_precision: bool = False
    """bf16 compute with float32 master weights."""
    save_and_sample_every: int = 1000
    num_sample: int = 64
    max_to_keep: int = 3
    cond_drop_prob: float = 0.1
    """Label dropout for classifier-free guidance (class-conditional models only)."""
    eval_every: int = 0
    """Compute the offline quality metric every N steps (0: off)."""
    eval_num: int = 1000
    grad_accum_steps: int = 1
    """Split each device's share of the batch into this many micro-batches, run one after another, and
    average their gradients: the same update as one pass over the batch, with about 1/N of the memory."""

    def __post_init__(self) -> None:
        _require(self.num_train_steps > 0, f"training.num_train_steps must be positive, got {self.num_train_steps}")
        _require(self.log_every_steps > 0, "training.log_every_steps must be positive")
        _require(self.save_and_sample_every > 0, "training.save_and_sample_every must be positive")
        _require(self.num_sample >= 0, "training.num_sample must be >= 0")
        _require(self.max_to_keep > 0, "training.max_to_keep must be positive")
        _require(0.0 <= self.cond_drop_prob < 1.0, "training.cond_drop_prob must be in [0, 1)")
        _require(self.eval_every >= 0, "training.eval_every must be >= 0")
        _require(self.eval_num >= 2, f"training.eval_num must be >= 2 (FID needs a covariance), got {self.eval_num}")
        _require(self.grad_accum_steps > 0, f"training.grad_accum_steps must be positive, got {self.grad_accum_steps}")


@dataclasses.dataclass(frozen=True)
class EMAConfig:
    beta: float = 0.995
    update_every: int = 10
    update_after_step: int = 100
    inv_gamma: float = 1.0
    power: float = 2 / 3
    min_value: float = 0.0

    def __post_init__(self) -> None:
        _require(0.0 <= self.beta < 1.0, f"ema.beta must be in [0, 1), got {self.beta}")
        _require(self.update_every > 0, "ema.update_every must be positive")
        _require(self.update_after_step >= 0, "ema.update_after_step must be >= 0")
        _require(self.inv_gamma > 0, "ema.inv_gamma must be > 0")
        _require(self.power > 0, f"ema.power must be > 0, got {self.power}")
        _require(0.0 <= self.min_value <= self.beta, f"ema.min_value must be in [0, ema.beta], got {self.min_value}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    optimizer: Literal["Adam", "AdamW"] = "Adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    cosine_decay: bool = False
    """Cosine-decay the learning rate to 0 over training (after the warm-up)."""
    grad_clip: float | None = None
    """Clip gradients by global norm."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        _require(0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0, "optim.beta1/beta2 must be in [0, 1)")
        _require(self.eps > 0, "optim.eps must be positive")
        _require(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _require(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip must be positive or None")
        _require_useful(self.optimizer != "AdamW" or self.weight_decay > 0,
                 "optim.optimizer=AdamW with optim.weight_decay=0 is Adam; set optim.weight_decay (e.g. 1e-4), or "
                        "optim.optimizer=Adam (the same updates)")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How sample grids during training are drawn, and ``ddpm-eqx sample``'s defaults for the run: its
    ``--sampler``/``--steps``/``--eta`` replace the first three together, ``--guidance`` the guidance
    (``eval`` has its own defaults: DDIM-100, eta 0, guidance 1)."""

    sampler: Literal["ddpm", "ddim"] = "ddpm"
    steps: int | None = None
    """DDIM steps (None: all T)."""
    eta: float = 0.0
    guidance: float = 1.0
    """Classifier-free guidance scale for class-conditional models (1: plain conditional)."""

    def __post_init__(self) -> None:
        _require(self.steps is None or self.steps > 0, f"sampling.steps must be positive, got {self.steps}")
        _require(0 <= self.eta <= 1, f"sampling.eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM's noise), got {self.eta}")
        _require(self.guidance >= 0, f"sampling.guidance must be >= 0, got {self.guidance}")
        if self.sampler == "ddpm":  # options the grids' sampler would ignore: an error, not a silent no-op
            _require_useful(self.steps is None, f"sampling.steps={self.steps} needs sampling.sampler=ddim (DDPM runs all "
                                         "ddpm.timesteps steps)")
            _require_useful(self.eta == 0, f"sampling.eta={self.eta} needs sampling.sampler=ddim (DDPM's noise is eta 1)")


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    mode: WandbMode = "disabled"
    entity: str | None = None
    project: str = "ddpm-eqx"
    job_type: str = "training"
    name: str | None = None
    log_train: bool = True
    log_sample: bool = True
    log_model: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    ddpm: DDPMConfig = DDPMConfig()
    training: TrainingConfig = TrainingConfig()
    ema: EMAConfig = EMAConfig()
    optim: OptimConfig = OptimConfig()
    sampling: SamplingConfig = SamplingConfig()
    wandb: WandbConfig = WandbConfig()
    seed: int = 42

    def __post_init__(self) -> None:
        _require(self.sampling.steps is None or self.sampling.steps <= self.ddpm.timesteps,
                 f"sampling.steps={self.sampling.steps} exceeds ddpm.timesteps={self.ddpm.timesteps}")
        _require_useful(0 <= self.seed < 2**32, f"seed must be in 0..2^32-1 (a JAX key's 32 bits), got {self.seed}")
        _require_useful(self.sampling.guidance == 1 or self.model.num_classes is not None,
                 f"sampling.guidance={self.sampling.guidance} needs a class-conditional model (model.num_classes)")
        _require_useful(self.sampling.guidance == 1 or self.training.cond_drop_prob > 0,
                 f"sampling.guidance={self.sampling.guidance} needs training.cond_drop_prob > 0 (guidance mixes in "
                 "the unconditional prediction, learnt from the dropped labels)")
        _require(self.model.out_dim in (None, self.data.channels),
                 f"model.out_dim={self.model.out_dim} must equal data.channels={self.data.channels} (the model "
                 "predicts noise, x0 or v of the image's shape); leave it unset")


# --- overrides and JSON -------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_value(text: str, annotation: Any, key: str) -> Any:
    """Parse ``text`` as a value of type ``annotation`` (the dataclass field's type)."""
    origin = get_origin(annotation)
    if origin is Literal:
        choices = get_args(annotation)
        if text not in choices:
            raise ConfigError(f"{key}={text!r} is not one of {', '.join(map(str, choices))}")
        return text
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return _parse_value(text, args[0], key)
    if origin is tuple:
        items = [s for s in text.strip("()[] ").split(",") if s.strip()]
        return tuple(_parse_value(s.strip(), get_args(annotation)[0], key) for s in items)
    try:
        if annotation is bool:
            low = text.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if annotation is int:
            return int(text.replace("_", ""))
        if annotation is float:
            return float(text)
        if annotation is str:
            return text
    except ValueError:
        raise ConfigError(f"{key}={text!r} is not a valid {annotation.__name__}") from None
    raise ConfigError(f"{key}: cannot parse values of type {annotation}")


def valid_keys(config: Config) -> list[str]:
    keys = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(value)]
        else:
            keys.append(f.name)
    return keys


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``section.field=value`` overrides, each parsed against the field's annotation.

    All overrides are applied together, so checks across sections see the final values.
    """
    changes: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value, e.g. optim.lr=2e-4")
        key, text = (part.strip() for part in item.split("=", 1))
        if key not in valid_keys(config):
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys(config))}")
        if "." in key:
            section_name, field_name = key.split(".", 1)
            annotation = _field_types(type(getattr(config, section_name)))[field_name]
            changes.setdefault(section_name, {})[field_name] = _parse_value(text, annotation, key)
        else:
            top[key] = _parse_value(text, _field_types(Config)[key], key)
    sections = {name: dataclasses.replace(getattr(config, name), **kw) for name, kw in changes.items()}
    return dataclasses.replace(config, **sections, **top)


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


RESUMABLE_KEYS = {"training.num_train_steps", "training.log_every_steps", "training.save_and_sample_every",
                  "training.num_sample", "training.max_to_keep", "training.eval_every", "data.num_workers",
                  "data.prefetch", "data.data_dir", "data.manual_dir", "data.cache", "training.grad_accum_steps"}
"""Keys that may change between a run and its continuation without it being a different run."""


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What makes ``new`` (``to_dict``'s form) another run than ``old`` (a stored config as JSON reads it), as
    ``"optim.lr: 0.001 -> 0.0005"``: not the :data:`RESUMABLE_KEYS`, W&B, nor ``sampling.*`` and
    ``training.eval_num`` unless ``training.eval_every`` scores samples with them. A key ``old`` lacks was
    written by a version without that option, which behaved as its default."""

    def as_read(value: object) -> object:  # JSON reads tuples back as lists
        return list(value) if isinstance(value, tuple) else value

    defaults, diffs = to_dict(Config()), []
    # sampling.* draws the grids (another sampler on resume is fine) and training.eval_every's samples (whose
    # scores along the run compare only under one sampler, and one training.eval_num).
    evaluated = bool(new["training"].get("eval_every") or old.get("training", {}).get("eval_every"))
    for section, values in new.items():
        if section == "wandb":  # logging only: never makes a different run
            continue
        if isinstance(values, dict):
            for k, v in values.items():
                before = old.get(section, {}).get(k, as_read(defaults[section][k]))
                if as_read(v) == before:
                    continue
                if section == "sampling" and evaluated:  # the grids' sampler, and the evaluation rows'
                    diffs.append(f"{section}.{k}: {before!r} -> {v!r} (the sampler of training.eval_every's scores)")
                elif f"{section}.{k}" == "training.eval_num":  # what the evaluation rows score: only with them
                    if evaluated:
                        diffs.append(f"{section}.{k}: {before!r} -> {v!r} (the sample count of training.eval_every's "
                                     "scores)")
                elif section != "sampling" and f"{section}.{k}" not in RESUMABLE_KEYS:
                    diffs.append(f"{section}.{k}: {before!r} -> {v!r}")
                elif k == "num_train_steps" and new["optim"].get("cosine_decay"):
                    # The cosine schedule is stretched over the run's length: another length changes the lr.
                    diffs.append(f"{section}.{k}: {before!r} -> {v!r} (re-stretches optim.cosine_decay's lr)")
        elif (before := old.get(section, defaults[section])) != values:
            diffs.append(f"{section}: {before!r} -> {values!r}")
    return diffs


def trained_config_dict(run: Path, steps: typing.Iterable[int] | None = None) -> dict[str, Any] | None:
    """The config the newest of ``steps`` (default: every checkpoint of the run folder ``run``) was trained with,
    from its ``meta`` (Orbax's JSON item, read as the file it is: no JAX needed); None where none has a readable
    one. It, not ``config.json``, is what a checkpoint was trained with: a later ``--force`` start (or one
    killed before it saved) rewrites ``config.json``."""
    folder = run / "checkpoints"
    if steps is None:
        steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    for step in sorted(steps, reverse=True):
        try:
            config = json.loads((folder / str(step) / "meta" / "metadata").read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(config, dict):
            return config
    return None


def from_dict(data: dict[str, Any]) -> Config:
    """Inverse of ``to_dict``; unknown keys are an error (a config from another version). A stored config is
    held to the checks against values that would fail, not to those against options that would do nothing,
    which a run of an earlier version may have trained with."""
    token = _STORED.set(True)
    try:
        return _from_dict(data)
    finally:
        _STORED.reset(token)


def _from_dict(data: dict[str, Any]) -> Config:
    sections = {}
    hints = _field_types(Config)
    for name, value in data.items():
        if name not in hints:
            raise ConfigError(f"unknown config section {name!r}")
        if isinstance(value, dict):
            cls = hints[name]
            field_hints = _field_types(cls)
            kwargs = {}
            for k, v in value.items():
                if k not in field_hints:
                    raise ConfigError(f"unknown config key {name}.{k}")
                kwargs[k] = tuple(v) if isinstance(v, list) else v
            sections[name] = cls(**kwargs)
        else:
            sections[name] = value
    return Config(**sections)


_NOT_TRACED = {
    "data": ("dataset", "split", "cache", "data_dir", "manual_dir", "num_workers", "prefetch", "random_flip"),
    "training": ("log_every_steps", "save_and_sample_every", "num_sample", "max_to_keep", "eval_every", "eval_num"),
}


def program_json(config: Config) -> str:
    """``config`` as JSON less what never reaches a traced program (the train step, the samplers): where the data
    comes from and how it is loaded (flips included), logging, checkpoint and evaluation cadence, W&B, the grids'
    ``sampling.*`` (a sampler's own options are keyed apart), and ``training.num_train_steps`` unless a cosine
    schedule is stretched over it. The trace cache's key: a run extended, or logged differently, reads its stored
    programs instead of tracing them again (``tests/test_trace_cache.py`` lowers both and compares)."""
    data = to_dict(config)
    for section, keys in _NOT_TRACED.items():
        for key in keys:
            del data[section][key]
    del data["wandb"], data["sampling"]
    if not config.optim.cosine_decay:
        del data["training"]["num_train_steps"]
    return json.dumps(data, sort_keys=True)


def to_json(config: Config) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)


def from_json(text: str) -> Config:
    return from_dict(json.loads(text))


def load_config_file(path: str | Path) -> Config:
    """Import a config file and call its ``get_config()``; or read a run's ``config.json``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; pass --config {path / 'config.json'} (a run's "
                          f"config) or --workdir {path} (continue that run)")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass --config configs/<name>.py")
    if path.suffix == ".json":
        try:
            return from_json(path.read_text())
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{path} is not a ddpm-eqx run's config.json ({detail})") from None
    if path.suffix != ".py":
        raise ConfigError(f"config file {str(path)!r} is neither a .py with get_config() nor a run's config.json")
    spec = importlib.util.spec_from_file_location(f"_ddpm_eqx_config_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {str(path)} has no get_config() function")
        config = module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001  (a user's file: a syntax error, a failed import, a bad value)
        raise ConfigError(f"{_where_in(e, path)}: {type(e).__name__}: {first_line(e) or 'no message'}") from None
    if not isinstance(config, Config):
        raise ConfigError(f"{path}: get_config() must return ddpm_eqx.config.Config, got {type(config).__name__}")
    return config


def _where_in(err: BaseException, path: Path) -> str:
    """``path:line`` of the innermost frame of ``err`` in ``path`` (a syntax error's own line), else ``path``."""
    line = err.lineno if isinstance(err, SyntaxError) and err.filename == str(path) else None
    for frame in traceback.extract_tb(err.__traceback__):
        if frame.filename == str(path):
            line = frame.lineno
    return f"{path}:{line}" if line else str(path)
