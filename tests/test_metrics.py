"""Tests for guided_diffusion.metrics: post-processing, Dice / IoU / HD95, aggregation.

HD95 is checked three ways: exactly against a brute-force implementation of the
documented convention, against closed forms, and against DeepMind's
`surface-distance` (exact for Dice; for distances, within the bound that
follows from its corner-based contours).
"""

import math

import numpy as np
import pytest
from scipy import ndimage
from skimage.filters import threshold_otsu

from guided_diffusion import metrics

surface_distance = pytest.importorskip("surface_distance")
if not hasattr(np, "Inf"):  # surface-distance still uses the pre-numpy-2 alias for empty masks
    np.Inf = np.inf

# surface-distance imports from scipy.ndimage namespaces that scipy has deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")

N_PAIRS = 120


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


# ---------------------------------------------------------------------------
# independent reference for the documented HD95 convention


def brute_force_boundary(mask):
    """Pixels of `mask` with a 4-neighbour outside the mask (outside the image counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[1:-1, 1:-1]
    all_neighbours_inside = (padded[:-2, 1:-1] & padded[2:, 1:-1]
                             & padded[1:-1, :-2] & padded[1:-1, 2:])
    return np.argwhere(inner & ~all_neighbours_inside).astype(float)


def brute_force_hd(pred, gt, percent=95):
    a, b = brute_force_boundary(pred), brute_force_boundary(gt)
    pairwise = np.hypot(a[:, None, 0] - b[None, :, 0], a[:, None, 1] - b[None, :, 1])

    def directed(distances):
        ordered = np.sort(distances)
        rank = max(-(-percent * len(ordered) // 100), 1)  # exact integer ceil
        return ordered[rank - 1]

    return max(directed(pairwise.min(axis=1)), directed(pairwise.min(axis=0)))


def test_random_masks_touch_the_border_and_have_several_components():
    # The cross-checks below are only meaningful if these cases occur.
    pairs = random_pairs()
    touching = sum(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()
                   for pair in pairs for m in pair)
    multi = sum(ndimage.label(m)[1] > 1 for pair in pairs for m in pair)
    assert touching > N_PAIRS and multi > N_PAIRS // 2


def test_hd_matches_brute_force_exactly():
    for pred, gt in random_pairs():
        assert metrics.hd95(pred, gt) == pytest.approx(brute_force_hd(pred, gt, 95), abs=1e-12)
        assert metrics.hausdorff_distance(pred, gt, 100) == pytest.approx(
            brute_force_hd(pred, gt, 100), abs=1e-12)


def test_dice_matches_surface_distance_exactly():
    for pred, gt in random_pairs():
        expected = surface_distance.compute_dice_coefficient(gt, pred)
        assert metrics.dice(pred, gt) == pytest.approx(expected, abs=1e-12)
        # IoU from Dice: J = D / (2 - D).
        assert metrics.iou(pred, gt) == pytest.approx(expected / (2 - expected), abs=1e-12)


def test_hausdorff_within_corner_bound_of_surface_distance():
    # surface-distance's contour points are pixel corners; each of our boundary
    # pixels is within sqrt(2)/2 of one of its contour corners and vice versa,
    # so the classical Hausdorff distances differ by at most sqrt(2).
    differences = []
    for pred, gt in random_pairs():
        reference = surface_distance.compute_surface_distances(gt, pred, (1.0, 1.0))
        ours = metrics.hausdorff_distance(pred, gt, 100)
        assert abs(ours - surface_distance.compute_robust_hausdorff(reference, 100)) <= math.sqrt(2) + 1e-9
        differences.append(metrics.hd95(pred, gt)
                           - surface_distance.compute_robust_hausdorff(reference, 95))
    # HD95 has no such bound (contour weights move the 5% tail), but it agrees closely on average.
    differences = np.abs(differences)
    assert np.median(differences) < 0.75 and differences.mean() < 0.75


def test_hd_spacing_scales_distances():
    pred, gt = random_pairs()[3]
    assert metrics.hd95(pred, gt, spacing=2.5) == pytest.approx(2.5 * metrics.hd95(pred, gt))
    # Anisotropic spacing: the reference on a grid with rows stretched by 2.
    a, b = brute_force_boundary(pred), brute_force_boundary(gt)
    a[:, 0] *= 2.0
    b[:, 0] *= 2.0
    pairwise = np.hypot(a[:, None, 0] - b[None, :, 0], a[:, None, 1] - b[None, :, 1])
    expected = max(metrics.percentile_inverted_cdf(pairwise.min(axis=1), 95),
                   metrics.percentile_inverted_cdf(pairwise.min(axis=0), 95))
    assert metrics.hd95(pred, gt, spacing=(2.0, 1.0)) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------
# closed forms


@pytest.mark.parametrize("top, left", [(10, 4), (0, 0)])  # (0, 0): both squares touch the image edge
def test_squares_offset_by_k(top, left):
    side, k, shape = 40, 3, (64, 64)
    gt = square(shape, top, left, side)
    pred = square(shape, top, left + k, side)
    assert metrics.dice(pred, gt) == pytest.approx((side - k) / side)
    assert metrics.iou(pred, gt) == pytest.approx((side - k) / (side + k))
    # Every boundary pixel is within k of the other boundary and the far side
    # (side pixels, > 5%) is exactly k away. A whole-mask distance would give 2.
    assert metrics.hd95(pred, gt) == pytest.approx(k)
    assert metrics.hausdorff_distance(pred, gt, 100) == pytest.approx(k)
    reference = surface_distance.compute_surface_distances(gt, pred, (1.0, 1.0))
    assert surface_distance.compute_robust_hausdorff(reference, 95) == pytest.approx(k)


def test_nested_squares_take_the_larger_directed_percentile():
    # Inner square side L=10 inside a concentric square with margin m=4.
    # inner -> outer: all 36 boundary pixels at distance 4.
    # outer -> inner: 40 pixels at 4, per corner 2 each at sqrt(16 + j^2), j=1..3, and one at sqrt(32):
    # 68 pixels, rank ceil(0.95 * 68) = 65 -> sqrt(32). (The union of both sets would give 5.)
    shape = (32, 32)
    inner = square(shape, 10, 10, 10)
    outer = square(shape, 6, 6, 18)
    assert metrics.hd95(inner, outer) == pytest.approx(math.sqrt(32))
    assert metrics.hd95(outer, inner) == pytest.approx(math.sqrt(32))
    assert metrics.dice(inner, outer) == pytest.approx(2 * 100 / (100 + 324))
    assert metrics.iou(inner, outer) == pytest.approx(100 / 324)
    np.testing.assert_allclose(np.sort(metrics.directed_boundary_distances(inner, outer)), np.full(36, 4.0))


def test_single_pixel_masks():
    gt = square((9, 9), 2, 2, 1)
    pred = square((9, 9), 5, 6, 1)
    assert metrics.hd95(pred, gt) == pytest.approx(5.0)
    assert metrics.dice(pred, gt) == 0.0
    assert metrics.hd95(gt, gt) == 0.0 and metrics.dice(gt, gt) == 1.0


def test_percentile_inverted_cdf_rank():
    values = np.arange(1, 21, dtype=float)  # 0.95 * 20 = 19 exactly: the 19th value, not the 20th
    assert metrics.percentile_inverted_cdf(values, 95) == 19.0
    assert metrics.percentile_inverted_cdf(values[:19], 95) == 19.0  # ceil(18.05) = 19
    assert metrics.percentile_inverted_cdf(values, 0) == 1.0
    assert metrics.percentile_inverted_cdf(values, 100) == 20.0


def test_dice_3d_closed_form():
    pred = np.zeros((10, 10, 10), dtype=bool)
    gt = np.zeros_like(pred)
    pred[0:4, 0:4, 0:4] = True   # 64 voxels
    gt[2:6, 0:4, 0:4] = True     # 64 voxels, 32 shared
    assert metrics.dice_3d(pred, gt) == pytest.approx(0.5)
    assert math.isnan(metrics.dice_3d(np.zeros_like(pred), np.zeros_like(gt)))


# ---------------------------------------------------------------------------
# empty masks and aggregation


def test_empty_cases_are_never_perfect():
    empty = np.zeros((16, 16), dtype=bool)
    full = square((16, 16), 4, 4, 5)
    assert metrics.dice(empty, full) == 0.0 and metrics.iou(empty, full) == 0.0
    assert metrics.dice(full, empty) == 0.0
    assert math.isnan(metrics.dice(empty, empty)) and math.isnan(metrics.iou(empty, empty))
    for pred, gt in [(empty, full), (full, empty), (empty, empty)]:
        assert math.isnan(metrics.hd95(pred, gt))


def test_evaluate_and_summarize_count_undefined_and_pool():
    shape = (20, 20)
    empty = np.zeros(shape, dtype=bool)
    big = square(shape, 0, 0, 10)         # 100 pixels, predicted exactly: Dice 1
    small = square(shape, 15, 15, 2)      # 4 pixels, missed: Dice 0
    fp = square(shape, 5, 5, 3)           # 9 pixels predicted where nothing is
    preds = np.stack([big, empty, empty, fp])
    gts = np.stack([big, small, empty, empty])
    records = metrics.evaluate_masks(preds, gts)
    assert [r["dice"] for r in records][:2] == [1.0, 0.0]
    assert math.isnan(records[2]["dice"]) and records[3]["dice"] == 0.0
    assert records[1]["pred_empty"] and not records[1]["gt_empty"]
    assert (records[0]["pred_pixels"], records[0]["gt_pixels"], records[0]["intersection"]) == (100, 100, 100)

    summary = metrics.summarize(records)
    assert summary["n"] == 4
    assert summary["n_pred_empty"] == 2 and summary["n_gt_empty"] == 2
    assert summary["dice_defined"] == 3 and summary["dice_undefined"] == 1
    assert summary["dice_mean"] == pytest.approx(1 / 3)
    assert summary["dice_std"] == pytest.approx(np.std([1.0, 0.0, 0.0]))
    # Pooled Dice is dominated by the large object: 2 * 100 / (109 + 104).
    assert summary["dice_pooled"] == pytest.approx(200 / 213)
    # Only image 0 has both masks non-empty.
    assert summary["hd95_defined"] == 1 and summary["hd95_undefined"] == 3
    assert summary["hd95_mean"] == 0.0 and summary["hd95_std"] == 0.0


def test_summarize_with_nothing_defined_is_nan_not_error():
    empty = np.zeros((1, 8, 8), dtype=bool)
    summary = metrics.summarize(metrics.evaluate_masks(empty, empty))
    assert math.isnan(summary["dice_mean"]) and math.isnan(summary["hd95_std"])
    assert math.isnan(summary["dice_pooled"]) and summary["dice_undefined"] == 1


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        metrics.dice(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="2-D"):
        metrics.hd95(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))
