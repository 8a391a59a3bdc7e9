"""CDM / CG-CDM and the diffusion baselines against planted models, closed forms and a per-image reference loop."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from guided_diffusion.segment import chain, saliency
from guided_diffusion.segment.methods import Anomaly, SaliencySettings
from guided_diffusion.guidance import make_classifier_cond_fn
from guided_diffusion.metrics import dice
from guided_diffusion.segment.postprocess import saliency_to_mask
from guided_diffusion.script_util import create_classifier, create_gaussian_diffusion

T = 200
SIZE = 16


def make_diffusion(**kwargs):
    return create_gaussian_diffusion(steps=T, noise_schedule="linear", **kwargs)


def square_region(top=4, left=6, height=5, width=6, size=SIZE):
    region = torch.zeros(1, 1, size, size)
    region[..., top:top + height, left:left + width] = 1.0
    return region


def class_one_weight(y):
    """Weight of class 1 in a hard (B,) or soft (B, 2) label."""
    return y[:, 1] if y.is_floating_point() else (y == 1).float()


class PlantedEps(nn.Module):
    """eps(x, t, y) = c * x - amp * w1(y) * region: the label matters only inside `region`, linearly.

    Records (batch size, timesteps) of every call.
    """

    num_classes = 2

    def __init__(self, region, c=0.1, amp=0.5):
        super().__init__()
        self.region, self.c, self.amp = region, c, amp
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append((x.shape[0], t.detach().clone()))
        return self.c * x - self.amp * class_one_weight(y).view(-1, 1, 1, 1) * self.region


def images(batch=3, channels=1, size=SIZE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, channels, size, size, generator=generator) * 1.6 - 0.8
    noise = torch.randn(batch, channels, size, size, generator=generator)
    return x0, noise


ONES = torch.ones(3, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Planted model


def test_cdm_recovers_the_planted_region_exactly():
    region = square_region()
    x0, noise = images()
    maps = saliency.cdm_saliency(PlantedEps(region), make_diffusion(), x0, ONES, noise_level=0.1, steps=10, tau=0.95,
                            noise=noise, clip_denoised=False)
    assert maps.shape == (3, SIZE, SIZE) and maps.dtype == np.float32
    inside = region[0, 0].bool().numpy()
    assert np.all(maps[:, ~inside] == 0)  # branches are identical outside the region
    assert np.all(maps[:, inside] > 0)
    for mask in saliency_to_mask(maps):
        assert dice(mask, inside) == 1.0


def test_cdm_matches_the_closed_form_on_the_paper_step_indices():
    """For eps = c x + e(y) each DDIM step is affine: d' = k d + m (c d + e_A - e_B) with
    k = sqrt(abar_prev / abar_t), m = sqrt(1 - abar_prev) - k sqrt(1 - abar_t), steps at t = Q .. Q-R+1."""
    region, diffusion = square_region(), make_diffusion()
    c, amp, tau, q, steps = 0.1, 0.5, 0.8, 37, 6
    x0, noise = images()
    maps = saliency.cdm_saliency(PlantedEps(region, c, amp), diffusion, x0, ONES, noise_level=q, steps=steps, tau=tau,
                            noise=noise, clip_denoised=False)
    abar = np.cumprod(1.0 - np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T))
    d, total = 0.0, 0.0
    for t in range(q, q - steps, -1):
        k = np.sqrt(abar[t - 1] / abar[t])
        m = np.sqrt(1 - abar[t - 1]) - k * np.sqrt(1 - abar[t])
        d = k * d + m * (c * d - amp * (1 - tau))
        total += d / (1 - tau)
    inside = region[0, 0].bool().numpy()
    np.testing.assert_allclose(maps[:, inside], total, rtol=2e-4)  # float32 cancellation
    # Starting one index late (the original code's off-by-one) gives a measurably different value.
    d_late, total_late = 0.0, 0.0
    for t in range(q - 1, q - 1 - steps, -1):
        k = np.sqrt(abar[t - 1] / abar[t])
        m = np.sqrt(1 - abar[t - 1]) - k * np.sqrt(1 - abar[t])
        d_late = k * d_late + m * (c * d_late - amp * (1 - tau))
        total_late += d_late / (1 - tau)
    assert abs(total_late - total) > 1e-3 * abs(total)


@pytest.mark.parametrize("rescale", [False, True])
def test_one_batched_call_per_step_at_q_down_to_q_minus_r_plus_one(rescale):
    model = PlantedEps(square_region())
    x0, noise = images(batch=2)
    diffusion = make_diffusion(rescale_timesteps=rescale)
    saliency.cdm_saliency_multi(model, diffusion, x0, torch.ones(2, dtype=torch.long), taus=[0.95, 0.5, 0.0],
                           noise_level=0.1, steps=4, stride=3, noise=noise)
    q = round(0.1 * T)
    assert [batch for batch, _ in model.calls] == [8] * 4  # A + three B branches, two images each
    expected = [q - 3 * j for j in range(4)]
    seen = [t.unique().tolist() for _, t in model.calls]
    scale = 1000.0 / T if rescale else 1
    assert seen == [[pytest.approx(v * scale)] for v in expected]


def test_soft_label_branch_is_the_linear_mix_of_the_hard_label_branches():
    x0, noise = images()
    steps = list(saliency.cdm_branch_steps(PlantedEps(square_region()), make_diffusion(), x0, ONES, taus=[0.7, 0.0],
                                      noise_level=0.15, steps=5, noise=noise, clip_denoised=False))
    assert len(steps) == 5
    for x_a, (x_soft, x_healthy) in steps:
        torch.testing.assert_close(x_soft, 0.7 * x_a + 0.3 * x_healthy, rtol=1e-5, atol=1e-6)
    # Hence the 1/(1 - tau) factor makes the map independent of tau for a label-linear model.
    kwargs = dict(noise_level=0.15, steps=5, noise=noise, clip_denoised=False)
    maps = saliency.cdm_saliency_multi(PlantedEps(square_region()), make_diffusion(), x0, ONES, taus=[0.95, 0.3, 0.0],
                                  **kwargs)
    np.testing.assert_allclose(maps[0.95], maps[0.0], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(maps[0.3], maps[0.0], rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Batched implementation vs a one-image-at-a-time reference (the original code's structure)


def tiny_unet():
    from test_inference import T as inference_T, random_unet

    assert inference_T == T
    return random_unet(32, learn_sigma=True)


def tiny_classifier():
    torch.manual_seed(5)
    classifier = create_classifier(32, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="16",
                                   classifier_channel_mult="1,2", classifier_num_head_channels=32)
    with torch.no_grad():
        for p in classifier.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return classifier.eval()


def reference_cdm(model, diffusion, x0, label, noise, q, steps, tau, classifier=None, scale=0.0):
    """One image at a time; branch B is a cloned model whose embedding row 0 holds the mix (as the
    original code did); guidance computed here from the classifier directly."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        rows = model.label_emb.weight
        clone.label_emb.weight[0] = tau * rows[label] + (1 - tau) * rows[0]

    def guidance(x, t, y):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            log_p = F.log_softmax(classifier(x, t), dim=-1)[torch.arange(len(y)), y].sum()
            return scale * torch.autograd.grad(log_p, x)[0]

    cond_fn = guidance if classifier is not None else None
    maps = []
    for i in range(len(x0)):
        x_q = diffusion.q_sample(x0[i:i + 1], torch.tensor([q]), noise=noise[i:i + 1])
        x_a, x_b, total = x_q, x_q, torch.zeros_like(x_q)
        for t in range(q, q - steps, -1):
            t_tensor = torch.tensor([t])
            with torch.no_grad():
                x_a = diffusion.ddim_sample(model, x_a, t_tensor, cond_fn=cond_fn,
                                            model_kwargs={"y": torch.tensor([label])})["sample"]
                x_b = diffusion.ddim_sample(clone, x_b, t_tensor, cond_fn=cond_fn,
                                            model_kwargs={"y": torch.tensor([0])})["sample"]
            total += (x_a - x_b).cpu() / (1 - tau)
        maps.append(total.sum(dim=1)[0].numpy())
    return np.stack(maps)


