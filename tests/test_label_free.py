"""Label-free criteria of the ablation and their rank correlation with Dice (guided_diffusion.segment.label_free)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from guided_diffusion.segment import label_free
from guided_diffusion.segment.label_free import (add_stability, average_ranks, best_criterion, criterion_correlations,
                                                 faithfulness_scores, healthy_fill, mask_dice, neighbours,
                                                 point_criteria, rank_correlation)
from guided_diffusion.segment.study import label_free_choice


def test_average_ranks_share_ties():
    assert average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert average_ranks([1, 1, 1]).tolist() == [2.0, 2.0, 2.0]


def test_rank_correlation_on_hand_made_grids():
    dice = [0.2, 0.5, 0.4, 0.9, 0.7]
    assert rank_correlation([1, 4, 3, 9, 8], dice) == pytest.approx(1.0)  # same order, other values
    assert rank_correlation([9, 4, 5, 1, 2], dice) == pytest.approx(-1.0)
    # ranks of dice: 1 3 2 5 4; of the criterion: 1 2 3 4 5 -> d^2 = 0 1 1 1 1 -> rho = 1 - 6 * 4 / (5 * 24) = 0.8
    assert rank_correlation([1, 2, 3, 4, 5], dice) == pytest.approx(0.8)
    # a tie: criterion ranks 1.5 1.5 3, dice ranks 1 2 3 -> Pearson of the ranks = sqrt(3) / 2
    assert rank_correlation([0, 0, 1], [0.1, 0.2, 0.3]) == pytest.approx(math.sqrt(3) / 2)
    # missing values are left out; too few pairs or a constant side give NaN
    assert rank_correlation([1, None, 2, float("nan"), 3], [1, 5, 2, 4, 3]) == pytest.approx(1.0)
    assert math.isnan(rank_correlation([1, 2], [1, 2]))
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_correlation_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, 40).astype(float)  # many ties
    y = 0.5 * x + rng.integers(0, 4, 40)
    assert rank_correlation(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    z = rng.normal(size=40)
    assert rank_correlation(z, y) == pytest.approx(stats.spearmanr(z, y).statistic, abs=1e-12)


def _disc(size, centre, radius):
    rows, cols = np.mgrid[:size, :size]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2


def _phantom(n=3, size=32):
    """Brains (a disc at 0) on a background of -1 with a bright lesion (0.9); maps that peak on the lesion."""
    brain, lesion = _disc(size, (16, 16), 12), _disc(size, (12, 18), 4)
    image = np.where(brain, 0.0, -1.0)
    image[lesion] = 0.9
    images = np.repeat(image[None, None], n, axis=0)
    rng = np.random.default_rng(0)
    maps = lesion[None] * 1.0 + 0.05 * rng.normal(size=(n, size, size))
    return images, maps, brain, lesion


def test_mask_dice_and_identical_draws_agree_fully():
    images, maps, brain, lesion = _phantom()
    assert mask_dice(lesion[None], lesion[None]).tolist() == [1.0]
    assert mask_dice(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4), bool)).tolist() == [1.0]
    half = lesion.copy()
    half[:12] = False
    assert mask_dice(lesion[None], half[None])[0] == pytest.approx(2 * half.sum() / (lesion.sum() + half.sum()))
    fields, masks = point_criteria(maps, maps.copy(), images)
    assert fields["draw_agreement"] == 1.0 and fields["draw_agreement_std"] == 0.0
    assert fields["map_agreement"] == pytest.approx(1.0)
    assert (masks == lesion).all()  # the maps' Otsu masks are the lesion
    assert fields["compact_agreement"] == pytest.approx(1 - lesion.sum() / brain.sum())
    # two draws that both mark the whole brain agree fully too, but gain nothing once their area counts
    whole = np.where(brain, 1.0, 0.0)[None].repeat(3, axis=0)
    broad, _ = point_criteria(whole, whole.copy(), images)
    assert broad["draw_agreement"] == 1.0 and broad["mask_share"] == 1.0 and broad["compact_agreement"] == 0.0
    # a replicate whose maps peak elsewhere agrees not at all
    elsewhere = np.roll(maps, 12, axis=-1)
    fields, _ = point_criteria(maps, elsewhere, images)
    assert fields["draw_agreement"] == 0.0 and fields["map_agreement"] < 0.2
    assert "faithfulness" not in fields  # no detector, no faithfulness


def test_healthy_fill_replaces_the_mask_with_surrounding_tissue():
    images, _, brain, lesion = _phantom(n=1)
    filled = healthy_fill(images, lesion[None])
    assert np.allclose(filled[0, 0][lesion], 0.0, atol=1e-6)  # the healthy brain around is 0
    assert (filled[0, 0][~lesion] == images[0, 0][~lesion]).all()  # nothing else changes
    background = ~brain
    everything = healthy_fill(images, np.ones((1, 32, 32), bool))
    assert (everything[0, 0][background] == -1).all()  # the background is never filled


class LesionDetector:
    """p(tumour) = the share of the lesion's pixels still bright (> 0.5): a toy classifier."""

    def __init__(self, lesion):
        self.lesion = torch.as_tensor(lesion)

    def __call__(self, images):
        bright = (images[:, 0] > 0.5) & self.lesion
        return (bright.sum(dim=(1, 2)) / self.lesion.sum()).numpy()


