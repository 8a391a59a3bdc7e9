"""The whole-scan decision (segment/scan_decision.py) on hand-made evidence whose answer is known."""

import numpy as np
import pytest

from guided_diffusion.segment.postprocess import MaskOptions
from guided_diffusion.segment.scan_decision import (ScanDecision, ScanEvidence, candidate_decisions,
                                                    choose_scan_decision, decide, hysteresis_slices,
                                                    keep_supported_components, slice_label_score, volume_dice)

SIZE = 32
OPTIONS = MaskOptions(positive_part=True, smooth_sigma=1.0)


def brain_stack(n, radii=None):
    """Images (n, 1, S, S) of a disc of brain (value 0) on background (-1); radii per slice (default 12)."""
    yy, xx = np.mgrid[:SIZE, :SIZE] - SIZE / 2 + 0.5
    radii = np.full(n, 12.0) if radii is None else np.asarray(radii, float)
    images = np.full((n, 1, SIZE, SIZE), -1.0, np.float32)
    for z, r in enumerate(radii):
        images[z, 0][xx ** 2 + yy ** 2 <= r ** 2] = 0.0
    return images


def lesion_maps(n, lesion_slices, centre=(16, 16), radius=3, seed=0):
    """Maps: weak noise everywhere, a bright disc at `centre` on `lesion_slices`; and the reference masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2
    maps = 0.05 * rng.standard_normal((n, SIZE, SIZE)).astype(np.float32)
    reference = np.zeros((n, SIZE, SIZE), bool)
    for z in lesion_slices:
        maps[z][disc] += 1.0
        reference[z] = disc
    return maps, reference


VOLUME = ScanDecision(rule="volume", seed_probability=0.3, grow_probability=0.05, edge_fraction=0.5,
                      edge_seed_probability=0.99, min_lesion_fraction=0.0005)


def test_small_lesion_under_the_slice_threshold_is_found_by_the_volume_rule():
    n = 24
    maps, reference = lesion_maps(n, range(10, 14))
    probability = np.full(n, 0.01)
    probability[10:14] = [0.08, 0.35, 0.3, 0.1]  # under the slice gate's 0.5, one contiguous run
    evidence = ScanEvidence(maps, probability, brain_stack(n))
    sliced, _ = decide(evidence, ScanDecision(rule="slices", threshold=0.5), OPTIONS)
    volume, segmented = decide(evidence, VOLUME, OPTIONS)
    assert not sliced.any()
    assert segmented.tolist() == [10 <= z < 14 for z in range(n)]  # the run's doubtful ends are grown into
    assert volume_dice(volume, reference) > 0.8


def test_healthy_scan_with_confident_edge_slices_gets_nothing():
    n = 24
    radii = np.concatenate([[4, 5, 6], np.full(n - 6, 12.0), [6, 5, 4]])  # the brain's base and vertex are small
    maps, _ = lesion_maps(n, [])
    maps[:3] += lesion_maps(3, range(3), centre=(16, 16), radius=2)[0]  # the vertex's map lights up
    probability = np.full(n, 0.02)
    probability[:3] = 0.95  # as the classifier does on slices unlike its training slices
    evidence = ScanEvidence(maps, probability, brain_stack(n, radii))
    masks, segmented = decide(evidence, VOLUME, OPTIONS)
    assert not segmented.any() and not masks.any()
    sliced, _ = decide(evidence, ScanDecision(rule="slices", threshold=0.5), OPTIONS)
    assert sliced[:3].any()  # the slice gate marks them


def test_tumour_at_the_top_slices_is_kept_when_strongly_supported():
    n = 24
    radii = np.concatenate([np.full(n - 3, 12.0), [6, 5, 4]])
    maps, reference = lesion_maps(n, range(n - 3, n), radius=2)
    probability = np.full(n, 0.02)
    probability[n - 3:] = 0.999
    masks, segmented = decide(ScanEvidence(maps, probability, brain_stack(n, radii)), VOLUME, OPTIONS)
    assert segmented[n - 3:].all() and not segmented[:n - 3].any()
    assert volume_dice(masks, reference) > 0.7


def test_speck_components_and_components_away_from_seeds_are_dropped():
    masks = np.zeros((6, 10, 10), bool)
    masks[1:4, 2:5, 2:5] = True  # 27 voxels through a seed slice
    masks[1, 8, 8] = True  # a one-voxel speck on the seed slice
    masks[5, 6:9, 6:9] = True  # 9 voxels on a slice no seed reaches
    seeds = np.array([False, False, True, False, False, False])
    kept = keep_supported_components(masks, seeds, min_pixels=2)
    expected = np.zeros_like(masks)
    expected[1:4, 2:5, 2:5] = True
    assert np.array_equal(kept, expected)
    # diagonal neighbours across slices are one component (26-connectivity)
    diagonal = np.zeros((2, 3, 3), bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = True
    assert keep_supported_components(diagonal, np.array([True, False]), 2).sum() == 2


def test_hysteresis_grows_runs_that_hold_a_seed():
    p = np.array([0.9, 0.2, 0.05, 0.3, 0.6, 0.3, 0.01, 0.4])
    seeds = p >= 0.5
    assert hysteresis_slices(p, seeds, 0.1).tolist() == [True, True, False, True, True, True, False, False]


def test_decision_is_deterministic_and_checked():
    n = 16
    maps, _ = lesion_maps(n, range(5, 9), seed=3)
    probability = np.linspace(0.0, 1.0, n)
    first = decide(ScanEvidence(maps, probability, brain_stack(n)), VOLUME, OPTIONS)
    second = decide(ScanEvidence(maps.copy(), probability.copy(), brain_stack(n)), VOLUME, OPTIONS)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert ScanDecision.from_dict(VOLUME.as_dict()) == VOLUME
    with pytest.raises(ValueError, match="seed_threshold"):
        ScanDecision.from_dict({"rule": "volume", "seed_threshold": 0.5})
    with pytest.raises(ValueError, match="grow_probability"):
        ScanDecision(rule="volume", seed_probability=0.2, grow_probability=0.3)
    with pytest.raises(ValueError, match="rule"):
        ScanDecision(rule="pixels")


def test_scores_follow_the_brats_convention_and_the_labels():
    empty = np.zeros((2, 4, 4), bool)
    marked = empty.copy()
    marked[0, 0, 0] = True
    assert volume_dice(empty, empty) == 1.0 and volume_dice(marked, empty) == 0.0
    reference = empty.copy()
    reference[0, 0, :2] = True
    assert volume_dice(marked, reference) == pytest.approx(2 / 3)
    labels = np.array([0, 1, 1, 0])
    own = np.zeros((4, 4, 4), bool)
    own[:, :2, :2] = True  # each slice's own mask: 4 pixels
    marked = np.zeros_like(own)
    marked[1], marked[3] = own[1], own[3]  # a tumour slice and a healthy slice marked, tumour slice 2 left empty
    p = np.array([0.1, 1.0, 0.5, 0.2])
    # right 4 x 1.0; wrong 4 x 0 (slice 1) + 4 (healthy slice 3); missing 0.5 x 4 (slice 2)
    assert slice_label_score(marked, labels, own, p) == pytest.approx(2 * 4 / (2 * 4 + 4 + 2))
    assert slice_label_score(np.zeros_like(own), np.zeros(4), own, p) == 1.0
    assert slice_label_score(marked, np.zeros(4), own, p) == 0.0


def test_choice_prefers_the_candidate_that_finds_the_faint_tumour_and_spares_the_healthy_scan():
    n = 20
    maps, reference = lesion_maps(n, range(8, 12))
    faint = np.full(n, 0.01)
    faint[8:12] = 0.35
    healthy_maps, _ = lesion_maps(n, [], seed=1)
    healthy_p = np.full(n, 0.1)
    scans = [(ScanEvidence(maps, faint, brain_stack(n)), reference, (faint > 0.2).astype(int)),
             (ScanEvidence(healthy_maps, healthy_p, brain_stack(n)), np.zeros_like(reference), np.zeros(n, int))]
    candidates = [ScanDecision(rule="slices", threshold=0.5),
                  ScanDecision(rule="volume", seed_probability=0.05, grow_probability=0.05),
                  ScanDecision(rule="volume", seed_probability=0.3, grow_probability=0.05)]
    for use_masks in (True, False):
        best, rows = choose_scan_decision(scans, OPTIONS, candidates, use_masks=use_masks)
        assert best == candidates[2]
        # the gate misses the tumour (Dice 0, label score 0) and spares the healthy scan (1)
        assert rows[0]["dice"] == pytest.approx(0.5) and rows[0]["label_score"] == pytest.approx(0.5)
    assert len(candidate_decisions(candidates[0])) == len(candidate_decisions()) + 1
