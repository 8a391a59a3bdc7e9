"""Tests for the map-to-mask post-processing (guided_diffusion.segment.postprocess)."""

import numpy as np
import pytest
from scipy import ndimage
from skimage.filters import threshold_otsu

from guided_diffusion.segment import postprocess


def square(shape, top, left, side):
    mask = np.zeros(shape, dtype=bool)
    mask[top:top + side, left:left + side] = True
    return mask


# ---------------------------------------------------------------------------
# post-processing


def test_normalize_map_is_per_image_and_constant_safe():
    rng = np.random.default_rng(0)
    stack = np.stack([rng.normal(size=(8, 8)), 100 + 5 * rng.normal(size=(8, 8)), np.full((8, 8), 3.0)])
    out = postprocess.normalize_map(stack)
    for i in range(2):
        assert out[i].min() == 0.0 and out[i].max() == 1.0
        np.testing.assert_allclose(out[i], postprocess.normalize_map(stack[i]))
        np.testing.assert_allclose(out[i], (stack[i] - stack[i].min()) / np.ptp(stack[i]))
    assert np.all(out[2] == 0.0)


def test_otsu_recovers_planted_region_exactly():
    rng = np.random.default_rng(1)
    planted = np.zeros((64, 64), dtype=bool)
    yy, xx = np.mgrid[:64, :64]
    planted |= (yy - 20) ** 2 + (xx - 40) ** 2 < 81
    planted |= (yy > 45) & (xx < 20)
    saliency = np.where(planted, 1.0, 0.0) + 0.08 * rng.standard_normal(planted.shape)
    np.testing.assert_array_equal(postprocess.otsu_mask(saliency), planted)
    # Per image in a stack, unaffected by another image's range.
    stack = np.stack([saliency, 1000 * saliency[::-1]])
    masks = postprocess.otsu_mask(stack)
    np.testing.assert_array_equal(masks[0], planted)
    np.testing.assert_array_equal(masks[1], planted[::-1])
    assert not postprocess.otsu_mask(np.full((8, 8), 0.3)).any()


def test_otsu_is_skimages_split_at_its_bin_edge():
    # skimage's own threshold is the centre of the last lower bin: `image > centre` moves the upper
    # half of that bin into the upper class; ours keeps the split skimage scored.
    differing = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        image = ndimage.gaussian_filter(rng.standard_normal((48, 48)), rng.uniform(1, 5))
        image = image * rng.uniform(0.1, 100) + rng.normal()
        centre = threshold_otsu(image)
        edge = postprocess.otsu_threshold(image)
        assert edge - centre == pytest.approx(np.ptp(image) / 512, rel=1e-6)
        ours, theirs = postprocess.otsu_mask(image), image > centre
        np.testing.assert_array_equal(ours, theirs & (image >= edge))
        differing += (ours != theirs).sum()
    assert differing > 0  # the case occurs


def test_foreground_otsu_ignores_the_background():
    # A brain disc with a faint lesion inside a large empty background: over the whole image Otsu
    # separates brain from background; over the brain it finds the lesion.
    yy, xx = np.mgrid[:64, :64]
    brain = (yy - 32) ** 2 + (xx - 32) ** 2 < 20 ** 2
    lesion = (yy - 28) ** 2 + (xx - 36) ** 2 < 5 ** 2
    image = np.where(brain, 0.2, -1.0) + np.where(lesion, 0.5, 0.0)
    saliency = np.where(brain, 1.0, 0.0) + np.where(lesion, 1.0, 0.0)
    saliency = saliency + 0.05 * np.random.default_rng(0).standard_normal(saliency.shape)
    whole = postprocess.saliency_to_mask(saliency[None])
    inside = postprocess.saliency_to_mask(saliency[None], options=postprocess.MaskOptions(foreground_only=True),
                                          images=image[None, None])
    assert whole[0][brain & ~lesion].mean() > 0.9  # the whole brain
    np.testing.assert_array_equal(inside[0], lesion)
    np.testing.assert_array_equal(postprocess.foreground_mask(image[None, None])[0], brain)
    with pytest.raises(ValueError, match="images"):
        postprocess.saliency_to_mask(saliency[None], options=postprocess.MaskOptions(foreground_only=True))


def test_smoothing_removes_speckle_and_keeps_the_region():
    rng = np.random.default_rng(3)
    planted = square((48, 48), 14, 14, 16)
    saliency = planted + 0.9 * rng.standard_normal(planted.shape)  # heavy speckle
    raw = postprocess.saliency_to_mask(saliency)
    smooth = postprocess.saliency_to_mask(saliency, options=postprocess.MaskOptions(smooth_sigma=1.5))
    assert (smooth != planted).sum() < 0.5 * (raw != planted).sum()
    np.testing.assert_allclose(postprocess.smooth_maps(saliency, 0), saliency)
    with pytest.raises(ValueError, match="smooth_sigma"):
        postprocess.MaskOptions(smooth_sigma=-1)


def test_largest_component_is_4_connected_and_keeps_ties():
    mask = np.zeros((12, 12), dtype=bool)
    mask[0:3, 0:3] = True          # 9 pixels
    mask[6:9, 6:9] = True          # 9 pixels: a tie, kept
    mask[0:2, 10:12] = True        # 4 pixels: removed
    out = postprocess.largest_component(mask)
    expected = mask.copy()
    expected[0:2, 10:12] = False
    np.testing.assert_array_equal(out, expected)

    # Diagonal contact does not connect: an L of 3 pixels beats two diagonal
    # neighbours of 2 (an 8-connected labelling would merge all 5).
    diagonal = np.zeros((6, 6), dtype=bool)
    diagonal[[0, 1, 1], [0, 0, 1]] = True
    diagonal[[2, 3], [2, 3]] = True
    kept = postprocess.largest_component(diagonal)
    assert kept.sum() == 3 and kept[0, 0] and not kept[2, 2]

    assert not postprocess.largest_component(np.zeros((5, 5), dtype=bool)).any()


def test_saliency_to_mask_and_torch_input():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    planted_big = square((32, 32), 2, 2, 8)
    planted_small = square((32, 32), 20, 20, 4)
    saliency = 5.0 * (planted_big | planted_small) - 2.0 + 0.1 * rng.standard_normal((32, 32))
    tensor = torch.tensor(saliency[None, None], requires_grad=True)  # (B, C, H, W)
    mask = postprocess.saliency_to_mask(tensor)
    assert mask.shape == (1, 1, 32, 32)
    planted = planted_big | planted_small
    np.testing.assert_array_equal(mask[0, 0], planted)
    np.testing.assert_array_equal(postprocess.saliency_to_mask(saliency, keep_largest=True), planted_big)


def test_the_positive_part_ignores_a_strong_negative_rim():
    # a lesion (+1) inside a stronger negative rim (-3) on a flat brain: the signed map's Otsu split
    # separates the rim from everything else, the positive part separates the lesion
    saliency = np.zeros((1, 24, 24))
    yy, xx = np.mgrid[:24, :24]
    distance = np.hypot(yy - 12, xx - 12)
    saliency[0][(distance >= 4) & (distance < 6)] = -3.0
    lesion = distance < 3
    saliency[0][lesion] = 1.0
    signed = postprocess.saliency_to_mask(saliency)
    positive = postprocess.saliency_to_mask(saliency, options=postprocess.MaskOptions(positive_part=True))
    assert signed[0].sum() > 400  # "everything but the rim"
    np.testing.assert_array_equal(positive[0], lesion)
