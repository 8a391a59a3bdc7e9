"""Tests for guided_diffusion.lesion_metrics: BraTS 2023 lesion-wise Dice / HD95 and detection counts.

Hand-made volumes whose scores follow in closed form (one-voxel-thick plates: every voxel is an edge
voxel, so every boundary distance is a count of voxels times the spacing), and random volumes
against an independent, whole-volume implementation of the evaluator's steps: with this project's
HD95 every field must agree; with DeepMind's `surface-distance` HD95 (the evaluator's own) Dice
agrees exactly and HD95 within the bound measured here.
"""

import math

import numpy as np
import pytest
from scipy import ndimage

from guided_diffusion.cli import UserError
from guided_diffusion.lesion_metrics import (BRATS_HD95_PENALTY, LESION_FIELDS, lesion_wise_scores,
                                             reference_lesions, summarise_lesion_rows)
from guided_diffusion.metrics import hd95_3d

SHAPE = (24, 40, 40)
FLOAT32 = 1e-5  # MONAI's distances are float32
# `surface-distance` HD95 minus ours on the random volumes below (29 matched lesions, 8 scans at 1 mm
# and 1.5 x 1 x 0.8 mm): per lesion mean 0.46 mm, largest 2.75 mm; per scan (diluted by the
# 374 mm penalties) mean 0.14 mm, largest 0.36 mm. The bounds sit just above.
LESION_HD95_BOUND, SCAN_HD95_BOUND = 3.0, 0.5
# surface-distance imports from scipy.ndimage namespaces that scipy has deprecated
pytestmark = pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")
P = BRATS_HD95_PENALTY
assert P == 374.0


def empty():
    return np.zeros(SHAPE, bool)


