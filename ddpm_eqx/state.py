"""Training state (one pytree), the optimizer, and the EMA of the weights.

EMA follows ema-pytorch, as the seed does: every ``update_every`` steps; until
``update_after_step`` the EMA is a copy of the model; after it the decay warms up as
``1 - (1 + epoch / inv_gamma) ** -power`` clipped to [min_value, beta] (Karras-style warm-up
from ema-pytorch), where ``epoch`` counts steps since ``update_after_step``.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PyTree

from ddpm_eqx.config import Config, EMAConfig, OptimConfig
from ddpm_eqx.diffusion import GaussianDiffusion, make_diffusion
from ddpm_eqx.unet import UNet, make_unet


class TrainState(eqx.Module):
    """Everything a step changes: a checkpoint of this (plus the data iterator) resumes exactly."""

    step: Int[Array, ""]
    model: PyTree
    ema_model: PyTree
    opt_state: PyTree


def _frozen(node: object) -> bool:
    return isinstance(node, eqx.Module) and getattr(node, "frozen", False) is True


def _inexact(node: object) -> bool:
    if isinstance(node, jax.ShapeDtypeStruct):  # a skeleton's leaf (``train.state_skeleton``)
        return bool(jnp.issubdtype(node.dtype, jnp.inexact))
    return eqx.is_inexact_array(node)


def trainable(model: PyTree) -> PyTree:
    """Filter spec of the trained leaves: floating-point arrays (or their shapes), except inside modules with
    ``frozen=True`` (the U-Net's random Fourier features), so neither Adam nor weight decay ever touches those."""
    return jax.tree_util.tree_map(lambda node: False if _frozen(node) else _inexact(node), model, is_leaf=_frozen)


def learning_rate_schedule(cfg: OptimConfig, num_train_steps: int) -> optax.Schedule:
    """Constant (the seed), or linear warm-up then optional cosine decay to 0."""
    if cfg.cosine_decay and cfg.warmup_steps == 0:  # the first update at the full lr, not at a warm-up's 0
        return optax.cosine_decay_schedule(cfg.lr, max(num_train_steps, 1))
    if cfg.cosine_decay:
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, cfg.warmup_steps, max(num_train_steps, cfg.warmup_steps + 1), end_value=0.0
        )
    if cfg.warmup_steps > 0:
        return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.constant_schedule(cfg.lr)


def make_optimizer(cfg: OptimConfig, num_train_steps: int) -> optax.GradientTransformation:
    """Adam (the seed) or AdamW, with optional global-norm clipping before it: ``optax.adam``/``adamw``'s own
    chain, spelled out so that its state has one layout whatever the options. A run then resumes (``--force``)
    with clipping, weight decay or a schedule switched on or off (the remedy a non-finite loss suggests)."""
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip is not None else optax.identity()
    decay = cfg.optimizer == "AdamW" or cfg.weight_decay > 0
    schedule = learning_rate_schedule(cfg, num_train_steps)
    optimizer = optax.chain(
        clip,
        optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay) if decay else optax.identity(),
        optax.scale_by_learning_rate(schedule),
    )
    _SCHEDULES[optimizer.update] = schedule
    return optimizer


_SCHEDULES: weakref.WeakKeyDictionary[Callable[..., Any], optax.Schedule] = weakref.WeakKeyDictionary()


def schedule_of(optimizer: optax.GradientTransformation) -> optax.Schedule | None:
    """The learning-rate schedule of an optimizer :func:`make_optimizer` built; None for any other (optax keeps
    no record of it)."""
    return _SCHEDULES.get(optimizer.update)


