"""Sampling a model over all devices: the keys are split over the mesh, the weights replicated."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ddpm_eqx._types import Keys
from ddpm_eqx.diffusion import GaussianDiffusion
from ddpm_eqx.parallel import AXIS, P, batch_sharded, gather, replicate
from ddpm_eqx.sample import Sampler, sample


class ShardedSampler:
    """``sampler(model, keys, labels=None) -> numpy [n, c, h, w]``, one image per key.

    Compiled once per (model structure, batch size): the weights are an argument, not constants,
    so the EMA weights of every step reuse the same program.
    """

    def __init__(
        self,
        process: GaussianDiffusion,
        model_like: Any,
        shape: tuple[int, int, int],
        mesh: Mesh,
        *,
        sampler: Sampler = "ddpm",
        steps: int | None = None,
        eta: float = 0.0,
        guidance: float = 1.0,
        conditional: bool = False,
        return_path: bool = False,
    ):
        self.mesh, self.conditional, self.return_path = mesh, conditional, return_path
        self.process = replicate(process, mesh)
        static = eqx.partition(model_like, eqx.is_array)[1]
        proc_static = eqx.partition(process, eqx.is_array)[1]

        def per_shard(arrays: Any, proc_arrays: Any, keys: Keys, labels: Int[Array, " b"] | None) -> Any:
            return sample(
                eqx.combine(proc_arrays, proc_static), eqx.combine(arrays, static), keys, shape,
                sampler=sampler, steps=steps, eta=eta, labels=labels, guidance=guidance, return_path=return_path,
            )

        out_specs = (P(AXIS), P(AXIS)) if return_path else P(AXIS)
        label_spec = P(AXIS) if conditional else None
        self._fn = jax.jit(batch_sharded(per_shard, mesh, (P(), P(), P(AXIS), label_spec), out_specs))

    def __call__(
        self, model: Any, keys: Keys, labels: Int[Array, " b"] | None = None
    ) -> Float[np.ndarray, "n c h w"] | tuple[Float[np.ndarray, "n c h w"], Float[np.ndarray, "n s c h w"]]:
        n = keys.shape[0]
        out = self._fn(*self._arguments(model, keys, labels))
        if self.return_path:
            return gather(out[0])[:n], gather(out[1])[:n]
        return gather(out)[:n]

    def lower(self, model: Any, keys: Keys, labels: Int[Array, " b"] | None = None) -> jax.stages.Lowered:
        """The program ``self(model, keys, labels)`` runs, traced and lowered but not compiled or run:
        ``.compile()`` compiles it (into the persistent cache, where one is set) and ``.as_text()`` shows it."""
        return self._fn.lower(*self._arguments(model, keys, labels))

    def _arguments(self, model: Any, keys: Keys, labels: Int[Array, " b"] | None) -> tuple[Any, ...]:
        if self.conditional and labels is None:
            raise ValueError("this model is class-conditional: pass labels (use the null class for unconditional)")
        n, devices = keys.shape[0], self.mesh.devices.size
        pad = (-n) % devices
        if pad:  # each image depends only on its own key: padding changes nothing
            keys = jnp.concatenate([keys, jax.random.split(jax.random.key(0), pad)])
            if labels is not None:
                labels = jnp.concatenate([labels, jnp.zeros((pad,), labels.dtype)])
        arrays = eqx.filter(model, eqx.is_array)
        proc_arrays = eqx.filter(self.process, eqx.is_array)
        return arrays, proc_arrays, keys, labels if self.conditional else None