def plate(z, rows=(5, 25), cols=(5, 25)):
    """A one-voxel-thick 20 x 20 plate (400 voxels) in slice z."""
    mask = empty()
    mask[z, rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


def cube(corner, side):
    mask = empty()
    z, r, c = corner
    mask[z:z + side, r:r + side, c:c + side] = True
    return mask


def scores(pred, gt, spacing=(1.0, 1.0, 1.0), **kw):
    return lesion_wise_scores(pred, gt, spacing, **kw)


# ---------------------------------------------------------------------------
# closed forms


def test_one_lesion_half_covered():
    gt = plate(10)
    pred = plate(10, cols=(5, 15))  # the left half: 200 of 400 voxels
    # GT -> prediction: 200 zeros and 20 voxels at each of 1..10 columns; prediction -> GT: all 0.
    # 95th percentile, linear: rank 0.95 * 399 = 379.05 between 9 (ranks 360..379) and 10.
    for spacing, column in (((1.0, 1.0, 1.0), 1.0), ((2.0, 1.0, 0.5), 0.5), ((1.0, 3.0, 2.0), 2.0)):
        s = scores(pred, gt, spacing)
        assert s["dice"] == pytest.approx(2 * 200 / 600, abs=1e-12)
        assert s["hd95_mm"] == pytest.approx(9.05 * column, abs=FLOAT32)
        assert (s["n_reference_lesions"], s["n_detected_lesions"], s["n_false_positive_components"],
                s["false_positive_voxels"], s["tumour_found"]) == (1, 1, 0, 0, True)
        assert s["lesions"][0]["hd95_mm"] == pytest.approx(hd95_3d(pred, gt, spacing), abs=1e-12)


def test_two_lesions_one_missed():
    gt = plate(4) | cube((15, 30, 30), 4)  # 400 voxels and 64 voxels (> 50)
    s = scores(plate(4), gt)
    assert s["dice"] == pytest.approx((1 + 0) / 2)
    assert s["hd95_mm"] == pytest.approx((0 + P) / 2)
    assert (s["n_reference_lesions"], s["n_detected_lesions"], s["n_false_positive_components"]) == (2, 1, 0)
    assert s["tumour_found"] is True
    assert [lesion["dice"] for lesion in s["lesions"]] == [1.0, 0.0]


def test_one_false_positive_component():
    pred = plate(4) | cube((15, 30, 30), 3)  # the exact lesion and 27 voxels far from it
    s = scores(pred, plate(4))
    assert s["dice"] == pytest.approx(1 / 2)
    assert s["hd95_mm"] == pytest.approx(P / 2)
    assert (s["n_reference_lesions"], s["n_detected_lesions"], s["n_false_positive_components"],
            s["false_positive_voxels"]) == (1, 1, 1, 27)
    # two false positives, one lesion half covered
    pred = plate(10, cols=(5, 15)) | cube((15, 30, 30), 3) | cube((0, 0, 30), 2)
    s = scores(pred, plate(10))
    assert s["dice"] == pytest.approx((2 / 3) / 3)
    assert s["hd95_mm"] == pytest.approx((9.05 + 2 * P) / 3, abs=FLOAT32)
    assert (s["n_false_positive_components"], s["false_positive_voxels"]) == (2, 27 + 8)


def test_empty_cases():
    s = scores(empty(), empty())
    assert (s["dice"], s["hd95_mm"], s["tumour_found"]) == (1.0, 0.0, None)
    assert (s["n_reference_lesions"], s["n_detected_lesions"], s["n_false_positive_components"],
            s["false_positive_voxels"], s["lesions"]) == (0, 0, 0, 0, [])
    s = scores(cube((3, 3, 3), 2), empty())  # prediction only: one false positive
    assert (s["dice"], s["hd95_mm"], s["tumour_found"], s["false_positive_voxels"]) == (0.0, P, None, 8)
    s = scores(empty(), plate(4))  # reference only: one missed lesion
    assert (s["dice"], s["hd95_mm"], s["tumour_found"], s["n_detected_lesions"]) == (0.0, P, False, 0)


def test_small_lesions_are_ignored_but_do_not_make_false_positives():
    small = cube((15, 30, 30), 3)  # 27 voxels: 27 mm^3 <= 50 at 1 mm
    s = scores(plate(4), plate(4) | small)
    assert (s["dice"], s["hd95_mm"]) == (1.0, 0.0)
    assert (s["n_reference_lesions"], s["n_ignored_lesions"]) == (1, 1)
    assert [lesion["counted"] for lesion in s["lesions"]] == [True, False]
    s = scores(plate(4) | small, plate(4) | small)  # its prediction is no false positive either
    assert (s["dice"], s["n_false_positive_components"], s["n_detected_lesions"]) == (1.0, 0, 1)
    # the threshold is a volume in mm^3 and strict: 27 voxels of 2 mm^3 = 54 mm^3 count
    s = scores(plate(4), plate(4) | small, spacing=(2.0, 1.0, 1.0))
    assert s["n_reference_lesions"] == 2 and s["dice"] == pytest.approx(0.5)
    edge = empty()
    edge[15:17, 30:35, 30:35] = True  # exactly 50 voxels: ignored; 51: counted
    assert scores(empty(), edge)["n_ignored_lesions"] == 1 and scores(empty(), edge)["dice"] == 1.0
    edge[16, 35, 30] = True
    assert scores(empty(), edge)["n_reference_lesions"] == 1 and scores(empty(), edge)["dice"] == 0.0
    # a scan whose only lesion is small: nothing counted, but the tumour is found or missed
    assert scores(small, small)["tumour_found"] is True and scores(empty(), small)["tumour_found"] is False
    assert scores(empty(), small, min_lesion_volume=0)["dice"] == 0.0


def test_matching_reaches_three_voxels_around_a_lesion():
    gt = plate(10)
    for shift in (1, 2, 3):  # no overlap, but inside the 3-voxel neighbourhood: matched, Dice 0
        for spacing in ((1.0, 1.0, 1.0), (2.5, 1.0, 1.0)):
            s = scores(plate(10 + shift), gt, spacing)
            assert (s["dice"], s["n_detected_lesions"], s["n_false_positive_components"]) == (0.0, 1, 0)
            assert s["hd95_mm"] == pytest.approx(shift * spacing[0], abs=FLOAT32)
    s = scores(plate(14), gt)  # 4 voxels away: a missed lesion and a false positive
    assert (s["dice"], s["hd95_mm"], s["n_detected_lesions"], s["n_false_positive_components"]) == (0.0, P, 0, 1)
    assert s["tumour_found"] is False
    s = scores(plate(14), gt, dilation=4)
    assert s["hd95_mm"] == pytest.approx(4.0, abs=FLOAT32) and s["n_false_positive_components"] == 0


def test_nearby_parts_merge_into_one_lesion():
    for gap, lesions in ((6, 1), (7, 2)):  # 3 + 3 dilated voxels close a gap of 6, not of 7
        gt = plate(2) | plate(3 + gap)
        assert reference_lesions(gt)[1] == lesions
        assert reference_lesions(gt, dilation=0)[1] == 2
        s = scores(plate(2), gt)  # the first part predicted exactly
        if lesions == 1:  # one lesion of 800 voxels, half found
            assert s["dice"] == pytest.approx(2 * 400 / 1200)
            assert s["n_reference_lesions"] == 1 and s["tumour_found"] is True
            # the missing part is `gap + 1` slices away from every predicted voxel
            assert s["hd95_mm"] == pytest.approx(gap + 1, abs=FLOAT32)
        else:
            assert (s["dice"], s["hd95_mm"], s["n_reference_lesions"]) == (0.5, P / 2, 2)
    merged = scores(plate(2), plate(2) | plate(9), dilation=0)
    assert (merged["dice"], merged["n_reference_lesions"]) == (0.5, 2)


def test_a_component_spanning_two_lesions_is_matched_to_both():
    gt = plate(2) | plate(12)
    pred = np.zeros(SHAPE, bool)
    pred[2:13, 10:12, 10:12] = True  # a 11 x 2 x 2 bar through both plates
    s = scores(pred, gt)
    assert s["n_reference_lesions"] == 2 and s["n_detected_lesions"] == 2 and s["n_false_positive_components"] == 0
    expected = 2 * 4 / (44 + 400)  # each plate against the whole bar
    assert [lesion["dice"] for lesion in s["lesions"]] == [pytest.approx(expected)] * 2
    assert s["dice"] == pytest.approx(expected)


def test_diagonal_contact_is_one_component():
    pred = empty()
    pred[5, 5, 5] = pred[6, 6, 6] = True  # corner neighbours: one 26-connected component
    assert scores(pred, empty())["n_false_positive_components"] == 1


def test_bad_inputs_raise_user_errors():
    with pytest.raises(UserError, match="shape"):
        lesion_wise_scores(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(UserError, match="3-D"):
        lesion_wise_scores(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(UserError, match="spacing"):
        lesion_wise_scores(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1.0, 0.0, 1.0))
    with pytest.raises(UserError, match="spacing"):
        lesion_wise_scores(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1.0, 1.0))
    with pytest.raises(UserError, match="dilation"):
        lesion_wise_scores(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), dilation=-1)
    with pytest.raises(UserError, match="min_lesion_volume"):
        lesion_wise_scores(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), min_lesion_volume=float("nan"))


