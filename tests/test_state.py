"""EMA semantics (ema-pytorch, as the seed) and the optimizer options."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_eqx.config import EMAConfig, OptimConfig
from ddpm_eqx.state import ema_decay, ema_update, learning_rate_schedule, make_optimizer


class ReferenceEMA:
    """lucidrains/ema-pytorch's ``EMA.update`` and ``get_current_decay``, transcribed line by line onto a
    scalar "model": the counter is read before it is incremented to decide whether to update or copy, and
    after it (inside ``get_current_decay``) for the warm-up."""

    def __init__(self, cfg: EMAConfig):
        self.cfg, self.step, self.initted, self.ema = cfg, 0, False, None

    def get_current_decay(self) -> float:
        epoch = max(self.step - self.cfg.update_after_step - 1, 0.0)
        value = 1 - (1 + epoch / self.cfg.inv_gamma) ** -self.cfg.power
        if epoch <= 0:
            return 0.0
        return min(max(value, self.cfg.min_value), self.cfg.beta)

    def update(self, model: float) -> None:
        step = self.step
        self.step += 1
        if step % self.cfg.update_every != 0:
            return
        if step <= self.cfg.update_after_step:
            self.ema = model  # copy_params_from_model_to_ema
            return
        if not self.initted:
            self.ema, self.initted = model, True
        decay = self.get_current_decay()
        self.ema = self.ema + (model - self.ema) * (1 - decay)  # lerp_(model, 1 - decay)


@pytest.mark.parametrize("cfg", [EMAConfig(), EMAConfig(beta=0.9999, update_every=1, update_after_step=5, power=0.75)])
def test_ema_decay_matches_reference(cfg):
    """The EMA of a model whose single weight is the step number, updated after every optimizer step as
    ema-pytorch is, equals ema-pytorch's at every step (copy, skipped steps, warm-up, the beta cap)."""
    reference, ema = ReferenceEMA(cfg), jnp.zeros((), jnp.float32)
    update = jax.jit(lambda ema, model, step: ema_update(cfg, ema, model, step))
    for step in range(1, 1_301):  # the optimizer's step-th update; state.step counts the ones before it
        model = jnp.float32(step) ** 1.5
        reference.update(float(model))
        ema = update(ema, model, jnp.int32(step - 1))
        assert float(ema) == pytest.approx(reference.ema, rel=2e-6), f"{step=}"
    for step in (12_000, 10**6):  # far out: the decay reaches cfg.beta
        reference.step = step
        expected = 1.0 if step % cfg.update_every else reference.get_current_decay()
        assert float(ema_decay(cfg, jnp.int32(step))) == pytest.approx(expected, rel=1e-6)


def test_ema_update_copies_keeps_and_mixes_exactly():
    cfg = EMAConfig(beta=0.5, update_every=2, update_after_step=2, inv_gamma=1e-9, power=1.0)
    ema, model = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 6.0])}
    np.testing.assert_array_equal(ema_update(cfg, ema, model, jnp.int32(2))["w"], model["w"])  # copy
    np.testing.assert_array_equal(ema_update(cfg, ema, model, jnp.int32(3))["w"], ema["w"])  # off-step
    np.testing.assert_allclose(ema_update(cfg, ema, model, jnp.int32(10))["w"], [2.0, 4.0])  # beta 0.5


def test_warmup_cosine_schedule():
    sched = learning_rate_schedule(OptimConfig(lr=1e-3, warmup_steps=10, cosine_decay=True), 110)
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(60)) == pytest.approx(0.5e-3, rel=1e-4) and float(sched(110)) == pytest.approx(0.0, abs=1e-9)
    assert float(learning_rate_schedule(OptimConfig(lr=2e-4), 100)(57)) == pytest.approx(2e-4)
    # Without a warm-up the first update takes the full lr (it was a 1-step warm-up from 0: a lost update).
    sched = learning_rate_schedule(OptimConfig(lr=1e-3, cosine_decay=True), 100)
    assert float(sched(0)) == pytest.approx(1e-3) and float(sched(50)) == pytest.approx(0.5e-3, rel=1e-4)
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-9)


