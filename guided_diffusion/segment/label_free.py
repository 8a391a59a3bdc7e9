"""Label-free criteria of a grid point's maps, and how closely each one tracks Dice across the ablation grid.

The ablation (`study.py`) measures every grid point's Dice against the training masks. A setting
for data nobody has outlined has to be chosen without masks, by a score of the maps alone; such a
score is only worth using if it ranks the grid points the way Dice does. Each criterion below is a
per-image score, higher meaning "looks like a better segmentation", averaged over the subset like
Dice (each row of the ablation holds `<name>` and `<name>_std`):

- `separability`: Otsu's effectiveness of the raw map (`postprocess.otsu_separability`);
- `separability_pp`: the same after the post-processing a chosen point gets (positive part, 1 px blur);
- `draw_agreement`: Dice between the Otsu masks of two independent replicates of the point (the mean
  of noise draws 0..K-1, which is the row's own map, and of draws K..2K-1); a map driven by the
  image, not by the noise, gives the same mask twice;
- `map_agreement`: the Pearson correlation of those two replicates' maps (the same idea, before Otsu);
- `compact_agreement`: `draw_agreement` minus the mask's share of the brain: a mask that comes back
  under other noise and stays small. Agreement alone also rewards broad masks (a map that marks a
  large region marks it under any noise: the tau > 0 points), as the faithfulness drop alone would;
- `faithfulness`: how much the classifier's p(tumour | x, t = 0) drops when the mask is replaced by
  healthy-looking tissue (`healthy_fill`), minus the mask's share of the brain, so that a mask
  covering the whole brain, which removes the tumour too, gains nothing;
- `faithfulness_ratio`: the drop per unit of mask share, (drop) / (share + `RATIO_FLOOR`);
- `stability`: Dice between the point's masks and those of its neighbours in the grid (adjacent Q,
  tau, s or K, the rest equal), computed after the grid (`add_stability`).

`rank_correlation` is Spearman's rho (ties get their average rank); `criterion_correlations` computes
it for every criterion across the CG-CDM rows of the grid (one row per distinct point), and the
study's label-free choice uses the criterion with the highest one.
"""

import math

import numpy as np
from scipy import ndimage

from .postprocess import MaskOptions, foreground_mask, otsu_separability, saliency_to_mask

POSTPROCESSED = MaskOptions(smooth_sigma=1.0, positive_part=True)  # the post-processing of `separability_pp`
FILL_SIGMA = 4.0  # pixels of the normalised-convolution blur that fills a masked region
RATIO_FLOOR = 0.05  # added to the mask share in `faithfulness_ratio`, so a tiny mask cannot divide by ~0
CRITERIA = ("separability", "separability_pp", "draw_agreement", "map_agreement", "compact_agreement",
            "faithfulness", "faithfulness_ratio", "stability")
POINT_KEYS = ("noise_level", "steps", "tau", "classifier_scale", "noise_draws")
NEIGHBOUR_AXES = ("noise_level", "tau", "classifier_scale", "noise_draws")  # R leaves the maps almost unchanged


def average_ranks(values):
    """Ranks 1..n of `values`, tied values sharing the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ordered = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and ordered[end + 1] == ordered[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def rank_correlation(criterion_values, dice_values):
    """Spearman's rho between two sequences (pairs with a missing or NaN value left out): the Pearson
    correlation of their average ranks. NaN when fewer than 3 pairs remain or either side is constant."""
    pairs = [(float(c), float(d)) for c, d in zip(criterion_values, dice_values)
             if c is not None and d is not None and math.isfinite(float(c)) and math.isfinite(float(d))]
    if len(pairs) < 3:
        return float("nan")
    x, y = (average_ranks(v) for v in zip(*pairs))
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def mask_dice(a, b):
    """Per-image Dice of two boolean stacks (N, H, W); two empty masks agree fully (1)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    a, b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    overlap = (a & b).sum(axis=(1, 2))
    total = a.sum(axis=(1, 2)) + b.sum(axis=(1, 2))
    return np.where(total > 0, 2.0 * overlap / np.maximum(total, 1), 1.0)