# ---------------------------------------------------------------------------
# an independent implementation of the evaluator's steps, on whole volumes


def evaluator_steps(pred, gt, spacing, dilation=3, threshold=50.0, hd95=None):
    """The BraTS 2023 evaluator's algorithm written out on whole volumes, one lesion at a time.

    `hd95(pred, gt)` gives a matched lesion's distance (inf for a missed one is replaced by the penalty).
    """
    full = np.ones((3, 3, 3), bool)
    element = ndimage.generate_binary_structure(3, 2)
    grow = (lambda m: ndimage.binary_dilation(m, element, iterations=dilation)) if dilation else (lambda m: m)
    grown_labels, n_grown = ndimage.label(grow(gt), full)
    lesion_labels = grown_labels * gt
    pred_labels, n_pred = ndimage.label(pred, full)
    voxel = spacing[0] * spacing[1] * spacing[2]
    claimed, table = set(), []
    for k in range(1, n_grown + 1):
        lesion = lesion_labels == k
        hits = sorted(set(np.unique(pred_labels[grow(lesion)]).tolist()) - {0})
        claimed.update(hits)
        found = np.isin(pred_labels, hits)
        d = 2.0 * np.sum(found & lesion) / (np.sum(found) + np.sum(lesion))
        h = hd95(found, lesion) if hits else math.inf
        table.append((np.sum(lesion) * voxel, d, P if math.isinf(h) else h, bool(hits)))
    false_positives = [c for c in range(1, n_pred + 1) if c not in claimed]
    kept = [row for row in table if row[0] > threshold]
    n = len(kept) + len(false_positives)
    return {"dice": sum(r[1] for r in kept) / n if n else 1.0,
            "hd95_mm": (sum(r[2] for r in kept) + P * len(false_positives)) / n if n else 0.0,
            "n_reference_lesions": len(kept), "n_ignored_lesions": len(table) - len(kept),
            "n_detected_lesions": sum(r[3] for r in kept),
            "n_false_positive_components": len(false_positives),
            "false_positive_voxels": int(np.isin(pred_labels, false_positives).sum()),
            "tumour_found": any(r[3] for r in table) if table else None,
            "lesions": [{"dice": r[1], "hd95_mm": r[2], "matched": r[3]} for r in table]}