@pytest.mark.parametrize("guided", [False, True])
def test_batched_cdm_equals_the_per_image_reference_loop(guided):
    model, diffusion = tiny_unet()
    classifier = tiny_classifier() if guided else None
    x0, noise = images(batch=3, size=32, seed=1)
    q, steps, tau, scale = 30, 4, 0.9, 10.0
    expected = reference_cdm(model, diffusion, x0, 1, noise, q, steps, tau, classifier, scale)
    cond_fn = make_classifier_cond_fn(classifier, scale) if guided else None
    actual = saliency.cdm_saliency(model, diffusion, x0, ONES, noise_level=q, steps=steps, tau=tau, cond_fn=cond_fn,
                              noise=noise)
    assert np.abs(expected).max() > 1e-3  # the label matters in this random network
    # float32: batching changes the rounding (differences ~1e-6); an off-by-one step or a wrong tau changes
    # these maps by ~1e-3.
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    if guided:
        unguided = saliency.cdm_saliency(model, diffusion, x0, ONES, noise_level=q, steps=steps, tau=tau, noise=noise)
        assert np.abs(unguided - actual).max() > 1e-2 * np.abs(actual).max()


# ---------------------------------------------------------------------------------------------
# Guidance direction


class ZeroEps(nn.Module):
    num_classes = 2

    def forward(self, x, t, y=None):
        return torch.zeros_like(x)