def map_correlation(a, b):
    """Per-image Pearson correlation of two map stacks (N, H, W); 0 where either map is constant."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    return np.where(denominator > 0, (a * b).sum(axis=1) / np.where(denominator > 0, denominator, 1.0), 0.0)


def healthy_fill(images, masks, sigma=FILL_SIGMA):
    """`images` (N, C, H, W) with each mask's brain pixels replaced by the surrounding healthy tissue.

    The fill is a normalised convolution: a Gaussian blur (`sigma` px) of the brain outside the mask,
    divided by the blurred weight of those pixels, so each filled pixel is a local average of unmasked
    brain; where no unmasked brain lies within reach (or none is left), the median of the unmasked
    brain (or of the whole brain) is used. Background pixels are never changed.
    """
    images = np.asarray(images, dtype=np.float64)
    masks = np.asarray(masks, bool)
    brain = foreground_mask(images)
    out = images.copy()
    for i in range(len(images)):
        region = masks[i] & brain[i]
        if not region.any():
            continue
        keep = brain[i] & ~masks[i]
        weight = ndimage.gaussian_filter(keep.astype(np.float64), sigma)
        for c in range(images.shape[1]):
            channel = images[i, c]
            source = channel[keep] if keep.any() else channel[brain[i]]
            blurred = ndimage.gaussian_filter(np.where(keep, channel, 0.0), sigma)
            fill = np.where(weight > 1e-3, blurred / np.maximum(weight, 1e-3), np.median(source))
            out[i, c][region] = fill[region]
    return out


def tumour_probability(detector, images, batch_size=64):
    """`detector`'s p(tumour) (N,) of `images` (N, C, H, W, numpy or tensor), `batch_size` at a time."""
    import torch

    images = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    device = _device_of(detector)
    return np.concatenate([np.asarray(detector(torch.as_tensor(np.asarray(images[i:i + batch_size], np.float32),
                                                               device=device)), np.float64)
                           for i in range(0, len(images), batch_size)])


def faithfulness_scores(detector, images, masks, p_before=None, batch_size=64):
    """Per image (drop, share): the fall in `detector`'s p(tumour) when the mask is filled with healthy
    tissue (`healthy_fill`), and the mask's share of the brain (in [0, 1]). `detector`: images (B, C, H, W)
    tensor -> p (B,) numpy (`detect.TumourDetector`); `p_before`: its value on `images`, if known."""
    images = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    masks = np.asarray(masks, bool)
    if p_before is None:
        p_before = tumour_probability(detector, images, batch_size)
    p_after = tumour_probability(detector, healthy_fill(images, masks), batch_size)
    return np.asarray(p_before, np.float64) - p_after, brain_share(images, masks)


def brain_share(images, masks):
    """Per image, the share of the brain (`postprocess.foreground_mask`) that the mask covers, in [0, 1]."""
    brain = foreground_mask(images)
    return (np.asarray(masks, bool) & brain).sum(axis=(1, 2)) / np.maximum(brain.sum(axis=(1, 2)), 1)


def _device_of(detector):
    classifier = getattr(detector, "classifier", None)
    if classifier is not None:
        return next(classifier.parameters()).device
    return getattr(detector, "device", "cpu")


def _fields(name, per_image):
    per_image = np.asarray(per_image, np.float64)
    return {name: float(per_image.mean()), f"{name}_std": float(per_image.std())}


