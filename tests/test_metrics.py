"""Tests for guided_diffusion.metrics: Dice / IoU / HD95 (two conventions) / surface Dice, aggregation.

Every distance metric is checked against an independent brute-force
implementation of its documented convention, against MONAI's own
high-level functions, against closed forms, and against DeepMind's
`surface-distance`: exactly where the conventions match (Dice, the
length-weighted surface Dice), otherwise within bounds that follow from its
corner-based contours or that were measured on these random masks.

MONAI computes in float32, hence the 1e-6 tolerances where values are
otherwise exact: a wrong convention moves a value by far more (the smallest
change of a percentile between neighbouring order statistics here is over
1e-3 px, of a Dice or surface Dice over 1e-4).
"""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from guided_diffusion import metrics

surface_distance = pytest.importorskip("surface_distance")
monai_metrics = pytest.importorskip("monai.metrics")
if not hasattr(np, "Inf"):  # surface-distance still uses the pre-numpy-2 alias for empty masks
    np.Inf = np.inf

# surface-distance imports from scipy.ndimage namespaces that scipy has deprecated; MONAI 1.6's
# compute_hausdorff_distance and compute_surface_dice pass an argument it has itself deprecated.
pytestmark = [pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")]

N_PAIRS = 120
FLOAT32 = 1e-6


def random_blob(rng, shape=(48, 48)):
    """A mask from thresholded smooth noise: irregular, often several components, often on the border."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), rng.uniform(2.0, 6.0))
    return field > np.quantile(field, rng.uniform(0.5, 0.95))


def random_pairs():
    return [(random_blob(rng), random_blob(rng))
            for rng in (np.random.default_rng(seed) for seed in range(N_PAIRS))]


def square(shape, top, left, side):
    mask = np.zeros(shape, dtype=bool)
    mask[top:top + side, left:left + side] = True
    return mask


def as_batch(mask):
    return torch.from_numpy(mask)[None, None].float()


# ---------------------------------------------------------------------------
# independent references for the documented conventions


def brute_force_boundary(mask):
    """Pixels of `mask` with a 4-neighbour outside the mask (outside the image counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[1:-1, 1:-1]
    all_neighbours_inside = (padded[:-2, 1:-1] & padded[2:, 1:-1]
                             & padded[1:-1, :-2] & padded[1:-1, 2:])
    return np.argwhere(inner & ~all_neighbours_inside).astype(float)


def linear_percentile(values, percent):
    """Linear interpolation between order statistics at rank percent/100 * (n - 1)."""
    ordered = sorted(values)
    position = percent / 100 * (len(ordered) - 1)
    low = int(math.floor(position))
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def nearest_distances(source, target, row_scale=1.0):
    """For each point of `source`, the distance to the nearest point of `target` (plain loop)."""
    out = []
    for row, col in source:
        out.append(np.min(np.hypot(row_scale * (target[:, 0] - row), target[:, 1] - col)))
    return np.array(out)


def brute_force_directed(pred, gt, row_scale=1.0):
    a, b = brute_force_boundary(pred), brute_force_boundary(gt)
    return nearest_distances(a, b, row_scale), nearest_distances(b, a, row_scale)


def brute_force_hd(pred, gt, percent=95, row_scale=1.0):
    return max(linear_percentile(d, percent) for d in brute_force_directed(pred, gt, row_scale))


def brute_force_hd_seed(pred, gt, percent=95, row_scale=1.0):
    """medpy's hd95 on a (1, H, W) array: every pixel of each mask to the other mask, pooled."""
    a, b = np.argwhere(pred).astype(float), np.argwhere(gt).astype(float)
    pooled = np.concatenate([nearest_distances(a, b, row_scale), nearest_distances(b, a, row_scale)])
    return linear_percentile(pooled, percent)


def brute_force_surface_dice(pred, gt, tolerance):
    forward, backward = brute_force_directed(pred, gt)
    return (np.sum(forward <= tolerance) + np.sum(backward <= tolerance)) / (forward.size + backward.size)


def test_random_masks_touch_the_border_and_have_several_components():
    # The cross-checks below are only meaningful if these cases occur.
    pairs = random_pairs()
    touching = sum(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()
                   for pair in pairs for m in pair)
    multi = sum(ndimage.label(m)[1] > 1 for pair in pairs for m in pair)
    assert touching > N_PAIRS and multi > N_PAIRS // 2


# ---------------------------------------------------------------------------
# HD95, boundary convention (MONAI's)


def test_boundary_distances_are_the_brute_force_edge_distances():
    for pred, gt in random_pairs()[:40]:
        for ours, reference in zip(metrics.boundary_distances(pred, gt), brute_force_directed(pred, gt)):
            np.testing.assert_allclose(np.sort(ours), np.sort(reference), rtol=FLOAT32, atol=FLOAT32)


def test_hd_matches_brute_force():
    for pred, gt in random_pairs()[:60]:
        assert metrics.hd95(pred, gt) == pytest.approx(brute_force_hd(pred, gt, 95), rel=FLOAT32)
        assert metrics.hausdorff_distance(pred, gt, 100) == pytest.approx(brute_force_hd(pred, gt, 100), rel=FLOAT32)
        assert metrics.hausdorff_distance(pred, gt, 50) == pytest.approx(brute_force_hd(pred, gt, 50), rel=FLOAT32)


def test_hd_matches_monai_compute_hausdorff_distance():
    for pred, gt in random_pairs()[:30]:
        expected = monai_metrics.compute_hausdorff_distance(as_batch(pred), as_batch(gt), include_background=True,
                                                            percentile=95)
        assert metrics.hd95(pred, gt) == pytest.approx(float(expected), rel=FLOAT32)
        expected = monai_metrics.compute_hausdorff_distance(as_batch(pred), as_batch(gt), include_background=True,
                                                            spacing=(2.0, 0.5))
        assert metrics.hausdorff_distance(pred, gt, 100, spacing=(2.0, 0.5)) == pytest.approx(float(expected),
                                                                                              rel=FLOAT32)


def test_hausdorff_within_corner_bound_of_surface_distance():
    # surface-distance's contour points are pixel corners; each of our boundary
    # pixels is within sqrt(2)/2 of one of its contour corners and vice versa,
    # so the classical Hausdorff distances differ by at most sqrt(2).
    differences = []
    for pred, gt in random_pairs():
        reference = surface_distance.compute_surface_distances(gt, pred, (1.0, 1.0))
        ours = metrics.hausdorff_distance(pred, gt, 100)
        assert abs(ours - surface_distance.compute_robust_hausdorff(reference, 100)) <= math.sqrt(2) + FLOAT32
        differences.append(metrics.hd95(pred, gt)
                           - surface_distance.compute_robust_hausdorff(reference, 95))
    # HD95 has no such bound (contour weights and its inverted-CDF percentile move
    # the 5% tail), but it agrees closely on average (measured: mean 0.45 px, median 0.42 px).
    differences = np.abs(differences)
    assert np.median(differences) < 0.75 and differences.mean() < 0.75


def test_hd_spacing_scales_distances():
    pred, gt = random_pairs()[3]
    assert metrics.hd95(pred, gt, spacing=2.5) == pytest.approx(2.5 * metrics.hd95(pred, gt), rel=FLOAT32)
    # Anisotropic spacing: the reference on a grid with rows stretched by 2.
    assert metrics.hd95(pred, gt, spacing=(2.0, 1.0)) == pytest.approx(brute_force_hd(pred, gt, 95, row_scale=2.0),
                                                                       rel=FLOAT32)


# ---------------------------------------------------------------------------
# HD95, region convention (the original code's)


def test_hd_seed_matches_brute_force_region_distances():
    for pred, gt in random_pairs()[:12]:
        assert metrics.hd95(pred, gt, convention="seed") == pytest.approx(brute_force_hd_seed(pred, gt), rel=1e-9)
    pred, gt = random_pairs()[5]
    assert metrics.hd95(pred, gt, spacing=(2.0, 1.0), convention="seed") == pytest.approx(
        brute_force_hd_seed(pred, gt, row_scale=2.0), rel=1e-9)
    assert metrics.hausdorff_distance(pred, gt, 100, convention="seed") == pytest.approx(
        brute_force_hd_seed(pred, gt, 100), rel=1e-9)


def test_hd_seed_is_below_boundary_hd_on_overlapping_masks():
    # Region to region, the overlap contributes zeros and pulls the percentile
    # down; boundary to boundary it does not. (Measured on these masks: lower
    # in 99% of the pairs, by 2.5 px on average.)
    pairs = random_pairs()[:40]
    seed = np.array([metrics.hd95(p, g, convention="seed") for p, g in pairs])
    boundary = np.array([metrics.hd95(p, g) for p, g in pairs])
    assert np.mean(seed < boundary) > 0.9


# ---------------------------------------------------------------------------
# Dice and IoU


def test_dice_matches_surface_distance():
    for pred, gt in random_pairs():
        expected = surface_distance.compute_dice_coefficient(gt, pred)
        assert metrics.dice(pred, gt) == pytest.approx(expected, abs=FLOAT32)
        # IoU from Dice: J = D / (2 - D).
        assert metrics.iou(pred, gt) == pytest.approx(expected / (2 - expected), abs=FLOAT32)


def test_dice_any_number_of_dimensions():
    pred = np.zeros((10, 10, 10), dtype=bool)
    gt = np.zeros_like(pred)
    pred[0:4, 0:4, 0:4] = True   # 64 voxels
    gt[2:6, 0:4, 0:4] = True     # 64 voxels, 32 shared
    assert metrics.dice(pred, gt) == pytest.approx(0.5)
    assert metrics.iou(pred, gt) == pytest.approx(32 / 96)
    assert metrics.dice_3d(pred, gt) == metrics.dice(pred, gt)
    assert math.isnan(metrics.dice(np.zeros_like(pred), np.zeros_like(gt)))
    assert metrics.dice(pred[0, 0], gt[0, 0]) == 0.0  # 1-D: [1,1,1,1,0...] vs all empty


# ---------------------------------------------------------------------------
# surface Dice


@pytest.mark.parametrize("tolerance", [0.0, 1.0, 2.0, 2.5])
def test_surface_dice_matches_brute_force_and_monai(tolerance):
    for pred, gt in random_pairs()[:25]:
        ours = metrics.surface_dice(pred, gt, tolerance)
        assert ours == pytest.approx(brute_force_surface_dice(pred, gt, tolerance), abs=1e-12)
        expected = monai_metrics.compute_surface_dice(as_batch(pred), as_batch(gt), [tolerance],
                                                      include_background=True)
        assert ours == pytest.approx(float(expected), abs=FLOAT32)


def test_surface_dice_subvoxels_is_surface_distance_convention():
    # With subvoxels=True both measure along the pixel-corner contour, weighted by length.
    for pred, gt in random_pairs()[:15]:
        reference = surface_distance.compute_surface_distances(gt, pred, (1.0, 1.0))
        for tolerance in (1.0, 2.0):
            assert metrics.surface_dice(pred, gt, tolerance, subvoxels=True) == pytest.approx(
                surface_distance.compute_surface_dice_at_tolerance(reference, tolerance), abs=FLOAT32)
    pred, gt = random_pairs()[7]
    reference = surface_distance.compute_surface_distances(gt, pred, (2.0, 1.0))
    assert metrics.surface_dice(pred, gt, 3.0, spacing=(2.0, 1.0), subvoxels=True) == pytest.approx(
        surface_distance.compute_surface_dice_at_tolerance(reference, 3.0), abs=FLOAT32)


def test_surface_dice_pixel_convention_close_to_surface_distance():
    # Counting edge pixels instead of weighting the corner contour by length:
    # measured on these masks, mean |difference| 0.031 at 1 px and 0.038 at
    # 2 px, largest 0.12. A wrong tolerance or boundary moves it much more
    # (the value at 1 px against surface-distance's at 2 px: mean 0.13).
    for tolerance in (1.0, 2.0):
        differences = []
        for pred, gt in random_pairs():
            reference = surface_distance.compute_surface_distances(gt, pred, (1.0, 1.0))
            differences.append(metrics.surface_dice(pred, gt, tolerance)
                               - surface_distance.compute_surface_dice_at_tolerance(reference, tolerance))
        differences = np.abs(differences)
        assert differences.mean() < 0.06 and differences.max() < 0.2


def test_surface_dice_spacing_scales_with_tolerance():
    pred, gt = random_pairs()[2]
    assert metrics.surface_dice(pred, gt, 5.0, spacing=2.5) == metrics.surface_dice(pred, gt, 2.0)
    assert metrics.surface_dice(pred, gt, 2.0, spacing=(2.0, 1.0)) != metrics.surface_dice(pred, gt, 2.0)


# ---------------------------------------------------------------------------
# closed forms


@pytest.mark.parametrize("top, left", [(10, 4), (0, 0)])  # (0, 0): both squares touch the image edge
def test_squares_offset_by_k(top, left):
    side, k, shape = 40, 3, (64, 64)
    gt = square(shape, top, left, side)
    pred = square(shape, top, left + k, side)
    assert metrics.dice(pred, gt) == pytest.approx((side - k) / side)
    assert metrics.iou(pred, gt) == pytest.approx((side - k) / (side + k))
    # Boundary: every boundary pixel is within k of the other boundary and the
    # far side (side pixels, > 5%) is exactly k away.
    assert metrics.hd95(pred, gt) == pytest.approx(k)
    assert metrics.hausdorff_distance(pred, gt, 100) == pytest.approx(k)
    reference = surface_distance.compute_surface_distances(gt, pred, (1.0, 1.0))
    assert surface_distance.compute_robust_hausdorff(reference, 95) == pytest.approx(k)
    # Region: of the 2 * side^2 pooled pixel distances, 2 * side * (side - k)
    # are 0 and 2 * side each are 1, ..., k. For side 40, k 3: rank 0.95 * 3199
    # = 3039.05 falls between the last 1 (index 3039) and the first 2.
    assert metrics.hd95(pred, gt, convention="seed") == pytest.approx(1.05)
    assert metrics.hd95(pred, gt, convention="seed") == pytest.approx(brute_force_hd_seed(pred, gt))
    assert metrics.hausdorff_distance(pred, gt, 100, convention="seed") == pytest.approx(k)
    # Surface Dice at t < k: per mask, 2 (side - k + t) edge pixels of the two
    # sides along the shift and 2 t of the side inside the other square are
    # within t, out of 4 side - 4.
    for t in (1, 2):
        assert metrics.surface_dice(pred, gt, t) == pytest.approx((side - k + 2 * t) / (2 * side - 2))
    assert metrics.surface_dice(pred, gt, k) == 1.0


def test_nested_squares_take_the_larger_directed_percentile():
    # Inner square side L=10 inside a concentric square with margin m=4.
    # inner -> outer: all 36 boundary pixels at distance 4.
    # outer -> inner: 68 pixels: 40 at 4, then per corner 2 each at sqrt(16 + j^2), j=1..3, and one at sqrt(32).
    # Sorted, rank 0.95 * 67 = 63.65 lies between index 63 (the last 5) and 64 (the first sqrt(32)).
    shape = (32, 32)
    inner = square(shape, 10, 10, 10)
    outer = square(shape, 6, 6, 18)
    expected = 5 + 0.65 * (math.sqrt(32) - 5)
    assert metrics.hd95(inner, outer) == pytest.approx(expected, rel=FLOAT32)
    assert metrics.hd95(outer, inner) == pytest.approx(expected, rel=FLOAT32)
    assert metrics.dice(inner, outer) == pytest.approx(2 * 100 / (100 + 324))
    assert metrics.iou(inner, outer) == pytest.approx(100 / 324)
    forward, backward = metrics.boundary_distances(inner, outer)
    np.testing.assert_allclose(forward, np.full(36, 4.0))
    assert backward.size == 68 and np.count_nonzero(np.isclose(backward, 4.0)) == 40
    assert metrics.hd95(inner, outer, convention="seed") == pytest.approx(brute_force_hd_seed(inner, outer))


def test_square_with_a_far_false_positive_pixel():
    # Ground truth: a square of side s; prediction: the same square plus one pixel far away.
    # Edge pixels: 4s - 4 per square, all at 0, and one at a distance over the tolerance.
    s = 10
    gt = square((32, 32), 3, 3, s)
    pred = gt.copy()
    pred[28, 28] = True
    assert metrics.surface_dice(pred, gt) == pytest.approx((8 * s - 8) / (8 * s - 7))
    reference = surface_distance.compute_surface_distances(gt, pred, (1.0, 1.0))
    assert metrics.surface_dice(pred, gt, subvoxels=True) == pytest.approx(
        surface_distance.compute_surface_dice_at_tolerance(reference, 2.0), abs=FLOAT32)
    # The pixel is the single farthest of 4s - 3 edge pixels (< 5%): beyond the 95th percentile.
    assert metrics.hd95(pred, gt) == 0.0 and metrics.hd95(pred, gt, convention="seed") == 0.0
    assert metrics.hausdorff_distance(pred, gt, 100) == pytest.approx(math.hypot(16, 16), rel=FLOAT32)


def test_single_pixel_masks():
    gt = square((9, 9), 2, 2, 1)
    pred = square((9, 9), 5, 6, 1)
    assert metrics.hd95(pred, gt) == pytest.approx(5.0)
    assert metrics.hd95(pred, gt, convention="seed") == pytest.approx(5.0)
    assert metrics.dice(pred, gt) == 0.0 and metrics.surface_dice(pred, gt) == 0.0
    assert metrics.hd95(gt, gt) == 0.0 and metrics.dice(gt, gt) == 1.0
    assert metrics.hd95(gt, gt, convention="seed") == 0.0 and metrics.surface_dice(gt, gt, 0.0) == 1.0


# ---------------------------------------------------------------------------
# empty masks, aggregation, inputs


def test_empty_cases_are_never_perfect():
    empty = np.zeros((16, 16), dtype=bool)
    full = square((16, 16), 4, 4, 5)
    assert metrics.dice(empty, full) == 0.0 and metrics.iou(empty, full) == 0.0
    assert metrics.dice(full, empty) == 0.0 and metrics.iou(full, empty) == 0.0
    assert metrics.surface_dice(empty, full) == 0.0 and metrics.surface_dice(full, empty) == 0.0
    assert metrics.surface_dice(empty, full, subvoxels=True) == 0.0
    assert math.isnan(metrics.dice(empty, empty)) and math.isnan(metrics.iou(empty, empty))
    assert math.isnan(metrics.surface_dice(empty, empty))
    for pred, gt in [(empty, full), (full, empty), (empty, empty)]:
        for convention in metrics.HD95_CONVENTIONS:
            assert math.isnan(metrics.hd95(pred, gt, convention=convention))
    with pytest.raises(ValueError, match="non-empty"):
        metrics.boundary_distances(empty, full)


def test_evaluate_and_summarize_count_undefined_and_pool():
    shape = (20, 20)
    empty = np.zeros(shape, dtype=bool)
    big = square(shape, 0, 0, 10)         # 100 pixels, predicted exactly: Dice 1
    small = square(shape, 15, 15, 2)      # 4 pixels, missed: Dice 0
    fp = square(shape, 5, 5, 3)           # 9 pixels predicted where nothing is
    preds = np.stack([big, empty, empty, fp])
    gts = np.stack([big, small, empty, empty])
    records = metrics.evaluate_masks(preds, gts)
    assert set(records[0]) == {"dice", "iou", "hd95", "hd95_seed", "surface_dice", "pred_empty", "gt_empty",
                               "pred_pixels", "gt_pixels", "intersection"}
    assert [r["dice"] for r in records][:2] == [1.0, 0.0]
    assert math.isnan(records[2]["dice"]) and records[3]["dice"] == 0.0
    assert [r["surface_dice"] for r in records][:2] == [1.0, 0.0]
    assert math.isnan(records[2]["surface_dice"]) and records[3]["surface_dice"] == 0.0
    assert records[1]["pred_empty"] and not records[1]["gt_empty"]
    assert (records[0]["pred_pixels"], records[0]["gt_pixels"], records[0]["intersection"]) == (100, 100, 100)

    summary = metrics.summarize(records)
    assert summary["n"] == 4
    assert summary["n_pred_empty"] == 2 and summary["n_gt_empty"] == 2
    assert summary["dice_defined"] == 3 and summary["dice_undefined"] == 1
    assert summary["dice_mean"] == pytest.approx(1 / 3)
    assert summary["dice_std"] == pytest.approx(np.std([1.0, 0.0, 0.0]))
    assert summary["surface_dice_defined"] == 3 and summary["surface_dice_mean"] == pytest.approx(1 / 3)
    # Pooled Dice is dominated by the large object: 2 * 100 / (109 + 104).
    assert summary["dice_pooled"] == pytest.approx(200 / 213)
    # Only image 0 has both masks non-empty.
    for name in ("hd95", "hd95_seed"):
        assert summary[f"{name}_defined"] == 1 and summary[f"{name}_undefined"] == 3
        assert summary[f"{name}_mean"] == 0.0 and summary[f"{name}_std"] == 0.0


def test_evaluate_masks_equals_the_per_image_functions():
    pairs = random_pairs()[:20]
    preds, gts = np.stack([p for p, _ in pairs]), np.stack([g for _, g in pairs])
    spacing, tolerance = (1.5, 1.0), 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MONAI's warnings (empty masks, deprecations) must not leak out
        records = metrics.evaluate_masks(torch.from_numpy(preds), gts, spacing=spacing, tolerance=tolerance)
    for record, (pred, gt) in zip(records, pairs):
        assert record["dice"] == metrics.dice(pred, gt) and record["iou"] == metrics.iou(pred, gt)
        assert record["hd95"] == metrics.hd95(pred, gt, spacing)
        assert record["hd95_seed"] == metrics.hd95(pred, gt, spacing, convention="seed")
        assert record["surface_dice"] == metrics.surface_dice(pred, gt, tolerance, spacing)
    assert metrics.evaluate_masks(np.zeros((0, 8, 8)), np.zeros((0, 8, 8))) == []


def test_torch_thread_count_is_restored():
    threads = torch.get_num_threads()
    pred, gt = random_pairs()[0]
    metrics.evaluate_masks(pred[None], gt[None])
    assert torch.get_num_threads() == threads


def test_summarize_with_nothing_defined_is_nan_not_error():
    empty = np.zeros((1, 8, 8), dtype=bool)
    summary = metrics.summarize(metrics.evaluate_masks(empty, empty))
    assert math.isnan(summary["dice_mean"]) and math.isnan(summary["hd95_std"])
    assert math.isnan(summary["surface_dice_mean"]) and math.isnan(summary["hd95_seed_mean"])
    assert math.isnan(summary["dice_pooled"]) and summary["dice_undefined"] == 1


def test_invalid_arguments_are_errors():
    mask = square((8, 8), 2, 2, 3)
    with pytest.raises(ValueError, match="shape"):
        metrics.dice(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="2-D"):
        metrics.hd95(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="convention"):
        metrics.hd95(mask, mask, convention="medpy")
    with pytest.raises(ValueError, match="percentile"):
        metrics.hausdorff_distance(mask, mask, 101)
    with pytest.raises(ValueError, match="tolerance"):
        metrics.surface_dice(mask, mask, -1.0)
    with pytest.raises(ValueError, match="spacing"):
        metrics.hd95(mask, mask, spacing=0.0)
    with pytest.raises(ValueError, match="shape"):
        metrics.evaluate_masks(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
