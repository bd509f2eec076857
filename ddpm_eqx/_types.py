"""jaxtyping aliases shared by the package: shapes are part of the API."""

from typing import TypeAlias

import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, Key as KeyDtype, PRNGKeyArray, Shaped

Image: TypeAlias = Float[Array, "c h w"]
"""One image, channels first, values nominally in [-1, 1]."""
Images: TypeAlias = Float[Array, "b c h w"]
Timestep: TypeAlias = Int[ArrayLike, ""] | Float[ArrayLike, ""]
"""A scalar timestep: a JAX or NumPy scalar, or a Python number."""
Timesteps: TypeAlias = Int[Array, " b"]
Label: TypeAlias = Int[Array, ""]
LabelLike: TypeAlias = Int[ArrayLike, ""]
"""A class index as a caller may pass it: also a NumPy scalar or a Python int."""
Scalar: TypeAlias = Float[Array, ""]
Key: TypeAlias = PRNGKeyArray
Keys: TypeAlias = KeyDtype[Array, " b"]
"""A batch of typed PRNG keys, one per example."""
HostImages: TypeAlias = Shaped[np.ndarray, "b h w c"]
"""A host-side batch in the data pipeline's layout (uint8 or float32)."""

__all__ = ["Array", "Image", "Images", "Timestep", "Timesteps", "Label", "LabelLike", "Scalar", "Key", "Keys", "HostImages"]
