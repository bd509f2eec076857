"""What wrote a checkpoint: the library versions and devices, kept in its metadata and compared on resume.

A resumed run is bitwise the uninterrupted one (see ``train``) only on the same software and device
split: XLA's kernels and the order of its reductions change between jax releases, Grain's shuffle and
Orbax's formats between theirs, and the mean gradient is summed in another order over another number
of devices. Resuming elsewhere still works; it is logged, so that a run that stops reproducing has the
reason next to it.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any, Mapping

import jax

# The distributions whose version can change a run's numbers or its files.
PACKAGES = ("ddpm-eqx", "jax", "jaxlib", "equinox", "optax", "orbax-checkpoint", "grain", "numpy")


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def describe() -> dict[str, Any]:
    """This process's environment as JSON-able values (the device count is global, over all processes)."""
    devices = jax.devices()
    return {
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "processes": jax.process_count(),
    }


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What changed, as ``"jax 0.10.2 -> 0.10.3"``; what ``recorded`` lacks (an older checkpoint) is skipped."""
    changes = []
    for key, value in recorded.items():
        if key == "packages":
            now = current.get("packages", {})
            changes += [f"{name} {was or 'absent'} -> {now.get(name) or 'absent'}"
                        for name, was in value.items() if now.get(name) != was]
        elif key in current and current[key] != value:
            changes.append(f"{key} {value} -> {current[key]}")
    return changes


__all__ = ["PACKAGES", "describe", "differences"]