def random_pair(rng, shape=(28, 44, 44)):
    """A reference of several blobs and a prediction that shares part of it, misses some, adds some."""
    base = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5)
    gt = base > np.quantile(base, 0.93)
    other = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    shift = tuple(int(v) for v in rng.integers(-1, 2, size=3))
    pred = np.roll(base, shift, axis=(0, 1, 2)) + 0.3 * other * base.std() / other.std() > np.quantile(base, 0.93)
    return pred, gt


def test_random_volumes_match_the_evaluator_steps():
    rng = np.random.default_rng(7)
    checked = 0
    for i in range(12):
        pred, gt = random_pair(rng)
        spacing = ((1.0, 1.0, 1.0), (1.5, 1.0, 0.8))[i % 2]
        for dilation, threshold in ((3, 50.0), (1, 2.0), (0, 10.0)):
            ours = lesion_wise_scores(pred, gt, spacing, dilation=dilation, min_lesion_volume=threshold)
            expected = evaluator_steps(pred, gt, spacing, dilation, threshold,
                                       hd95=lambda p, g: hd95_3d(p, g, spacing))
            assert ours["tumour_found"] is expected["tumour_found"]
            for key in LESION_FIELDS[:-1]:
                assert ours[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key
            checked += ours["n_reference_lesions"] + ours["n_false_positive_components"]
    assert checked > 100  # many lesions and false positives, not a few trivial cases


def test_hd95_against_the_evaluators_surface_distance():
    """The evaluator's own HD95 (DeepMind's `surface-distance`): Dice equal, HD95 close (measured)."""
    surface_distance = pytest.importorskip("surface_distance")
    if not hasattr(np, "Inf"):
        np.Inf = np.inf

    def robust_hd95(spacing):
        return lambda p, g: surface_distance.compute_robust_hausdorff(
            surface_distance.compute_surface_distances(g, p, spacing), 95)

    rng = np.random.default_rng(11)
    lesions, scans = [], []
    for i in range(8):
        pred, gt = random_pair(rng)
        spacing = ((1.0, 1.0, 1.0), (1.5, 1.0, 0.8))[i % 2]
        ours = lesion_wise_scores(pred, gt, spacing)
        theirs = evaluator_steps(pred, gt, spacing, hd95=robust_hd95(spacing))
        assert ours["dice"] == pytest.approx(theirs["dice"], abs=1e-12)
        assert ours["n_false_positive_components"] == theirs["n_false_positive_components"]
        scans.append(ours["hd95_mm"] - theirs["hd95_mm"])
        for mine, reference in zip(ours["lesions"], theirs["lesions"], strict=True):
            if reference["matched"]:
                lesions.append(mine["hd95_mm"] - reference["hd95_mm"])
    lesions, scans = np.abs(lesions), np.abs(scans)
    print(f"{lesions.size} matched lesions: |HD95 difference| mean {lesions.mean():.3f} mm, "
          f"largest {lesions.max():.3f} mm; per scan mean {scans.mean():.3f} mm, largest {scans.max():.3f} mm")
    assert lesions.size >= 15
    assert lesions.max() <= LESION_HD95_BOUND and lesions.mean() <= 0.6 and scans.max() <= SCAN_HD95_BOUND


# ---------------------------------------------------------------------------
# the scans' summary


def test_summarise_lesion_rows():
    rows = [{"scan": "a", **{f"lesion_{k}": v for k, v in scores(plate(4), plate(4) | cube((15, 30, 30), 4)).items()}},
            {"scan": "b", **{f"lesion_{k}": v for k, v in scores(cube((15, 30, 30), 3), empty()).items()}},
            {"scan": "c", **{f"lesion_{k}": v for k, v in scores(empty(), plate(4)).items()}},
            {"scan": "d"}]  # no reference: left out
    out = summarise_lesion_rows(rows)
    assert out["lesion_scans"] == 3 and out["lesion_scans_with_tumour"] == 2 and out["lesion_scans_tumour_missed"] == 1
    assert out["lesion_dice_mean"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert out["lesion_hd95_mm_mean"] == pytest.approx((P / 2 + P + P) / 3)
    assert out["lesion_dice_std"] == pytest.approx(np.std([0.5, 0, 0]))
    assert (out["lesion_reference_lesions"], out["lesion_detected_lesions"], out["lesion_false_positive_components"]) \
        == (3, 1, 1)
    assert (out["lesion_false_positive_voxels_total"], out["lesion_false_positive_voxels_mean"]) == (27, 9.0)
    assert summarise_lesion_rows([{"scan": "d"}]) == {}
