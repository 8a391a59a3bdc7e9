"""Pixel arithmetic of one slice: intensity normalisation, the display orientation, square boxes and resizing."""

import numpy as np
from PIL import Image

def normalize_percentiles(volume, foreground, low=0.5, high=99.5):
    """Map the [low, high] percentiles of the foreground voxels to [0, 1], clip, zero the background."""
    values = volume[foreground]
    out = np.zeros(volume.shape, np.float32)
    if values.size == 0:
        return out
    lo, hi = np.percentile(values, [low, high])
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    out[foreground] = np.clip((values - lo) * scale, 0.0, 1.0)
    return out


def ct_window(volume, low=-125.0, high=275.0):
    """Map Hounsfield units in [low, high] to [0, 1], clipping outside."""
    return np.clip((volume - low) / (high - low), 0.0, 1.0).astype(np.float32)


def to_display(slice_xy):
    """Axial slice indexed [x, y] -> image [row, col], anterior (high y) at the top."""
    return slice_xy.T[::-1]


def from_display(image):
    """Inverse of `to_display`."""
    return image[::-1].T


def square_box(footprint_xy, margin=0):
    """Square [x0, x1, y0, y1) around the True pixels of a 2-D footprint, `margin` voxels wider per side."""
    xs, ys = np.flatnonzero(footprint_xy.any(1)), np.flatnonzero(footprint_xy.any(0))
    if xs.size == 0:
        xs, ys = np.array([0, footprint_xy.shape[0] - 1]), np.array([0, footprint_xy.shape[1] - 1])
    side = int(max(xs[-1] - xs[0] + 1, ys[-1] - ys[0] + 1)) + 2 * margin
    x0 = int(np.floor((xs[0] + xs[-1] + 1 - side) / 2))
    y0 = int(np.floor((ys[0] + ys[-1] + 1 - side) / 2))
    return x0, x0 + side, y0, y0 + side


def cut_box(slice_xy, box):
    """The box of a slice as a display image; parts outside the slice are zero."""
    x0, x1, y0, y1 = box
    out = np.zeros((x1 - x0, y1 - y0), slice_xy.dtype)
    sx0, sx1 = max(x0, 0), min(x1, slice_xy.shape[0])
    sy0, sy1 = max(y0, 0), min(y1, slice_xy.shape[1])
    if sx1 > sx0 and sy1 > sy0:
        out[sx0 - x0:sx1 - x0, sy0 - y0:sy1 - y0] = slice_xy[sx0:sx1, sy0:sy1]
    return to_display(out)


def paste_box(slice_xy, image, box):
    """Write a display image (already box-sized) into the box of a slice, in place; inverse of `cut_box`."""
    x0, x1, y0, y1 = box
    patch = from_display(image)
    sx0, sx1 = max(x0, 0), min(x1, slice_xy.shape[0])
    sy0, sy1 = max(y0, 0), min(y1, slice_xy.shape[1])
    if sx1 > sx0 and sy1 > sy0:
        slice_xy[sx0:sx1, sy0:sy1] = patch[sx0 - x0:sx1 - x0, sy0 - y0:sy1 - y0]


def resize2d(image, shape, nearest=False):
    """Resize a 2-D float array to (rows, cols): bilinear with anti-aliasing, or nearest for masks."""
    shape = tuple(int(s) for s in shape)
    if image.shape == shape:
        return image.astype(np.float32, copy=True)
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(pil.resize((shape[1], shape[0]), resample), dtype=np.float32)


def to_uint8(image, low=0.0, high=1.0):
    """Floats in [low, high] (default [0, 1]; [-1, 1] for model images) -> 0..255 bytes, rounded
    half to even and clipped."""
    return np.rint(np.clip((np.asarray(image) - low) * (255.0 / (high - low)), 0.0, 255.0)).astype(np.uint8)