def test_faithfulness_rewards_the_lesion_and_penalises_a_whole_brain_mask():
    images, maps, brain, lesion = _phantom(n=1)
    detector = LesionDetector(lesion)
    drop, share = faithfulness_scores(detector, images, lesion[None])
    assert drop[0] == pytest.approx(1.0) and share[0] == pytest.approx(lesion.sum() / brain.sum())
    whole_drop, whole_share = faithfulness_scores(detector, images, brain[None])
    assert whole_drop[0] == pytest.approx(1.0) and whole_share[0] == pytest.approx(1.0)
    half = lesion.copy()
    half[:12] = False
    half_drop, _ = faithfulness_scores(detector, images, half[None])
    assert 0 < half_drop[0] < 1
    scores = {}
    for name, mask in (("lesion", lesion), ("whole", brain), ("half", half), ("disc", np.zeros_like(lesion))):
        fields, _ = point_criteria(np.where(mask, 1.0, 0.0)[None] + 1e-3 * _disc(32, (16, 16), 14)[None],
                                   None, images, detector)
        scores[name] = fields
    for key in ("faithfulness", "faithfulness_ratio"):
        assert scores["lesion"][key] > scores["half"][key] > scores["whole"][key]
        assert scores["lesion"][key] > scores["disc"][key]
    assert scores["whole"]["faithfulness"] == pytest.approx(0.0, abs=1e-9)  # drop 1 - share 1
    assert scores["lesion"]["faithfulness"] == pytest.approx(1 - lesion.sum() / brain.sum())


def _row(q, r, tau, s, k=1, dice=0.5, **criteria):
    return {"method": "cg-cdm", "noise_level": q, "steps": r, "tau": tau, "classifier_scale": s, "noise_draws": k,
            "passes": r * k, "dice": dice, "dice_std": 0.1, "n_images": 4, **criteria}


def test_neighbours_and_stability():
    keys = [(0.1, 10.0, 0.0, s, 1.0) for s in (1.0, 10.0, 100.0)] + [(0.2, 10.0, 0.0, 10.0, 1.0),
                                                                      (0.1, 5.0, 0.0, 10.0, 1.0)]
    assert sorted(neighbours(keys[1], keys)) == sorted([keys[0], keys[2], keys[3]])  # not the other R
    assert neighbours(keys[0], keys) == [keys[1]]
    a, b = np.zeros((2, 8, 8), bool), np.zeros((2, 8, 8), bool)
    a[:, :4] = True
    b[:, :2] = True  # Dice with a: 2 * 16 / (32 + 16) = 2 / 3
    rows = [_row(0.1, 10, 0.0, 1.0), _row(0.1, 10, 0.0, 10.0), _row(0.1, 10, 0.0, 100.0), _row(0.3, 1, 0.5, 1.0)]
    masks = {label_free.point_key(rows[0]): a, label_free.point_key(rows[1]): a, label_free.point_key(rows[2]): b}
    add_stability(rows, masks)
    assert rows[0]["stability"] == 1.0 and rows[2]["stability"] == pytest.approx(2 / 3)
    assert rows[1]["stability"] == pytest.approx((1 + 2 / 3) / 2)  # the mean over both neighbours
    assert rows[3]["stability"] is None  # no masks, no neighbour


