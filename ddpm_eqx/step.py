"""The compiled train step: loss, gradient, optimizer update, EMA and metrics in one program.

Randomness is derived, never carried (VDM, big_vision): the step key is
``fold_in(key(seed), step)`` and every example gets its own key from a split over the *global*
batch, so the result does not depend on how many devices or processes share the batch, and a
resumed run draws exactly what an uninterrupted one would have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree

from ddpm_eqx._types import Image, Images, Keys, LabelLike, Timestep
from ddpm_eqx.config import Config, program_json
from ddpm_eqx.diffusion import Denoiser, GaussianDiffusion, diffusion_loss
from ddpm_eqx.layers import FourierFeatures
from ddpm_eqx.logging_utils import log
from ddpm_eqx.parallel import AXIS, P, batch_sharded, check_divisible, check_fits_in_memory
from ddpm_eqx.state import TrainState, ema_update, schedule_of, trainable
from ddpm_eqx.trace_cache import stored_program

Metrics = dict[str, Float[Array, ""]]


class HalfPrecision(eqx.Module):
    """Runs a float32 network in bfloat16 (weights as :func:`to_bfloat16`, activations); the output is float32
    again. The cast sits inside the differentiated function, so gradients reach the float32 master weights.
    """

    model: PyTree

    def __call__(self, x: Image, t: Timestep, **kwargs: Any) -> Image:
        model = to_bfloat16(self.model)
        sc = kwargs.pop("x_self_cond", None)
        sc = None if sc is None else sc.astype(jnp.bfloat16)
        return model(x.astype(jnp.bfloat16), t, x_self_cond=sc, **kwargs).astype(jnp.float32)


def to_bfloat16(model: PyTree) -> PyTree:
    """The model with its floating-point arrays in bfloat16, except the weights of Fourier time features:
    ``sin(2 pi w t)`` with ``t`` up to ~1000 turns bf16's 0.4% rounding of ``w`` into radians, features other
    than those the float32 model (the one that samples) computes."""

    def cast(leaf: Any) -> Any:
        if isinstance(leaf, FourierFeatures) or not eqx.is_inexact_array(leaf):
            return leaf
        return leaf.astype(jnp.bfloat16)

    return jax.tree_util.tree_map(cast, model, is_leaf=lambda leaf: isinstance(leaf, FourierFeatures))


def example_loss(
    process: GaussianDiffusion,
    model: Denoiser,
    x0: Image,
    label: LabelLike,
    key: PRNGKeyArray,
    use_self_cond: Bool[ArrayLike, ""],
    num_classes: int | None,
    cond_drop_prob: float,
) -> Float[Array, ""]:
    """One example's loss; class-conditional models see the null class with ``cond_drop_prob``
    (classifier-free guidance training, Ho & Salimans 2022)."""
    drop_key, key = jax.random.split(key)
    maybe_label = None
    if num_classes is not None:
        drop = jax.random.bernoulli(drop_key, cond_drop_prob)
        maybe_label = jnp.where(drop, num_classes, label)
    return diffusion_loss(process, model, x0, key=key, label=maybe_label, use_self_cond=use_self_cond)


def make_train_step(
    cfg: Config, process: GaussianDiffusion, optimizer: optax.GradientTransformation, mesh: Mesh, *,
    trace_cache: Path | None = None, lr_schedule: optax.Schedule | None = None,
) -> "TrainStep":
    """Build ``train_step(state, images, labels) -> (state, metrics)``, jitted, state donated.

    ``images``/``labels`` are global arrays split over the mesh axis ``data``. ``train_step.traces``
    counts how often it was traced (the whole run must compile it once). With ``trace_cache`` (a folder;
    see :mod:`ddpm_eqx.trace_cache`) the traced program is stored there and a later process with the same
    code, environment, config and argument shapes reads it instead of tracing; only where ``cfg`` alone
    determines ``process`` and ``optimizer``, as in :func:`ddpm_eqx.train.train`.

    The step reads of ``cfg``: the seed, ``model.num_classes`` (which the model must have) with
    ``training.cond_drop_prob``, ``training.half_precision``/``grad_accum_steps``, ``ema.*`` and
    ``data.batch_size``'s split. Its metrics are ``loss``, ``grad_norm`` and ``lr``: the learning rate of
    ``lr_schedule``, else of an ``optimizer`` that :func:`ddpm_eqx.state.make_optimizer` built; without
    either, no ``lr`` (a schedule inside your own optimizer is not visible from outside).
    """
    lr_schedule = lr_schedule or schedule_of(optimizer)
    num_classes, drop_prob = cfg.model.num_classes, cfg.training.cond_drop_prob
    half = cfg.training.half_precision
    accum = cfg.training.grad_accum_steps
    check_divisible(cfg.data.batch_size, mesh, accum)
    if accum > 1 and jax.default_backend() == "cpu":
        log.warning("training.grad_accum_steps=%d on a CPU: XLA:CPU runs the convolutions of a loop body several "
                    "times slower (jax-ml/jax#12868; 2 micro-batches: 5x here); use it only if the batch does not "
                    "fit in memory otherwise", accum)
    seed = cfg.seed
    traces = [0]

    def grads_on_shard(
        params: PyTree, static: PyTree, images: Images, labels: Int[Array, " b"], keys: Keys,
        use_sc: Bool[Array, ""], process: GaussianDiffusion,
    ) -> tuple[Float[Array, ""], PyTree]:
        def mean_loss(p: PyTree, images: Images, labels: Int[Array, " m"], keys: Keys) -> Float[Array, ""]:
            model: Denoiser = eqx.combine(p, static)
            if half:
                model = HalfPrecision(model)
            losses = jax.vmap(
                lambda x, y, k: example_loss(process, model, x, y, k, use_sc, num_classes, drop_prob)
            )(images, labels, keys)
            # pmean *inside* the differentiated function: with shard_map's replication checks the
            # cotangent of the replicated params is then the mean gradient, not n times it.
            return jax.lax.pmean(jnp.mean(losses), AXIS)

        if accum == 1:
            return jax.value_and_grad(mean_loss)(params, images, labels, keys)
        # Equal micro-batches, so the mean of their mean losses (and gradients) is the batch's.
        micro = jax.tree_util.tree_map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]),
                                       (images, labels, keys))

        def add_micro_batch(total: tuple[Float[Array, ""], PyTree], batch: Any) -> tuple[Any, None]:
            loss, grads = jax.value_and_grad(mean_loss)(params, *batch)
            return jax.tree_util.tree_map(jnp.add, total, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, params))
        # A loop, so that one micro-batch's activations are freed before the next one's (unrolled, XLA:CPU
        # kept them all: no memory saved). On CPU the loop costs time: warned above.
        total, _ = jax.lax.scan(add_micro_batch, zeros, micro)
        return jax.tree_util.tree_map(lambda x: x / accum, total)

    def train_step(state: TrainState, images: Images, labels: Int[Array, " b"]) -> tuple[TrainState, Metrics]:
        traces[0] += 1
        if (has := getattr(state.model, "num_classes", num_classes)) != num_classes:
            raise ValueError(f"the model has num_classes={has}, the config model.num_classes={num_classes}: the step "
                             "would train it on other labels than its classes (None: the null class alone); build "
                             "both from one setting")
        step_key = jax.random.fold_in(jax.random.key(seed), state.step)
        example_key, sc_key = jax.random.split(step_key)
        keys = jax.random.split(example_key, images.shape[0])
        use_sc = jax.random.bernoulli(sc_key, 0.5)  # one coin per step: see diffusion_loss
        params, static = eqx.partition(state.model, trainable(state.model))
        proc_arrays, proc_static = eqx.partition(process, eqx.is_array)

        def shard_fn(params, images, labels, keys, use_sc, proc_arrays):
            return grads_on_shard(params, static, images, labels, keys, use_sc, eqx.combine(proc_arrays, proc_static))

        sharded = batch_sharded(shard_fn, mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS), P(), P()),
                                out_specs=(P(), P()))
        loss, grads = sharded(params, images, labels, keys, use_sc, proc_arrays)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        model = eqx.combine(optax.apply_updates(params, updates), static)
        ema_model = ema_update(cfg.ema, state.ema_model, model, state.step)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(state.step))
        return TrainState(state.step + 1, model, ema_model, opt_state), metrics

    return TrainStep(train_step, traces, trace_cache=trace_cache, determines=program_json(cfg))


StepFn = Callable[[TrainState, Images, Int[Array, " b"]], tuple[TrainState, Metrics]]



class TrainStep:
    """The compiled step, with ``traces``: how often JAX traced it (a run must trace it once).

    Called with the state's array leaves: one flatten and one unflatten of the state per step, where
    ``eqx.filter_jit`` partitions, flattens and combines it (the tiny config's step, where Python dispatch is
    most of it: 45-54 -> 22-27 ms on 2 host devices; on the seed's 875-array state ``eqx.filter_jit``'s own
    dispatch took ~70 ms). Non-array leaves are static, as under ``eqx.filter_jit``: a state of another
    structure or with other static leaves gets its own program.
    """

    def __init__(self, fn: StepFn, traces: list[int], *, trace_cache: Path | None = None, determines: str = ""):
        self._raw, self._traces = fn, traces
        self._fn = eqx.filter_jit(fn, donate="all")  # the same step for ``.lower()`` (tests, benchmarks)
        self._trace_cache, self._determines = trace_cache, determines
        self._program: Callable[..., tuple[list[Array], Metrics]] | None = None
        self._signature: Any = None
        self._is_array: list[bool] = []

    @property
    def traces(self) -> int:
        return self._traces[0]

    def __call__(self, state: TrainState, images: Images, labels: Int[Array, " b"]) -> tuple[TrainState, Metrics]:
        everything, treedef = jax.tree_util.tree_flatten(state)
        is_array = [eqx.is_array(x) for x in everything]
        signature = (treedef, is_array, [x for x, a in zip(everything, is_array) if not a])
        if signature != self._signature:  # the first call, or a state of another structure or static leaves
            self._signature, self._is_array, self._program = signature, is_array, None
        leaves = self._arrays(everything)
        if self._program is None:
            self._program = self._build(everything, leaves, treedef, images, labels)
            check_fits_in_memory("the train step", self._program, leaves, images, labels)
        new_leaves, metrics = self._program(leaves, images, labels)
        return jax.tree_util.tree_unflatten(treedef, self._merge(everything, new_leaves)), metrics

    def _arrays(self, everything: list[Any]) -> list[Array]:
        """The array leaves of a flattened state, in order."""
        return [x for x, a in zip(everything, self._is_array) if a]

    def _merge(self, everything: list[Any], arrays: list[Array]) -> list[Any]:
        """``everything`` with its array leaves replaced, in order, by ``arrays``."""
        new = iter(arrays)
        return [next(new) if a else x for x, a in zip(everything, self._is_array)]

    def _build(self, everything: list[Any], leaves: list[Array], treedef: Any, images: Images,
               labels: Int[Array, " b"]) -> Callable[..., tuple[list[Array], Metrics]]:
        """The step as a jitted function of the state's array leaves (what ``jax.export`` can serialise too):
        the stored program where there is a trace cache and ``jax.export`` takes it, else traced here."""

        def on_leaves(leaves: list[Array], images: Images, labels: Int[Array, " b"]) -> tuple[list[Array], Metrics]:
            state = jax.tree_util.tree_unflatten(treedef, self._merge(everything, leaves))
            new_state, metrics = self._raw(state, images, labels)
            new_everything, new_treedef = jax.tree_util.tree_flatten(new_state)
            if new_treedef != treedef:  # the caller rebuilds the state from the input's structure
                raise ValueError("the train step changed the structure of the state")
            return self._arrays(new_everything), metrics

        if self._trace_cache is not None:
            def count() -> None:
                self._traces[0] += 1

            traced_before = self._traces[0]
            # Keyed by the state's structure and static leaves too (a stored program holds them as traced): a state
            # with another dropout rate, say, read the first one's program.
            determines = f"{self._determines}\n{self._signature[0]}\n{self._signature[2]!r}"
            stored = stored_program("train step", on_leaves, (leaves, images, labels), determines=determines,
                                    directory=self._trace_cache, donate_argnums=(0,), on_trace=count)
            self._traces[0] = traced_before  # exporting traced `self._raw` once; compiles are counted by `count`
            if stored is not None:
                return stored
            self._trace_cache = None
        return jax.jit(on_leaves, donate_argnums=0)
