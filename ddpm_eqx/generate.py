"""Sampling a model over all devices: the keys are split over the mesh, the weights replicated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from ddpm_eqx._types import Keys
from ddpm_eqx.diffusion import GaussianDiffusion
from ddpm_eqx.parallel import AXIS, P, batch_sharded, check_fits_in_memory, gather, replicate, split_global
from ddpm_eqx.sample import Sampler, check_labels, sample
from ddpm_eqx.trace_cache import stored_program


class ShardedSampler:
    """``sampler(model, keys, labels=None) -> numpy [n, c, h, w]``, one image per key.

    Compiled once per (model structure, batch size): the weights are an argument, not constants,
    so the EMA weights of every step reuse the same program. With ``trace_cache`` (a folder; see
    :mod:`ddpm_eqx.trace_cache`) the traced program is stored there and read by a later process instead of
    tracing it again; ``determines`` must then say what built ``process`` and ``model_like`` (the config as
    JSON): the key adds this sampler's own arguments, the shapes and the source, not the objects themselves.
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
        trace_cache: Path | None = None,
        determines: str = "",
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
        self._raw = batch_sharded(per_shard, mesh, (P(), P(), P(AXIS), label_spec), out_specs)
        self._fn = jax.jit(self._raw)
        self._trace_cache = trace_cache
        self._determines = json.dumps({"determines": determines, "shape": shape, "sampler": sampler, "steps": steps,
                                       "eta": eta, "guidance": guidance, "conditional": conditional,
                                       "return_path": return_path})
        self._stored: dict[Any, Callable[..., Any]] = {}
        self._checked: set[Any] = set()  # argument signatures of ``_fn`` whose memory check passed

    def __call__(
        self, model: Any, keys: Keys, labels: Int[Array, " b"] | None = None
    ) -> Float[np.ndarray, "n c h w"] | tuple[Float[np.ndarray, "n c h w"], Float[np.ndarray, "n s c h w"]]:
        n = keys.shape[0]
        out = self._run(*self._arguments(model, keys, labels))
        if self.return_path:
            return gather(out[0])[:n], gather(out[1])[:n]
        return gather(out)[:n]

    def lower(self, model: Any, keys: Keys, labels: Int[Array, " b"] | None = None) -> jax.stages.Lowered:
        """The program ``self(model, keys, labels)`` runs, traced and lowered but not compiled or run:
        ``.compile()`` compiles it (into the persistent cache, where one is set) and ``.as_text()`` shows it."""
        return self._fn.lower(*self._arguments(model, keys, labels))

    def _run(self, *args: Any) -> Any:
        if self._trace_cache is None:
            self._check_memory(args)
            return self._fn(*args)
        # The stored program takes each input where its spec puts it (jit would move an uncommitted key array
        # itself; an exported program is called with the shardings it was exported with).
        arrays, proc_arrays, keys, labels = args
        args = (replicate(arrays, self.mesh), proc_arrays, split_global(keys, self.mesh),
                None if labels is None else split_global(labels, self.mesh))
        leaves, treedef = jax.tree_util.tree_flatten(args)  # jax.export takes lists, not modules
        signature = (treedef, tuple((x.shape, x.dtype, x.sharding) for x in leaves))
        program = self._stored.get(signature)
        if program is None:
            def on_leaves(leaves: list[Array]) -> Any:
                return self._raw(*jax.tree_util.tree_unflatten(treedef, leaves))

            program = stored_program("sampler", on_leaves, (leaves,), determines=self._determines,
                                     directory=self._trace_cache)
            if program is None:
                self._trace_cache = None
                return self._run(*args)
            check_fits_in_memory("the sampler", program, leaves)  # once per program, as it is built
            self._stored[signature] = program
        return program(leaves)

    def _check_memory(self, args: tuple[Any, ...]) -> None:
        """:func:`check_fits_in_memory` of ``_fn`` (the program without stored traces) once per shape of ``args``."""
        leaves, treedef = jax.tree_util.tree_flatten(args)
        signature = (treedef, tuple((x.shape, x.dtype) for x in leaves))
        if signature not in self._checked:
            check_fits_in_memory("the sampler", self._fn, *args)
            self._checked.add(signature)

    def _arguments(self, model: Any, keys: Keys, labels: Int[Array, " b"] | None) -> tuple[Any, ...]:
        if self.conditional and labels is None:
            raise ValueError("this model is class-conditional: pass labels (use the null class for unconditional)")
        if labels is not None and not self.conditional:  # they were dropped: every image the null class's
            raise ValueError("labels given to a sampler built with conditional=False; build it with conditional=True")
        check_labels(model, labels, null_class=True)  # inside shard_map they are traced: checked here
        n, devices = keys.shape[0], self.mesh.devices.size
        pad = (-n) % devices
        if pad:  # each image depends only on its own key: padding changes nothing
            keys = jnp.concatenate([keys, jax.random.split(jax.random.key(0), pad)])
            if labels is not None:
                labels = jnp.concatenate([labels, jnp.zeros((pad,), labels.dtype)])
        arrays = eqx.filter(model, eqx.is_array)
        proc_arrays = eqx.filter(self.process, eqx.is_array)
        return arrays, proc_arrays, keys, labels