def point_criteria(maps, replicate, images, detector=None, p_before=None):
    """The per-point criteria of one grid point (every one of CRITERIA but `stability`) as row fields
    {name: mean, name_std: per-image standard deviation}, with `mask_share` (the masks' mean share of
    the brain), and the point's Otsu masks.

    maps: the point's maps (N, H, W); replicate: the maps of an independent replicate (other noise
    draws) or None (no agreement fields); detector: `detect.TumourDetector` or None (no faithfulness
    fields); p_before: the detector's p(tumour) on `images` (computed when None).
    """
    images_np = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    masks = saliency_to_mask(maps)
    share = brain_share(images_np, masks)
    fields = _fields("separability", otsu_separability(maps)) | {"mask_share": float(share.mean())}
    fields |= _fields("separability_pp", otsu_separability(maps, None, POSTPROCESSED.smooth_sigma,
                                                           POSTPROCESSED.positive_part))
    if replicate is not None:
        agreement = mask_dice(masks, saliency_to_mask(replicate))
        fields |= _fields("draw_agreement", agreement)
        fields |= _fields("map_agreement", map_correlation(maps, replicate))
        fields |= _fields("compact_agreement", agreement - share)
    if detector is not None:
        drop, _ = faithfulness_scores(detector, images_np, masks, p_before)
        fields |= _fields("faithfulness", drop - share)
        fields |= _fields("faithfulness_ratio", drop / (share + RATIO_FLOOR))
    return fields, masks


def point_key(row):
    """The grid point of a row: (Q, R, tau, s, K)."""
    return tuple(float(row.get(k, 1)) for k in POINT_KEYS)


def neighbours(key, keys):
    """The keys of `keys` adjacent to `key` along one axis of NEIGHBOUR_AXES (the nearest value present on
    each side, every other coordinate equal)."""
    found = []
    for axis in NEIGHBOUR_AXES:
        a = POINT_KEYS.index(axis)
        same = [k for k in keys if all(k[j] == key[j] for j in range(len(key)) if j != a) and k != key]
        below = [k for k in same if k[a] < key[a]]
        above = [k for k in same if k[a] > key[a]]
        if below:
            found.append(max(below, key=lambda k: k[a]))
        if above:
            found.append(min(above, key=lambda k: k[a]))
    return found


def add_stability(rows, masks):
    """Set `stability` (and `stability_std`) of every row whose point has masks in `masks` ({point_key:
    (N, H, W) bool}) and at least one neighbour there: the per-image Dice with each neighbour's masks,
    averaged over the neighbours; None otherwise. Returns `rows`."""
    keys = list(masks)
    for row in rows:
        key = point_key(row)
        near = neighbours(key, keys) if key in masks else []
        if not near:
            row["stability"] = row["stability_std"] = None
            continue
        per_image = np.mean([mask_dice(masks[key], masks[k]) for k in near], axis=0)
        row.update(_fields("stability", per_image))
    return rows


def distinct_points(rows):
    """One row per grid point (the first), in order: the sweeps share some points."""
    seen, out = set(), []
    for row in rows:
        key = point_key(row)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def criterion_correlations(rows, criteria=CRITERIA, key="dice"):
    """{criterion: Spearman's rho with `key`} across `rows`' distinct points, for each criterion the rows
    hold (rows without a value are left out of that criterion's rho; None where rho is undefined);
    criteria no row holds are omitted."""
    points = distinct_points(rows)
    out = {}
    for name in criteria:
        if any(r.get(name) is not None for r in points):
            rho = rank_correlation([r.get(name) for r in points], [r[key] for r in points])
            out[name] = rho if math.isfinite(rho) else None
    return out


def best_criterion(correlations, rows=None):
    """The criterion of highest rho (NaN never wins; ties: the earlier in CRITERIA order, then name).
    With `rows`, only criteria every row holds are eligible. None when none is eligible."""
    eligible = [name for name, rho in correlations.items() if rho is not None and math.isfinite(rho)
                and (rows is None or all(r.get(name) is not None for r in rows))]
    if not eligible:
        return None
    order = {name: i for i, name in enumerate(CRITERIA)}
    return max(eligible, key=lambda n: (correlations[n], -order.get(n, len(CRITERIA)), n))
