"""jaxtyping aliases shared by the package: shapes are part of the API."""

from typing import TypeAlias

import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, Key as KeyDtype, PRNGKeyArray, Shaped, UInt32

Image: TypeAlias = Float[Array, "c h w"]
"""One image, channels first, values nominally in [-1, 1]."""
Images: TypeAlias = Float[Array, "b c h w"]
ImageLike: TypeAlias = Float[Array | np.ndarray, "c h w"]
"""An image as a caller may pass it: also a NumPy array."""
HostOrDeviceImages: TypeAlias = Float[np.ndarray | Array, "b c h w"]
"""A batch of images on the host or a device (``sample``'s output), as the image writers and scorers read it."""
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
KeysLike: TypeAlias = KeyDtype[Array, " b"] | UInt32[Array, " b 2"]
"""A batch of keys as a caller may pass them: also the older ``uint32[b, 2]`` ones (``jax.random.PRNGKey``)."""
HostImages: TypeAlias = Shaped[np.ndarray, "b h w c"]
"""A host-side batch in the data pipeline's layout (uint8 or float32)."""

__all__ = ["Array", "Image", "Images", "ImageLike", "HostOrDeviceImages", "Timestep", "Timesteps", "Label", "LabelLike",
           "Scalar", "Key", "Keys", "KeysLike", "HostImages"]
