"""Tests for guided_diffusion.nn, guided_diffusion.unet and guided_diffusion.fp16_util (tiny models, CPU)."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from guided_diffusion.segment.cam import cam_target_layer
from guided_diffusion.nn import checkpoint, mean_flat, timestep_embedding, update_ema, zero_module
from guided_diffusion.unet import (
    AttentionBlock,
    Downsample,
    EncoderUNetModel,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    Upsample,
    UNetModel,
)

torch.set_num_threads(1)

CHANNEL_MULT = {
    32: (1, 2, 2, 2),
    64: (1, 2, 3, 4),
    128: (1, 1, 2, 3, 4),
    224: (1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
}


def tiny_unet(image_size=32, in_channels=1, out_channels=None, num_classes=2, **kwargs):
    config = dict(
        image_size=image_size, in_channels=in_channels, model_channels=32, out_channels=out_channels,
        num_res_blocks=1, attention_resolutions=(image_size // 16, image_size // 8),
        channel_mult=CHANNEL_MULT[image_size],
        num_classes=num_classes, num_heads=2, use_scale_shift_norm=True,
    )
    config.update(kwargs)
    return UNetModel(**config)


def randomize_zero_params(model, seed=0):
    """Give zero-initialised layers random weights, so that every path affects the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return model


# ----------------------------------------------------------------------------- nn.py


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 2.0, 7.5])
    emb = timestep_embedding(t, 6, max_period=100)
    for row, tv in enumerate(t.tolist()):
        for i in range(3):
            freq = 100 ** (-i / 3)
            assert emb[row, i].item() == pytest.approx(math.cos(tv * freq), abs=1e-6)
            assert emb[row, 3 + i].item() == pytest.approx(math.sin(tv * freq), abs=1e-6)
    odd = timestep_embedding(t, 7, max_period=100)
    assert odd.shape == (3, 7)
    assert torch.equal(odd[:, :6], emb)
    assert torch.equal(odd[:, 6], torch.zeros(3))


def test_update_ema_and_mean_flat_and_zero_module():
    target = [torch.tensor([1.0, 2.0])]
    update_ema(target, [torch.tensor([3.0, 6.0])], rate=0.75)
    assert torch.allclose(target[0], torch.tensor([1.5, 3.0]))
    assert torch.allclose(mean_flat(torch.arange(12.0).reshape(2, 2, 3)), torch.tensor([2.5, 8.5]))
    conv = zero_module(nn.Conv2d(2, 3, 3))
    assert not any(p.any() for p in conv.parameters())


def test_checkpoint_helper_matches_plain_call():
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)
    grads = []
    for flag in (False, True):
        out = checkpoint(lambda a: torch.tanh(a @ w), (x,), [w], flag)
        grads.append(torch.autograd.grad(out.square().sum(), (x, w)))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------- attention


def reference_attention(q, k, v):
    """softmax(q^T k / sqrt(d)) v for one head; q, k, v are (d, T)."""
    weights = torch.softmax(q.T @ k / math.sqrt(q.shape[0]), dim=-1)  # (T, T)
    return v @ weights.T  # (d, T)


