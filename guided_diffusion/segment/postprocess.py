"""From saliency map to mask: per-image min-max, optional smoothing, Otsu, optional largest component.

The paper's rule (the default) is per-image min-max normalisation and Otsu's threshold over the
whole image. `MaskOptions` adds what the field commonly does on top, each chosen on the training
split, never on the evaluation masks:

- `positive_part`: only the positive part of the (signed) map, max(a, 0): what the tumour label
  raises. The signed CDM map also has a negative rim around a lesion; when that rim is the map's
  strongest feature, Otsu splits "rim" from "everything else" and the mask covers the whole brain;
- `smooth_sigma`: a light Gaussian blur of the map (in pixels) before thresholding, against the
  speckle of a map summed from a few denoising steps;
- `foreground_only`: Otsu's threshold computed over the foreground (the brain: pixels brighter than
  the image background) and the mask kept inside it, so the large empty background does not pull
  the threshold down;
- `keep_largest`: keep the largest 4-connected component.

Images are the last two axes; any leading axes index images, each treated alone. Inputs may be numpy
arrays or torch tensors; outputs are numpy arrays.

Otsu's threshold is scikit-image's, given the 256-bin histogram with each bin placed at its upper
edge: the split it picks is the same (a shift of every bin leaves the between-class variance
unchanged), but the threshold it returns is then the edge between the two classes, not the centre
of the last lower bin, so `image >= threshold` keeps exactly the classes Otsu scored.
"""

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu


@dataclass(frozen=True)
class MaskOptions:
    """How a saliency map becomes a mask (the defaults are the paper's: min-max + Otsu)."""

    smooth_sigma: float = 0.0
    foreground_only: bool = False
    keep_largest: bool = False
    positive_part: bool = False

    def __post_init__(self):
        if not self.smooth_sigma >= 0:
            raise ValueError(f"smooth_sigma {self.smooth_sigma}: must be >= 0")

    def as_dict(self):
        return asdict(self)


def _as_array(x):
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_image_stack(x, name):
    """Reshape to (N, H, W) and return it with the original shape."""
    x = _as_array(x)
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (H, W), got shape {x.shape}")
    return x.reshape((-1,) + x.shape[-2:]), x.shape


def foreground_mask(images, tolerance=1e-3):
    """Pixels of each image (N, C, H, W) or (N, H, W) above its background (its minimum) in any channel."""
    images = _as_array(images).astype(np.float64)
    if images.ndim == 4:
        low = images.min(axis=(1, 2, 3), keepdims=True)
        return (images > low + tolerance).any(axis=1)
    stack, shape = as_image_stack(images, "images")
    return (stack > stack.min(axis=(1, 2), keepdims=True) + tolerance).reshape(shape)


def normalize_map(saliency):
    """Min-max normalise each image of `saliency` (..., H, W) to [0, 1]; a constant image becomes 0 (float64)."""
    stack, shape = as_image_stack(saliency, "saliency")
    stack = stack.astype(np.float64)
    low = stack.min(axis=(1, 2), keepdims=True)
    span = stack.max(axis=(1, 2), keepdims=True) - low
    return ((stack - low) / np.where(span > 0, span, 1.0)).reshape(shape)


def otsu_threshold(values, bins=256):
    """The lowest value of Otsu's upper class for `values` (at least two distinct values)."""
    counts, edges = np.histogram(values, bins=bins)
    return threshold_otsu(hist=(counts, edges[1:]))


def otsu_mask(saliency, region=None):
    """Each image's pixels in Otsu's upper class (`otsu_threshold`).

    With `region` (a boolean stack of the same shape) the threshold is computed over the region's
    pixels only and the mask is kept inside it. A constant image (or region) gives an empty mask;
    NaN values are an error.
    """
    stack, shape = as_image_stack(saliency, "saliency")
    stack = stack.astype(np.float64)
    if not np.all(np.isfinite(stack)):
        raise ValueError("saliency map contains NaN or infinite values")
    if region is not None:
        region, region_shape = as_image_stack(region, "region")
        if region_shape != shape:
            raise ValueError(f"region shape {region_shape} differs from the saliency shape {shape}")
        region = region.astype(bool)
    out = np.zeros(stack.shape, dtype=bool)
    for i, image in enumerate(stack):
        inside = image if region is None else image[region[i]]
        if inside.size == 0 or inside.min() == inside.max():
            continue
        out[i] = image >= otsu_threshold(inside)
        if region is not None:
            out[i] &= region[i]
    return out.reshape(shape)


def largest_component(mask):
    """Keep the largest 4-connected component of each image of `mask` (..., H, W).

    When several components share the maximal size all of them are kept (as the original
    post-processing does). An empty image stays empty.
    """
    stack, shape = as_image_stack(mask, "mask")
    out = np.zeros(stack.shape, dtype=bool)
    for i, image in enumerate(stack.astype(bool)):
        labels, count = ndimage.label(image)
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0  # background
        out[i] = np.isin(labels, np.flatnonzero(sizes == sizes.max()))
    return out.reshape(shape)


def smooth_maps(saliency, sigma):
    """Gaussian blur of each image of `saliency` with `sigma` pixels (0: unchanged)."""
    stack, shape = as_image_stack(saliency, "saliency")
    if sigma <= 0:
        return stack.reshape(shape)
    return ndimage.gaussian_filter(stack.astype(np.float64), sigma=(0, sigma, sigma)).reshape(shape)


def prepare_map(saliency, options):
    """The map Otsu sees before min-max: its positive part (`options.positive_part`), then smoothed."""
    if options.positive_part:
        saliency = np.maximum(_as_array(saliency), 0)
    return smooth_maps(saliency, options.smooth_sigma)


def otsu_separability(saliency, region=None, smooth_sigma=0.0, positive_part=False):
    """Per image, Otsu's effectiveness: between-class over total variance at Otsu's threshold, in [0, 1].

    Needs no mask: a map that sets a lesion clearly apart from the rest scores near 1, a diffuse or
    speckled one near 0. With `region` only its pixels count. Constant images score 0.
    """
    prepared = prepare_map(saliency, MaskOptions(smooth_sigma=smooth_sigma, positive_part=positive_part))
    stack, _ = as_image_stack(normalize_map(prepared), "saliency")
    if region is not None:
        region = as_image_stack(region, "region")[0].astype(bool)
    scores = np.zeros(len(stack))
    for i, image in enumerate(stack):
        values = image if region is None else image[region[i]]
        if values.size < 2 or values.min() == values.max():
            continue
        upper = values >= otsu_threshold(values)
        w = upper.mean()
        if 0 < w < 1:
            scores[i] = w * (1 - w) * (values[upper].mean() - values[~upper].mean()) ** 2 / values.var()
    return scores


def saliency_to_mask(saliency, keep_largest=False, options=None, images=None):
    """Masks from maps: positive part, smoothing, min-max, Otsu (over the foreground of `images`), largest component.

    `options` (a MaskOptions) takes precedence over `keep_largest`; `foreground_only` needs `images`.
    """
    options = options or MaskOptions(keep_largest=keep_largest)
    region = None
    if options.foreground_only:
        if images is None:
            raise ValueError("foreground_only needs the images the maps were computed from")
        region = foreground_mask(images)
    mask = otsu_mask(normalize_map(prepare_map(saliency, options)), region)
    return largest_component(mask) if options.keep_largest else mask
