"""Small layers and helpers shared by the networks (improved-diffusion style)."""

import math

import torch
import torch.nn as nn
import torch.utils.checkpoint

SiLU = nn.SiLU


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always normalises in float32 (fp16 statistics are too coarse)."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def conv_nd(dims, *args, **kwargs):
    """A 1-D, 2-D or 3-D convolution, chosen by `dims`."""
    layers = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in layers:
        raise ValueError(f"unsupported dims: {dims}")
    return layers[dims](*args, **kwargs)


def linear(*args, **kwargs):
    """A linear layer (kept as a helper so every layer is built in one place)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1-D, 2-D or 3-D average pooling, chosen by `dims`."""
    layers = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in layers:
        raise ValueError(f"unsupported dims: {dims}")
    return layers[dims](*args, **kwargs)


def zero_module(module):
    """Zero every parameter of `module` and return it (residual branches start as identity)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def mean_flat(tensor):
    """Mean over all dimensions except the batch dimension."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def normalization(channels):
    """The network's standard normalisation: GroupNorm with 32 groups, computed in float32."""
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps.

    :param timesteps: 1-D tensor of N timesteps, one per batch element.
    :param dim: embedding width; an odd width is zero padded.
    :param max_period: the longest wavelength.
    :return: an (N, dim) float32 tensor laid out as [cos(t*f), sin(t*f)].
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


@torch.no_grad()
def update_ema(target_params, source_params, rate=0.99):
    """Move each target parameter towards its source: target <- rate*target + (1-rate)*source."""
    for target, source in zip(target_params, source_params):
        target.mul_(rate).add_(source.to(target.dtype), alpha=1 - rate)


def checkpoint(func, inputs, params, flag):
    """Evaluate `func(*inputs)`, recomputing it in the backward pass when `flag` is set.

    Trades compute for memory. `params` is accepted for interface compatibility:
    the non-reentrant torch checkpoint finds the parameters on its own.
    """
    del params
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