class RegionClassifier(nn.Module):
    """logit_1 = k * sum(x over the region), logit_0 = 0: log p(1 | x) grows with the region's brightness."""

    def __init__(self, region, k=0.2):
        super().__init__()
        self.region, self.k = region, k

    def forward(self, x, t=None):
        score = self.k * (x * self.region).sum(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_guidance_moves_branch_a_toward_y1_and_branch_b_toward_y0_inside_the_classifier_region():
    region = square_region(top=9, left=2, height=4, width=7)
    x0, noise = images()
    kwargs = dict(noise_level=0.1, steps=10, tau=0.95, noise=noise, clip_denoised=False)
    unguided = saliency.cdm_saliency(ZeroEps(), make_diffusion(), x0, ONES, **kwargs)
    assert np.all(unguided == 0)
    guided = saliency.cdm_saliency(ZeroEps(), make_diffusion(), x0, ONES,
                              cond_fn=make_classifier_cond_fn(RegionClassifier(region), 10.0), **kwargs)
    inside = region[0, 0].bool().numpy()
    assert np.all(guided[:, ~inside] == 0) and np.all(guided[:, inside] > 0)
    for mask in saliency_to_mask(guided):
        assert dice(mask, inside) == 1.0


# ---------------------------------------------------------------------------------------------
# Baselines


def test_anomaly_baseline_reconstructs_healthy_images_and_flags_the_label_region():
    region = square_region()
    model = PlantedEps(region, c=0.0)  # eps independent of x and t: DDIM inversion is exact
    x0, _ = images()
    diffusion = make_diffusion()
    healthy = saliency.anomaly_saliency(model, diffusion, x0, torch.zeros(3, dtype=torch.long), noise_level=20, stride=5,
                                   clip_denoised=False)
    assert np.abs(healthy).max() < 1e-4
    model.calls.clear()
    maps = saliency.anomaly_saliency(model, diffusion, x0, ONES, noise_level=20, stride=5, clip_denoised=False)
    assert len(model.calls) == 8 == Anomaly(SaliencySettings(noise_level=20, stride=5), model=model, diffusion=diffusion).model_calls_per_batch()  # 4 encode + 4 decode
    assert [t.unique().item() for _, t in model.calls] == [0, 5, 10, 15, 20, 15, 10, 5]
    inside = region[0, 0].bool().numpy()
    assert np.abs(maps[:, ~inside]).max() < 1e-4 and maps[:, inside].min() > 1e-2
    for mask in saliency_to_mask(maps):
        assert dice(mask, inside) == 1.0


def test_cgdiff_shares_noise_between_branches_and_runs_to_t0():
    region = square_region()
    model = PlantedEps(region)
    x0, noise = images()
    generator = torch.Generator().manual_seed(0)
    maps = saliency.cgdiff_saliency(model, make_diffusion(), x0, ONES, noise_level=12, stride=4, noise=noise,
                               clip_denoised=False, generator=generator)
    assert [t.unique().item() for _, t in model.calls] == [12, 8, 4, 0]
    assert all(batch == 6 for batch, _ in model.calls)
    inside = region[0, 0].bool().numpy()
    assert np.all(maps[:, ~inside] == 0) and np.all(maps[:, inside] > 0)
    for mask in saliency_to_mask(maps):
        assert dice(mask, inside) == 1.0


# ---------------------------------------------------------------------------------------------
# Settings and errors


def test_noise_level_is_a_fraction_of_t_or_an_integer_step():
    assert chain.noise_step(0.1, 4000) == 400
    assert chain.noise_step(0.1, 1000) == 100
    assert chain.noise_step(400, 4000) == 400
    for bad in (0, -0.2, 1.5, 4000):
        with pytest.raises(ValueError, match="noise_level"):
            chain.noise_step(bad, 4000)
    assert chain.cdm_timesteps(400, 10) == list(range(400, 389, -1))
    with pytest.raises(ValueError, match="steps"):
        chain.cdm_timesteps(5, 6)


def test_bad_settings_are_errors_naming_the_parameter():
    x0, _ = images()
    model = PlantedEps(square_region())
    with pytest.raises(ValueError, match="tau"):
        saliency.cdm_saliency(model, make_diffusion(), x0, ONES, tau=1.0)
    with pytest.raises(ValueError, match="healthy_label"):
        saliency.cdm_saliency(model, make_diffusion(), x0, ONES, healthy_label=2)
    unconditional = ZeroEps()
    unconditional.num_classes = None
    with pytest.raises(ValueError, match="class-conditional"):
        saliency.cdm_saliency(unconditional, make_diffusion(), x0, ONES)
    with pytest.raises(ValueError, match="unspaced"):
        saliency.cdm_saliency(model, make_diffusion(timestep_respacing="50"), x0, ONES)


def test_per_image_noise_does_not_depend_on_the_batch():
    together = chain.per_image_noise((1, 4, 4), 7, [0, 1, 2])
    alone = chain.per_image_noise((1, 4, 4), 7, [2])
    torch.testing.assert_close(together[2], alone[0], rtol=0, atol=0)
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(chain.per_image_noise((1, 4, 4), 8, [2])[0], alone[0])


def test_maps_by_steps_are_the_partial_sums_of_separate_runs():
    x0, _ = images()
    model, diffusion = PlantedEps(square_region()), make_diffusion()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    by_steps = saliency.cdm_saliency_by_steps(model, diffusion, x0, ONES, taus=(0.5, 0.0), steps=6,
                                              record_steps=(2, 6), noise=noise, noise_level=20)
    assert set(by_steps) == {(2, 0.5), (2, 0.0), (6, 0.5), (6, 0.0)}
    for r in (2, 6):
        for tau in (0.5, 0.0):
            alone = saliency.cdm_saliency(model, diffusion, x0, ONES, tau=tau, steps=r, noise=noise, noise_level=20)
            np.testing.assert_allclose(by_steps[(r, tau)], alone, rtol=1e-5, atol=1e-6)
    assert not np.allclose(by_steps[(2, 0.0)], by_steps[(6, 0.0)])
    with pytest.raises(ValueError, match="record_steps"):
        saliency.cdm_saliency_by_steps(model, diffusion, x0, ONES, steps=3, record_steps=(4,), noise_level=20)
