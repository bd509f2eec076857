"""Image grids (PNG) and denoising trajectories (GIF/PNG) from model-layout arrays."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from jaxtyping import Array, Float, UInt8
from PIL import Image as PILImage

from ddpm_eqx._types import HostOrDeviceImages


def to_uint8(images: HostOrDeviceImages) -> UInt8[np.ndarray, "b h w c"]:
    """[-1, 1] channels-first floats to uint8 channels-last pixels."""
    x = (np.clip(np.asarray(images, np.float32), -1.0, 1.0) + 1.0) * 127.5
    return np.round(x).astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(images: HostOrDeviceImages, *, ncols: int | None = None, pad: int = 2) -> UInt8[np.ndarray, "H W c"]:
    """Tile images into a near-square grid with ``pad`` pixels of black between them."""
    pixels = to_uint8(images)
    b, h, w, c = pixels.shape
    if not b:
        raise ValueError("no images to tile into a grid")
    ncols = ncols or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncols)
    grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.uint8)
    for i in range(b):
        r, q = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = pixels[i]
    return grid


def _pil(grid: UInt8[np.ndarray, "H W c"]) -> PILImage.Image:
    return PILImage.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)


def save_grid(images: HostOrDeviceImages, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _pil(make_grid(images)).save(path)
    return path


def save_trajectory(path_images: Float[np.ndarray | Array, "b n c h w"], path: str | Path, *, frames: int = 20) -> Path:
    """The denoising path of a few images: an animated GIF, or (``.png``) frames side by side, one row each."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = path_images.shape[1]
    picks = np.unique(np.linspace(0, n - 1, min(frames, n)).round().astype(int))
    if path.suffix.lower() == ".gif":
        shots = [_pil(make_grid(path_images[:, i])) for i in picks]
        shots[0].save(path, save_all=True, append_images=shots[1:], duration=120, loop=0)
    else:
        b = path_images.shape[0]
        rows = path_images[:, picks].reshape(b * len(picks), *path_images.shape[2:])
        _pil(make_grid(rows, ncols=len(picks))).save(path)
    return path
