"""Inference options (precision, compile, CPU memory reuse) and the cheaper guidance passes: the maps
and gradients they give equal the plain computation's (tiny random networks, CPU)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from guided_diffusion import inference
from guided_diffusion.cli import UserError
from guided_diffusion.guidance import classifier_log_prob_gradient, make_classifier_cond_fn
from guided_diffusion.script_util import create_classifier, create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.segment import saliency

T = 200


def random_unet(size=16, **overrides):
    """A small UNet and its diffusion (T steps) with random weights that make every block matter."""
    config = model_and_diffusion_defaults()
    config.update(image_size=size, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions=str(size // 2),
                  diffusion_steps=T, class_cond=True)
    config.update(overrides)
    model, diffusion = create_model_and_diffusion(**config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        model.label_emb.weight.mul_(20)
    return model.eval(), diffusion


def random_classifier(size=16, num_classes=2):
    torch.manual_seed(5)
    classifier = create_classifier(size, num_classes=num_classes, classifier_width=32, classifier_depth=1,
                                   classifier_attention_resolutions=str(size // 2), classifier_channel_mult="1,2",
                                   classifier_num_head_channels=32)
    with torch.no_grad():
        for p in classifier.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return classifier.eval()


class Recording(nn.Module):
    """A network that records the batch size of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.batches = net, []

    def forward(self, x, *args, **kwargs):
        self.batches.append(x.shape[0])
        return self.net(x, *args, **kwargs)


def images(batch, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, size, size, generator=generator) * 1.6 - 0.8, \
        torch.randn(batch, 1, size, size, generator=generator)


# ---------------------------------------------------------------------------------------------
# Guidance on stacked copies


@pytest.mark.parametrize("num_classes, copies", [(2, 2), (2, 3), (3, 2), (3, 4)])
def test_gradient_on_stacked_copies_equals_each_copys_own_gradient(num_classes, copies):
    classifier = Recording(random_classifier(num_classes=num_classes))
    x, _ = images(2)
    t = torch.tensor([30, 70])
    generator = torch.Generator().manual_seed(1)
    hard = torch.randint(0, num_classes, (copies * 2,), generator=generator)
    soft = torch.softmax(torch.randn(copies * 2, num_classes, generator=generator), dim=1)
    for target in (hard, soft):
        shared = classifier_log_prob_gradient(classifier, x.repeat(copies, 1, 1, 1), t.repeat(copies), target,
                                              copies=copies)
        assert classifier.batches[-1] == 2  # one forward pass on the two images
        for c in range(copies):
            own = classifier_log_prob_gradient(classifier, x, t, target[2 * c:2 * c + 2])
            assert own.abs().max() > 1e-3
            torch.testing.assert_close(shared[2 * c:2 * c + 2], own, rtol=1e-4, atol=1e-6)


def test_cgcdm_runs_the_classifier_once_on_the_batch_at_its_first_step_with_the_same_maps():
    model, diffusion = random_unet()
    classifier = Recording(random_classifier())
    x0, noise = images(2, seed=1)
    y1 = torch.ones(2, dtype=torch.long)
    cond_fn = make_classifier_cond_fn(classifier, 10.0)
    kwargs = dict(noise_level=30, steps=3, taus=(0.95, 0.0), noise=noise)
    maps = saliency.cdm_saliency_multi(model, diffusion, x0, y1, cond_fn=cond_fn, **kwargs)
    assert classifier.batches == [2, 6, 6]  # 3 branches (A and two taus) of 2 images, shared at x_Q

    def every_row(x, t, guide_copies=None, **model_kwargs):  # guidance that ignores the sharing
        return cond_fn(x, t, **model_kwargs)

    plain = saliency.cdm_saliency_multi(model, diffusion, x0, y1, cond_fn=every_row, **kwargs)
    assert classifier.batches[3:] == [6, 6, 6]
    unguided = saliency.cdm_saliency_multi(model, diffusion, x0, y1, **kwargs)
    for tau in (0.95, 0.0):
        # Sharing changes the float32 rounding only (~5e-5 of the map, the tau 0.95 map divides by 0.05);
        # guidance itself moves these maps by about their own size.
        scale = np.abs(plain[tau]).max()
        assert np.abs(plain[tau] - unguided[tau]).max() > 0.5 * scale
        np.testing.assert_allclose(maps[tau], plain[tau], rtol=0, atol=3e-4 * scale)