def test_grad_clip_and_weight_decay_are_applied():
    params = {"w": jnp.ones(4)}
    grads = {"w": jnp.full(4, 100.0)}
    clipped = make_optimizer(OptimConfig(lr=1.0, grad_clip=1.0, beta1=0.0, beta2=0.0, eps=1e-30), 10)
    updates, _ = clipped.update(grads, clipped.init(params), params)
    # Adam with beta1 = beta2 = 0 is sign descent: lr * g / |g|, independent of clipping ...
    np.testing.assert_allclose(updates["w"], -1.0, rtol=1e-5)
    plain = optax.chain(optax.clip_by_global_norm(1.0))
    np.testing.assert_allclose(optax.global_norm(plain.update(grads, plain.init(params))[0]), 1.0, rtol=1e-6)
    decayed = make_optimizer(OptimConfig(lr=0.1, weight_decay=0.5), 10)
    updates, _ = decayed.update({"w": jnp.zeros(4)}, decayed.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5, rtol=1e-6)  # decoupled decay only


def test_frozen_fourier_features_are_not_trained_even_with_weight_decay():
    import equinox as eqx

    from ddpm_eqx.config import Config, apply_overrides
    from ddpm_eqx.state import init_state, trainable
    from ddpm_eqx.train import build_model

    cfg = apply_overrides(Config(), ["model.dim=8", "model.dim_mults=1,2", "model.resnet_block_groups=4",
                                     "data.image_size=8", "model.random_fourier_features=true"])
    model = build_model(cfg)
    spec = trainable(model)
    params = eqx.filter(model, spec)
    frozen = model.time_embedding.fourier.weights
    leaves = jax.tree_util.tree_leaves(params)
    all_float = [x for x in jax.tree_util.tree_leaves(model) if eqx.is_inexact_array(x)]
    assert len(leaves) == len(all_float) - 1  # exactly the Fourier weights are left out
    optimizer = make_optimizer(OptimConfig(lr=0.1, weight_decay=0.5), 10)
    state = init_state(model, optimizer)
    # The EMA is an equal copy with buffers of its own (the train step donates both).
    model_leaves, ema_leaves = (jax.tree_util.tree_leaves(eqx.filter(m, eqx.is_array)) for m in (model, state.ema_model))
    assert all(np.array_equal(a, b) for a, b in zip(model_leaves, ema_leaves))
    assert not {a.unsafe_buffer_pointer() for a in model_leaves} & {b.unsafe_buffer_pointer() for b in ema_leaves}
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = optimizer.update(grads, state.opt_state, params)
    new = eqx.apply_updates(model, updates)
    assert np.array_equal(new.time_embedding.fourier.weights, frozen)
    assert not np.array_equal(new.final_conv.weight, model.final_conv.weight)


@pytest.mark.parametrize("clip, decay", [(None, 0.0), (None, 0.01), (0.5, 0.0), (0.5, 0.01)])
def test_make_optimizer_is_optax_adam_or_adamw_bitwise(clip, decay):
    """Spelled out for a state layout that does not depend on the options, the same updates as before."""
    cfg = OptimConfig(lr=1e-3, grad_clip=clip, weight_decay=decay, warmup_steps=3)
    lr = learning_rate_schedule(cfg, 10)
    reference = (optax.adamw(lr, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps, weight_decay=decay) if decay
                 else optax.adam(lr, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps))
    if clip is not None:
        reference = optax.chain(optax.clip_by_global_norm(clip), reference)
    ours = make_optimizer(cfg, 10)
    params = {"w": jnp.linspace(-1.0, 1.0, 6), "b": jnp.ones(2)}
    states = [ours.init(params), reference.init(params)]
    for i in range(4):
        grads = jax.tree_util.tree_map(lambda p: jnp.sin(p * (i + 3.0)), params)
        (u1, states[0]), (u2, states[1]) = ours.update(grads, states[0], params), reference.update(grads, states[1], params)
        jax.tree_util.tree_map(np.testing.assert_array_equal, u1, u2)
        params = optax.apply_updates(params, u1)


def test_the_optimizer_state_layout_is_the_same_whatever_the_options():
    """So a run resumes with clipping, weight decay or a schedule switched on (what a non-finite loss advises)."""
    params = {"w": jnp.ones(3)}
    layouts = {jax.tree_util.tree_structure(make_optimizer(OptimConfig(**kw), 100).init(params))
               for kw in ({}, {"grad_clip": 1.0}, {"weight_decay": 0.1}, {"optimizer": "AdamW", "weight_decay": 1e-4},
                          {"warmup_steps": 10, "cosine_decay": True}, {"cosine_decay": True})}
    assert len(layouts) == 1
