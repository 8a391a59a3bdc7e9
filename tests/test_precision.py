"""Tests for guided_diffusion.train.precision: float32 steps, float16 loss scaling, skipped steps (CPU)."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from guided_diffusion.train.precision import Precision

torch.set_num_threads(1)


def test_fp32_step_equals_plain_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(64, 2))
    reference = copy.deepcopy(model)
    x = torch.randn(5, 1, 6, 6)
    precision = Precision(model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)

    precision.zero_grad()
    with precision.autocast():
        loss = model(x).square().mean()
    precision.backward(loss)
    assert precision.step(opt) is True
    ref_opt.zero_grad()
    reference(x).square().mean().backward()
    expected_grad_norm = torch.cat([p.grad.flatten() for p in reference.parameters()]).norm().item()
    expected_param_norm = torch.cat([p.flatten() for p in reference.parameters()]).norm().item()  # before the step
    ref_opt.step()

    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert precision.log_values["grad_norm"] == pytest.approx(expected_grad_norm, rel=1e-5)
    assert precision.log_values["param_norm"] == pytest.approx(expected_param_norm, rel=1e-5)
    assert precision.state_dict() is None


def test_fp16_skips_overflow_and_lowers_loss_scale():
    conv = nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(0.1 + 1e-5)  # not representable in float16
        conv.bias.fill_(-0.2)
    reference = copy.deepcopy(conv)
    precision = Precision(conv.parameters(), torch.float16, "cpu", initial_lg_loss_scale=20, fp16_scale_growth=0.5)
    assert conv.weight.dtype == torch.float32  # the weights stay float32; only the forward pass is float16
    opt = torch.optim.AdamW(conv.parameters(), lr=1e-2, weight_decay=0.0)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    x = torch.ones(1, 1, 1, 1)

    # d loss / d output = 1, so the float16 gradient is 2**lg_loss_scale: it overflows (> 65504) until
    # the scale reaches 2**15, after five skipped steps.
    skipped = 0
    while True:
        precision.zero_grad()
        with precision.autocast():
            out = conv(x)
        assert out.dtype == torch.float16
        precision.backward(out.float().sum())
        if precision.step(opt):
            break
        skipped += 1
        assert torch.equal(conv.weight, reference.weight)  # nothing moved
        assert all(p.grad is None for p in conv.parameters())
    assert skipped == 5
    assert precision.lg_loss_scale == 15
    assert precision.log_values["grad_norm"] == pytest.approx(math.sqrt(2))
    assert precision.log_values["lg_loss_scale"] == 15

    ref_opt.zero_grad()
    reference(x).sum().backward()
    ref_opt.step()
    for param, ref in zip(conv.parameters(), reference.parameters()):
        assert torch.allclose(param, ref, atol=1e-7)

    # fp16_scale_growth 0.5: the scale doubles after two good steps in a row.
    for _ in range(2):
        precision.zero_grad()
        with precision.autocast():
            precision.backward(conv(x).float().sum() * 0.5)
        assert precision.step(opt)
    assert precision.lg_loss_scale == 16

    # The scaler's state (scale, growth tracker) round-trips through the optimizer file.
    state = precision.state_dict()
    restored = Precision(conv.parameters(), torch.float16, "cpu")
    restored.load_state_dict(state)
    assert restored.lg_loss_scale == 16 and restored.state_dict() == state


def test_fp16_skips_non_finite_gradient():
    model = nn.Conv2d(1, 2, 3)
    precision = Precision(model.parameters(), torch.float16, "cpu", initial_lg_loss_scale=4)
    before = [p.clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    precision.zero_grad()
    precision.backward(sum(p.float().sum() for p in model.parameters()))
    model.bias.grad[0] = float("nan")
    assert precision.step(opt) is False
    assert precision.lg_loss_scale == 3
    assert "grad_norm" not in precision.log_values and precision.log_values["lg_loss_scale"] == 3
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