# ---------------------------------------------------------------------------------------------
# prepare_for_inference


def test_fp32_setup_gives_the_raw_networks_results_bitwise():
    model, diffusion = random_unet()
    classifier = random_classifier()
    setup = inference.prepare_for_inference(model, classifier, device="cpu")
    assert setup.dtype is None and not setup.compiled
    assert setup.model.num_classes == 2 and setup.model.image_size == 16  # the network's attributes
    x0, noise = images(2, seed=2)
    y1 = torch.ones(2, dtype=torch.long)
    t = torch.tensor([10, 20])
    with torch.no_grad():
        assert torch.equal(setup.model(x0, t, y=y1), model(x0, t, y=y1))
    kwargs = dict(noise_level=30, steps=2, tau=0.0, noise=noise)
    raw = saliency.cdm_saliency(model, diffusion, x0, y1, cond_fn=make_classifier_cond_fn(classifier, 10.0), **kwargs)
    prepared = saliency.cdm_saliency(setup.model, diffusion, x0, y1,
                                     cond_fn=make_classifier_cond_fn(setup.classifier, 10.0), **kwargs)
    assert np.abs(raw).max() > 1e-3 and np.array_equal(prepared, raw)


def test_bf16_runs_the_unet_under_autocast_with_float32_outputs_and_guidance_in_float32():
    model, diffusion = random_unet()
    classifier = random_classifier()
    setup = inference.prepare_for_inference(model, classifier, precision="bf16", device="cpu")
    assert setup.dtype == torch.bfloat16
    x0, noise = images(4, seed=3)
    t = torch.tensor([10, 20, 30, 40])
    y = torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        full, low = model(x0, t, y=y), setup.model(x0, t, y=y)
    assert low.dtype == torch.float32
    error = (low - full).abs().max() / full.abs().max()
    assert 1e-4 < error < 0.05  # bfloat16 rounding (8 bits of mantissa), not float32's
    exact = classifier_log_prob_gradient(classifier, x0, t, y)
    with setup.autocast():
        assert torch.is_autocast_enabled("cpu")
        guided = classifier_log_prob_gradient(setup.classifier, x0, t, y)
    assert guided.dtype == torch.float32 and torch.equal(guided, exact)


def test_precision_names_and_devices_are_checked():
    assert inference.autocast_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(UserError, match="--precision 'fp8'"):
        inference.autocast_dtype("fp8", "cpu")
    parser = inference.add_inference_flags(__import__("argparse").ArgumentParser())
    assert vars(parser.parse_args(["--compile"])) == {"precision": "fp32", "compile": True}
    assert parser.parse_args(["--precision", "bf16", "--compile", "False"]).compile is False


def test_compiled_setup_matches_eager_and_keeps_the_attributes():
    torch.manual_seed(0)

    class Small(nn.Module):
        num_classes = 2

        def __init__(self):
            super().__init__()
            self.inner, self.outer = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 1, 3, padding=1)

        def forward(self, x, t, y=None):
            return self.outer(torch.nn.functional.silu(self.inner(x)))

    net = Small()
    setup = inference.prepare_for_inference(net, None, compile=True, device="cpu")
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(setup.model(x, None), net(x, None), rtol=1e-5, atol=1e-6)
    assert setup.compiled and setup.model.num_classes == 2 and setup.classifier is None