def earlier_optimizers(cfg: OptimConfig, num_train_steps: int) -> list[optax.GradientTransformation]:
    """The optimizers checkpoints of ddpm-eqx before 0.2 were written with (``optax.adam``/``adamw``, clipping
    chained in front), one per combination of the options that shaped their state's tree. Their arrays are
    :func:`make_optimizer`'s, in the same order; only the tree around them differs."""
    lr = learning_rate_schedule(cfg, num_train_steps)
    adam = optax.adam(lr, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps)
    adamw = optax.adamw(lr, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    clip = optax.clip_by_global_norm(cfg.grad_clip or 1.0)
    return [adam, adamw, optax.chain(clip, adam), optax.chain(clip, adamw)]


def init_state(model: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
    # One compiled program for the optimizer's zeros and the EMA's copy: run eagerly, each distinct
    # weight shape is a compile of its own (~60 ms each on a CPU core, ~2 s for the seed's model).
    @eqx.filter_jit
    def init(model: PyTree) -> tuple[PyTree, optax.OptState]:
        # The EMA starts as a copy with buffers of its own: the train step donates the whole state, and
        # XLA refuses to donate one buffer twice.
        ema_model = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, model)
        return ema_model, optimizer.init(eqx.filter(model, trainable(model)))

    ema_model, opt_state = init(model)
    return TrainState(step=jnp.zeros((), jnp.int32), model=model, ema_model=ema_model, opt_state=opt_state)


def ema_decay(cfg: EMAConfig, step: Int[Array, ""]) -> Float[Array, ""]:
    """The weight kept of the old EMA in the update after ``step`` earlier ones (0: copy the model, 1: leave
    the EMA as it is), as lucidrains' ema-pytorch ``EMA.update`` (which denoising-diffusion-pytorch uses): an
    update every ``update_every`` steps; copies up to ``update_after_step``, and once more at the first update
    after it (ema-pytorch's ``initted`` copy); then the warm-up decay of ``epoch = step - update_after_step``
    (ema-pytorch reads its counter after counting the update), capped at ``beta``."""
    epoch = jnp.maximum(step - cfg.update_after_step, 0).astype(jnp.float32)
    warm = 1.0 - (1.0 + epoch / cfg.inv_gamma) ** -cfg.power
    decay = jnp.clip(warm, cfg.min_value, cfg.beta)
    decay = jnp.where(step <= cfg.update_after_step + cfg.update_every, 0.0, decay)
    return jnp.where(step % cfg.update_every != 0, 1.0, decay)


def ema_update(cfg: EMAConfig, ema_model: PyTree, model: PyTree, step: Int[Array, ""]) -> PyTree:
    """decay * ema + (1 - decay) * model on the floating-point leaves; exact at decay 0 and 1."""
    decay = ema_decay(cfg, step)
    ema_params, static = eqx.partition(ema_model, eqx.is_inexact_array)
    params = eqx.filter(model, eqx.is_inexact_array)
    new = jax.tree_util.tree_map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema_params, params)
    return eqx.combine(new, static)


# --- the state of a config --------------------------------------------------------------------


def build_model(cfg: Config) -> UNet:
    return make_unet(cfg.model, channels=cfg.data.channels, image_size=cfg.data.image_size,
                     self_condition=cfg.ddpm.self_condition, key=jax.random.key(cfg.seed))


def build_state(cfg: Config) -> tuple[TrainState, GaussianDiffusion, Any]:
    optimizer = make_optimizer(cfg.optim, cfg.training.num_train_steps)
    state = init_state(build_model(cfg), optimizer)
    return state, make_diffusion(cfg.ddpm, cfg.training.loss_type), optimizer


@functools.lru_cache(maxsize=8)
def state_skeleton(cfg: Config) -> TrainState:
    """``build_state(cfg)``'s state as shapes only (``jax.ShapeDtypeStruct`` leaves): what a checkpoint is
    restored into. No compile, where building the weights costs XLA:CPU one per distinct weight shape (~15 s
    for the seed's U-Net); tracing it takes ~0.7 s for the tests' tiny model, so it is kept per config (a
    ``train`` asks for it while validating the config and again to restore)."""
    return eqx.filter_eval_shape(lambda: build_state(cfg)[0])


def earlier_layouts(cfg: Config, skeleton: TrainState) -> list[tuple[TrainState, Callable[[TrainState], TrainState]]]:
    """The state's earlier layouts (:func:`ddpm_eqx.state.earlier_optimizers`) with their conversion to
    ``skeleton``'s: what ``Checkpointer.restore`` reads checkpoints of an older ddpm-eqx with."""
    params = eqx.filter(skeleton.model, trainable(skeleton.model))
    current = jax.tree_util.tree_structure(skeleton.opt_state)

    def convert(state: TrainState) -> TrainState:
        leaves = jax.tree_util.tree_leaves(state.opt_state)
        return eqx.tree_at(lambda s: s.opt_state, state, jax.tree_util.tree_unflatten(current, leaves))

    return [(eqx.tree_at(lambda s: s.opt_state, skeleton, jax.eval_shape(opt.init, params)), convert)
            for opt in earlier_optimizers(cfg.optim, cfg.training.num_train_steps)]