def test_the_label_free_choice_uses_the_criterion_that_tracks_dice_best():
    dice = [0.30, 0.40, 0.50, 0.60, 0.55]
    good = [0.10, 0.20, 0.30, 0.50, 0.40]  # same order as Dice: rho 1
    poor = [0.90, 0.10, 0.50, 0.20, 0.30]
    rows = [_row(0.1, 1, 0.0, s, dice=d, separability=p, separability_std=0.0, draw_agreement=g,
                 draw_agreement_std=0.0) for s, d, g, p in zip((1, 3, 10, 30, 100), dice, good, poor)]
    rows.append({**rows[3], "sweep": "copy"})  # a point measured twice counts once
    rows.append(_row(0.1, 1, 0.0, 5.0, dice=0.9, separability=1.0, separability_std=0.0, draw_agreement=1.0,
                     draw_agreement_std=0.0) | {"method": "cdm"})  # CDM rows are not candidates
    correlations = criterion_correlations([r for r in rows if r["method"] == "cg-cdm"])
    assert correlations["draw_agreement"] == pytest.approx(1.0)
    assert correlations["separability"] == pytest.approx(stats.spearmanr(poor, dice).statistic)
    assert best_criterion(correlations) == "draw_agreement"
    chosen, rhos, criterion, by_criterion = label_free_choice(rows, tolerance=0.0)
    assert criterion == "draw_agreement" and rhos == correlations
    assert chosen["classifier_scale"] == 30 and by_criterion["separability"]["classifier_scale"] == 1
    # with a tolerance the cheapest point within it of the best value wins (here all passes equal: the best)
    assert label_free_choice(rows, tolerance=0.5)[0]["passes"] == 1
    # a criterion some candidate lacks (stability without neighbours) is reported but not chosen
    rows[0]["stability"], rows[1]["stability"] = None, 0.1
    for r, v in zip(rows[2:5], (0.2, 0.3, 0.25)):
        r["stability"] = v
    correlations = criterion_correlations([r for r in rows if r["method"] == "cg-cdm"])
    assert correlations["stability"] == pytest.approx(1.0)
    assert best_criterion(correlations, [r for r in rows if r["method"] == "cg-cdm"]) == "draw_agreement"
    assert best_criterion({"separability": None}) is None


class NoiseMethod:
    """A stand-in method whose map is its noise: shows which draws a run used."""

    name = "noise"

    def variants(self):
        return ["noise"]

    def maps(self, x0, y1, noise):
        return {"noise": noise[:, 0].cpu().numpy()}


def test_a_replicate_uses_the_next_noise_draws():
    from guided_diffusion.segment.pipeline import compute_maps

    images, names = torch.zeros(3, 1, 8, 8), ["a.png", "b.png", "c.png"]
    run = lambda **kw: compute_maps(NoiseMethod(), images, batch_size=2, names=names, device=torch.device("cpu"),  # noqa: E731
                                    progress=False, **kw)[0]["noise"]
    first, second = run(), run(first_draw=1)
    assert not np.allclose(first, second)  # an independent draw
    assert np.allclose(run(noise_draws=2), (first.astype(np.float64) + second) / 2, atol=1e-6)
    assert np.allclose(run(noise_draws=2, first_draw=2), (run(first_draw=2).astype(np.float64) + run(first_draw=3)) / 2,
                       atol=1e-6)
    assert np.array_equal(run(noise_draws=1, first_draw=0), first)