FREED_MEMORY_SCRIPT = """
import torch
from guided_diffusion.inference import reuse_freed_cpu_memory

def resident_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

def after_free():
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written
    held = resident_mib()
    del block
    return held - resident_mib()

print(after_free(), reuse_freed_cpu_memory(), reuse_freed_cpu_memory(), after_free())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_is_kept_for_reuse_after_the_switch():
    # In its own process: the switch is process-wide.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", FREED_MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    released_before, applied, again, released_after = result.stdout.split()
    assert applied == again == "True"
    assert float(released_before) > 60  # glibc unmaps a freed 64 MiB block ...
    assert abs(float(released_after)) < 4  # ... and keeps it once the switch is on


# ---------------------------------------------------------------------------------------------
# scripts/check_gpu.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK_GPU = os.path.join(REPO, "scripts", "check_gpu.py")


def test_map_agreement_of_equal_opposite_and_perturbed_maps():
    from guided_diffusion.bench.precision_check import map_agreement

    maps = np.zeros((2, 8, 8), np.float32)
    maps[:, 2:5, 3:6] = 1.0
    maps += np.random.default_rng(0).normal(0, 0.05, maps.shape).astype(np.float32)
    assert map_agreement(maps, maps) == (1.0, 0.0, 1.0)
    correlation, difference, mask_dice = map_agreement(-maps, maps)
    assert correlation == pytest.approx(-1.0) and difference == pytest.approx(2.0) and mask_dice < 0.2
    shifted = maps + np.float32(0.01)
    correlation, difference, mask_dice = map_agreement(shifted, maps)
    assert correlation == pytest.approx(1.0) and difference == pytest.approx(0.01 / np.abs(maps).max(), rel=1e-3)


def test_check_gpu_on_tiny_networks_reports_every_precision_and_fails_outside_the_tolerances(tmp_path, monkeypatch,
                                                                                          capsys):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, CHECK_GPU, "--tiny", "--images", "2", "--steps", "2", "--train_steps", "2",
                             "--json", str(tmp_path / "check.json")], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    import json

    with open(tmp_path / "check.json") as f:
        rows = json.load(f)["rows"]
    by_name = {(r["precision"], r["what"]): r for r in rows}
    assert by_name[("fp32", "cg-cdm maps")]["correlation"] == 1.0  # the reference itself
    bf16 = by_name[("bf16", "cg-cdm maps")]
    assert 0.97 <= bf16["correlation"] < 1.0 and 0 < bf16["max_difference"] and bf16["mask_dice"] >= 0.85
    assert 0 < by_name[("bf16", "training (2 steps)")]["loss_difference"] < 0.05
    assert by_name[("fp16", "training")]["note"].startswith("skipped")  # no CUDA here
    assert all(r["passed"] for r in rows) and "bf16" in result.stdout and "FAIL" not in result.stdout

    # The same check with a bf16 tolerance nothing reaches: exit status 1 and the row marked.
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import check_gpu
    finally:
        sys.path.pop(0)
    from guided_diffusion.bench import precision_check

    monkeypatch.setitem(precision_check.TOLERANCES, "bf16", {**precision_check.TOLERANCES["bf16"], "correlation": 1.01})
    with pytest.raises(SystemExit) as exit_info:
        check_gpu.main(["--tiny", "--images", "2", "--steps", "1", "--train_steps", "1", "--precisions", "fp32,bf16"])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert out.count("FAIL") == 2  # the bf16 CDM and CG-CDM maps


HEAP_GROWTH_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
from test_inference import random_classifier, random_unet, images
from guided_diffusion.guidance import make_classifier_cond_fn
from guided_diffusion.inference import prepare_for_inference
from guided_diffusion.segment.saliency import cdm_saliency

def resident_mib():  # anonymous memory only: code pages of the libraries load lazily
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024

model, diffusion = random_unet(32)
setup = prepare_for_inference(model, random_classifier(32), device="cpu")
cond_fn = make_classifier_cond_fn(setup.classifier, 10.0)
resident = []
for batch in (12, 7) * 8:  # a last, smaller batch as a data set's end gives
    x0, noise = images(batch, size=32)
    cdm_saliency(setup.model, diffusion, x0, torch.ones(batch, dtype=torch.long), noise_level=30, steps=3, tau=0.0,
                 cond_fn=cond_fn, noise=noise)
    resident.append(resident_mib())
print(setup.reuses_cpu_memory, *resident)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_kept_freed_memory_does_not_grow_over_repeated_batches():
    script = HEAP_GROWTH_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode == 0, result.stderr
    applied, *resident = result.stdout.split()
    resident = [float(r) for r in resident]
    assert applied == "True"
    # Freed blocks are reused, not added to: a batch's activations kept each round would add about 5 MiB
    # every round. One-time jumps of a few MiB (caches, the allocator's arenas settling) come at any round,
    # so of the last 8 rounds at most 2 may grow by more than 2 MiB.
    growing = [later - earlier for earlier, later in zip(resident[7:], resident[8:]) if later - earlier > 2.0]
    assert len(growing) <= 2, resident


# ---------------------------------------------------------------------------------------------
# The profile of scripts/profile_seg.py


def test_benchmark_levers_switch_the_networks_through_their_public_switch():
    from guided_diffusion import unet_blocks
    from guided_diffusion.bench.benchmarks import LEVERS, switch_off

    model, _ = random_unet()
    x, _ = images(2)
    t, y = torch.tensor([3, 40]), torch.tensor([0, 1])
    with torch.no_grad():
        default = model(x, t, y=y)
    try:
        switch_off(("upsample_copy", "contiguous_attention"))
        assert unet_blocks._kernels != unet_blocks.DEFAULT_KERNELS
        with torch.no_grad():
            original = model(x, t, y=y)  # F.interpolate and strided attention: the same numbers
        assert torch.allclose(original, default, atol=1e-5)
    finally:
        unet_blocks.set_kernels(**unet_blocks.DEFAULT_KERNELS)
    with pytest.raises(ValueError, match="unknown levers"):
        switch_off(("warp_drive",))
    assert set(LEVERS) >= {"upsample_copy", "contiguous_attention"}


def test_profile_counts_each_network_call_and_leaves_the_maps_unchanged():
    from guided_diffusion.bench.benchmarks import count_flops
    from guided_diffusion.bench.timing import profile_cgcdm
    from guided_diffusion.segment.config import OperatingPoint

    model, diffusion = random_unet()
    classifier = random_classifier()
    x0, noise = images(3)
    y1 = torch.ones(3, dtype=torch.long)
    state = dict(model=model, diffusion=diffusion, classifier=classifier, x0=x0, noise=noise, y1=y1,
                 device=torch.device("cpu"))
    rows, maps = profile_cgcdm(state, OperatingPoint(noise_level=30, steps=3, tau=0.0, classifier_scale=10.0))
    by_phase = {row["phase"].split(" (")[0]: row for row in rows}
    assert [by_phase[p]["calls"] for p in ("UNet forward", "classifier forward", "classifier backward")] == [3, 3, 3]
    assert all(row["seconds"] >= 0 for row in rows)
    with torch.no_grad():
        one_call, _ = count_flops(lambda: classifier(x0.repeat(2, 1, 1, 1), torch.full((6,), 30)))
    # Two full calls on both branches and the shared first step's call on the three images.
    assert by_phase["classifier forward"]["flops"] == pytest.approx(2.5 * one_call, rel=1e-3)
    # The guidance differentiates for the input only: its backward costs about one forward, not two.
    assert 0.8 < by_phase["classifier backward"]["flops"] / by_phase["classifier forward"]["flops"] < 1.25
    expected = saliency.cdm_saliency(model, diffusion, x0, y1, noise_level=30, steps=3, tau=0.0, noise=noise,
                                     cond_fn=make_classifier_cond_fn(classifier, 10.0))
    assert np.array_equal(maps, expected)