@pytest.mark.parametrize("legacy", [True, False])
def test_attention_orderings_match_explicit_reference(legacy):
    torch.manual_seed(0)
    batch, heads, ch, length = 2, 3, 8, 10
    qkv = torch.randn(batch, 3 * heads * ch, length, dtype=torch.float32)
    attention = QKVAttentionLegacy(heads) if legacy else QKVAttention(heads)
    out = attention(qkv)
    assert out.shape == (batch, heads * ch, length)
    for b in range(batch):
        for h in range(heads):
            if legacy:  # each head holds its own [q; k; v]
                block = qkv[b, h * 3 * ch:(h + 1) * 3 * ch]
                q, k, v = block[:ch], block[ch:2 * ch], block[2 * ch:]
            else:  # [q of all heads; k of all heads; v of all heads]
                q, k, v = (qkv[b, part * heads * ch + h * ch: part * heads * ch + (h + 1) * ch] for part in range(3))
            expected = reference_attention(q, k, v)
            assert torch.allclose(out[b, h * ch:(h + 1) * ch], expected, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_upsample_repeats_each_value_in_a_two_by_two_block_as_interpolate_does(dims):
    torch.manual_seed(0)
    x = torch.randn((2, 4, 3, 5, 6) if dims == 3 else (2, 4, 5, 6), requires_grad=True)
    out = Upsample(4, use_conv=False, dims=dims)(x)
    size = (3, 10, 12) if dims == 3 else (10, 12)  # 3-D signals: the inner two dimensions only
    expected = torch.nn.functional.interpolate(x, size, mode="nearest")
    assert out.shape == expected.shape and torch.equal(out, expected)
    assert torch.equal(out[..., 3, 5], x[..., 1, 2]) and torch.equal(out[..., 2, 4], x[..., 1, 2])
    weights = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    assert torch.allclose(grad, expected_grad, atol=1e-6)


def test_kernels_switch_the_blocks_implementations_and_restore_them():
    from guided_diffusion import unet_blocks

    model = randomize_zero_params(tiny_unet()).eval()
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([3, 40]), torch.tensor([0, 1])
    with torch.no_grad():
        default = model(x, t, y=y)
    calls = []

    def interpolate(x):
        calls.append("upsample_2x")
        return torch.nn.functional.interpolate(x, (x.shape[-2] * 2, x.shape[-1] * 2), mode="nearest")

    def explicit(q, k, v):
        calls.append("attention")
        weights = torch.einsum("nhct,nhcs->nhts", q * q.shape[-2] ** -0.5, k).softmax(dim=-1)
        return torch.einsum("nhts,nhcs->nhct", weights, v)

    with unet_blocks.kernels(upsample_2x=interpolate, attention=explicit), torch.no_grad():
        switched = model(x, t, y=y)
    assert {"upsample_2x", "attention"} <= set(calls)
    assert torch.allclose(switched, default, atol=1e-5)
    assert unet_blocks._kernels == unet_blocks.DEFAULT_KERNELS  # restored after the block
    previous = unet_blocks.set_kernels(attention=explicit)
    try:
        assert unet_blocks._kernels["attention"] is explicit and previous == unet_blocks.DEFAULT_KERNELS
    finally:
        unet_blocks.set_kernels(**previous)
    assert unet_blocks._kernels == unet_blocks.DEFAULT_KERNELS


def test_attention_block_is_identity_at_init_and_uses_head_channels():
    block = AttentionBlock(64, num_head_channels=16)
    assert block.num_heads == 4
    x = torch.randn(2, 64, 4, 4)
    assert torch.equal(block(x), x)  # zero-initialised projection


# ----------------------------------------------------------------------------- UNetModel


@pytest.mark.parametrize("image_size", [32, 64, 128])
@pytest.mark.parametrize("in_channels", [1, 4])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_unet_output_shape_small_sizes(image_size, in_channels, learn_sigma):
    out_channels = in_channels * (2 if learn_sigma else 1)
    model = tiny_unet(image_size, in_channels, out_channels)
    x = torch.randn(2, in_channels, image_size, image_size)
    with torch.no_grad():
        out = model(x, torch.tensor([1, 500]), torch.tensor([0, 1]))
    assert out.shape == (2, out_channels, image_size, image_size)


@pytest.mark.parametrize("image_size", [224, 256])
def test_unet_output_shape_large_sizes(image_size):
    model = tiny_unet(image_size, 4, 8, attention_resolutions=(16,))
    x = torch.randn(1, 4, image_size, image_size)
    with torch.no_grad():
        out = model(x, torch.tensor([10]), torch.tensor([1]))
    assert out.shape == (1, 8, image_size, image_size)
    assert model.out_channels == 8


def test_unet_default_out_channels_follow_input():
    assert tiny_unet(in_channels=3).out_channels == 3


@pytest.mark.parametrize("variant", [
    dict(resblock_updown=True),
    dict(use_new_attention_order=True, num_head_channels=32),
    dict(use_scale_shift_norm=False, conv_resample=False),
    dict(channel_mult=(0.5, 1, 1, 2), model_channels=64),
])
def test_unet_variants_run(variant):
    model = randomize_zero_params(tiny_unet(**variant))
    out = model(torch.randn(2, 1, 32, 32), torch.tensor([3, 4]), torch.tensor([1, 0]))
    assert out.shape == (2, 1, 32, 32)
    assert torch.isfinite(out).all()


def test_unet_structure_and_openai_parameter_names():
    model = tiny_unet(64, in_channels=1, out_channels=2, attention_resolutions=(2, 4))
    levels = len(CHANNEL_MULT[64])
    # encoder: stem + num_res_blocks per level + a downsample between levels
    assert len(model.input_blocks) == 1 + levels * 1 + (levels - 1)
    assert len(model.output_blocks) == levels * 2
    assert sum(isinstance(m, Downsample) for m in model.modules()) == levels - 1
    upsamples = [m for m in model.modules() if isinstance(m, Upsample)]
    assert len(upsamples) == levels - 1
    # attention at downsample factors 2 and 4 only: once per block there, plus the middle block
    attention = [name for name, m in model.named_modules() if isinstance(m, AttentionBlock)]
    assert attention == ["input_blocks.3.1", "input_blocks.5.1", "middle_block.1",
                         "output_blocks.2.1", "output_blocks.3.1", "output_blocks.4.1", "output_blocks.5.1"]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "time_embed.0.weight": (128, 32),
        "time_embed.2.weight": (128, 128),
        "label_emb.weight": (2, 128),
        "input_blocks.0.0.weight": (32, 1, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (32,),
        "input_blocks.1.0.in_layers.2.weight": (32, 32, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (64, 128),  # scale and shift
        "input_blocks.1.0.out_layers.0.weight": (32,),
        "input_blocks.1.0.out_layers.3.weight": (32, 32, 3, 3),
        "input_blocks.2.0.op.weight": (32, 32, 3, 3),
        "input_blocks.3.0.skip_connection.weight": (64, 32, 1, 1),
        "input_blocks.3.1.norm.weight": (64,),
        "input_blocks.3.1.qkv.weight": (192, 64, 1),
        "input_blocks.3.1.proj_out.weight": (64, 64, 1),
        "middle_block.0.in_layers.2.weight": (128, 128, 3, 3),
        "middle_block.1.qkv.weight": (384, 128, 1),
        "output_blocks.0.0.skip_connection.weight": (128, 256, 1, 1),
        "output_blocks.1.1.conv.weight": (128, 128, 3, 3),
        "output_blocks.3.2.conv.weight": (96, 96, 3, 3),
        "out.0.weight": (32,),
        "out.2.weight": (2, 32, 3, 3),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key


def test_soft_one_hot_labels_equal_hard_labels():
    model = randomize_zero_params(tiny_unet()).eval()
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([5, 50, 500])
    hard = torch.tensor([1, 0, 1])
    soft = nn.functional.one_hot(hard, 2).float()
    with torch.no_grad():
        out_hard, out_soft = model(x, t, hard), model(x, t, soft)
    assert out_hard.abs().max() > 0
    assert torch.allclose(out_hard, out_soft, atol=1e-6, rtol=0)
    # the label actually matters
    assert not torch.allclose(out_hard, model(x, t, 1 - hard).detach(), atol=1e-4)


def test_soft_label_mix_equals_averaged_embedding_row():
    model = randomize_zero_params(tiny_unet(num_classes=3)).eval()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([7, 300])
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    averaged = copy.deepcopy(model)
    with torch.no_grad():
        averaged.label_emb.weight[2] = model.label_emb.weight[:2].mean(dim=0)
        out_soft = model(x, t, soft)
        out_row = averaged(x, t, torch.tensor([2, 2]))
    assert torch.allclose(out_soft, out_row, atol=1e-5)


def test_label_argument_is_validated():
    conditional, unconditional = tiny_unet(), tiny_unet(num_classes=None)
    x = torch.randn(1, 1, 32, 32)
    with pytest.raises(ValueError, match="class-conditional"):
        conditional(x, torch.tensor([1]))
    with pytest.raises(ValueError, match="without class conditioning"):
        unconditional(x, torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="soft labels"):
        conditional(x, torch.tensor([1]), torch.ones(1, 3))
    with pytest.raises(ValueError, match="divisible"):
        conditional(torch.randn(1, 1, 36, 36), None, torch.tensor([0]))


def test_timesteps_none_means_zero():
    model = randomize_zero_params(tiny_unet()).eval()
    x, y = torch.randn(2, 1, 32, 32), torch.tensor([0, 1])
    with torch.no_grad():
        out_none = model(x, None, y)
        assert torch.equal(out_none, model(x, torch.zeros(2, dtype=torch.long), y))
        assert torch.equal(model(x, 9, y), model(x, torch.tensor([9, 9]), y))
        assert not torch.allclose(out_none, model(x, torch.tensor([900, 900]), y), atol=1e-4)


def test_gradient_checkpointing_gives_same_gradients():
    plain = randomize_zero_params(tiny_unet(dropout=0.1, resblock_updown=True))
    checkpointed = copy.deepcopy(plain)
    for module in checkpointed.modules():
        if isinstance(module, (ResBlock, AttentionBlock)):
            module.use_checkpoint = True
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([3, 700]), torch.tensor([1, 0])
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(123)  # same dropout masks in both runs
        model(x, t, y).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(g.abs().sum() > 0 for n, g in grads[0].items() if "in_layers.2" in n)
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-5), name


def test_impossible_configurations_are_rejected():
    with pytest.raises(ValueError, match="attention"):
        tiny_unet(attention_resolutions=(3,))
    with pytest.raises(ValueError, match="attention"):
        tiny_unet(attention_resolutions=(16,))  # four levels reach downsample factor 8 only
    with pytest.raises(ValueError, match="divisible"):
        UNetModel(36, 1, 32, 1, 1, (), channel_mult=(1, 2, 2, 2))


def test_fp16_conversion_round_trip():
    model = randomize_zero_params(tiny_unet())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert model.dtype == torch.float32
    model.convert_to_fp16()
    assert model.dtype == torch.float16
    assert model.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
    assert model.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32  # norms stay fp32
    assert model.time_embed[0].weight.dtype == torch.float32
    model.convert_to_fp32()
    assert model.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


def test_fp16_forward_close_to_fp32():
    model = randomize_zero_params(tiny_unet()).eval()
    x, t, y = torch.randn(1, 1, 32, 32), torch.tensor([10]), torch.tensor([1])
    with torch.no_grad():
        reference = model(x, t, y)
        model.convert_to_fp16()
        try:
            half = model(x, t, y)
        except RuntimeError as err:  # some CPU builds lack half kernels
            pytest.skip(f"float16 forward not supported on this CPU: {err}")
    assert half.dtype == torch.float32
    assert torch.allclose(half, reference, atol=5e-2 * reference.abs().max().item())


# ----------------------------------------------------------------------------- EncoderUNetModel


def tiny_encoder(pool, **kwargs):
    config = dict(
        image_size=32, in_channels=1, model_channels=32, out_channels=3, num_res_blocks=1,
        attention_resolutions=(4, 8), channel_mult=(1, 2, 2, 2), num_head_channels=32,
        use_scale_shift_norm=True, resblock_updown=True, pool=pool,
    )
    config.update(kwargs)
    return EncoderUNetModel(**config)


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_encoder_output_shape_and_cam_target(pool):
    model = randomize_zero_params(tiny_encoder(pool))
    captured = []
    cam_target_layer(model).register_forward_hook(lambda module, inputs, output: captured.append(output))
    logits = model(torch.randn(2, 1, 32, 32), torch.tensor([1, 999]))
    assert logits.shape == (2, 3)
    assert captured and captured[-1].ndim == 4 and captured[-1].shape[0] == 2
    with torch.no_grad():
        x = torch.randn(2, 1, 32, 32)
        assert torch.equal(model(x), model(x, torch.zeros(2, dtype=torch.long)))


def test_encoder_attention_pool_needs_head_channels():
    with pytest.raises(ValueError, match="^pool: attention needs num_head_channels"):
        tiny_encoder("attention", num_head_channels=-1)
    with pytest.raises(ValueError, match="^pool: 'median' is not one of"):
        tiny_encoder("median")


def test_encoder_has_no_label_embedding_and_fp16_round_trip():
    model = tiny_encoder("attention")
    assert not hasattr(model, "label_emb")
    model.convert_to_fp16()
    assert model.dtype == torch.float16
    model.convert_to_fp32()
    assert model.dtype == torch.float32


def test_use_checkpoint_routes_blocks_through_torch_checkpoint(monkeypatch):
    import torch.utils.checkpoint as torch_checkpoint

    calls = []
    original = torch_checkpoint.checkpoint

    def counting(func, *args, **kwargs):
        calls.append(func)
        return original(func, *args, **kwargs)

    monkeypatch.setattr(torch_checkpoint, "checkpoint", counting)
    x, t, y = torch.randn(1, 1, 32, 32), torch.tensor([1]), torch.tensor([0])
    tiny_unet()(x, t, y)
    assert calls == []
    model = tiny_unet(use_checkpoint=True)
    model(x, t, y)
    blocks = [m for m in model.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    assert len(calls) == len(blocks)
    with torch.no_grad():  # nothing to recompute without gradients
        model(x, t, y)
    assert len(calls) == len(blocks)
