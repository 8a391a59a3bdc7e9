"""The UNet's building blocks: timestep-conditioned residual blocks, resampling and self-attention.

Names follow the openai improved/guided-diffusion family (ResBlock in_layers/emb_layers/
out_layers/skip_connection, AttentionBlock norm/qkv/attention/proj_out), so checkpoints of that
family load. `unet.py` assembles them into the UNet and its encoder-half classifier.

Two operations have a faster form than the textbook one: nearest x2 upsampling (a broadcast copy on
the CPU) and attention (q, k, v made contiguous for the fused kernel). `set_kernels` and its context
manager `kernels` swap in other implementations of either, e.g. the original code's behaviour in
the benchmarks; the defaults are `DEFAULT_KERNELS`.
"""

import contextlib
from abc import abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ModelConfigError  # noqa: F401  (re-exported: raised by the blocks and `unet`)
from .nn import SiLU, avg_pool_nd, checkpoint, conv_nd, linear, normalization, zero_module


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to `x` given the timestep embedding `emb`."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential container that hands the embedding to the children that take one."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


def _spatial_stride(dims):
    # 3-D signals are resampled in the inner two dimensions only.
    return (1, 2, 2) if dims == 3 else 2


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 convolution."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        assert x.shape[1] == self.channels
        x = _kernels["upsample_2x"](x)  # 3-D signals: the inner two dimensions only
        return self.conv(x) if self.use_conv else x


def _nearest_2x(x):
    """Nearest-neighbour x2 upsampling of the last two dimensions (each value in a 2 x 2 block).

    On the CPU F.interpolate's nearest kernel is about 10x slower than this broadcast copy (bitwise
    the same result), a tenth of the demo UNet's forward pass; elsewhere F.interpolate is kept.
    """
    if not x.is_cpu:
        size = (*x.shape[2:-2], x.shape[-2] * 2, x.shape[-1] * 2)
        return F.interpolate(x, size, mode="nearest")
    *lead, height, width = x.shape
    return x[..., :, None, :, None].expand(*lead, height, 2, width, 2).reshape(*lead, 2 * height, 2 * width)


class Downsample(nn.Module):
    """x2 downsampling: a strided 3x3 convolution, or average pooling."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = _spatial_stride(dims)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling.

    The embedding is added to the features after the first convolution, or with
    `use_scale_shift_norm` it modulates the second normalisation as
    norm(h) * (1 + scale) + shift.
    """

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, dims=2, use_checkpoint=False, up=False, down=False):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels), SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(SiLU(), linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            # Resample between the normalisation and the convolution of the first layer.
            norm_act, conv = self.in_layers[:-1], self.in_layers[-1]
            h = conv(self.h_upd(norm_act(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(emb_out.shape + (1,) * (h.ndim - emb_out.ndim))
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _attention(q, k, v):
    """softmax(q^T k / sqrt(d)) v for (N, heads, d, T) tensors; returns (N, heads, d, T).

    The fused kernels need (N, heads, T, d) with unit stride in d: the transposed views are made
    contiguous first, else SDPA falls back to its unfused path (7x slower on the CPU at T = 256).
    """
    q, k, v = (t.transpose(-1, -2).contiguous() for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(-1, -2)


# The implementations the blocks call: `upsample_2x(x)` and `attention(q, k, v)`.
DEFAULT_KERNELS = {"upsample_2x": _nearest_2x, "attention": _attention}
_kernels = dict(DEFAULT_KERNELS)


def set_kernels(upsample_2x=None, attention=None):
    """Make the blocks of this process call `upsample_2x(x)` for nearest x2 upsampling of the last two
    dimensions and `attention(q, k, v)` for softmax(q^T k / sqrt(d)) v of (N, heads, d, T) tensors
    (None keeps the current one). Returns the previous {name: implementation}, for `set_kernels(**it)`."""
    previous = dict(_kernels)
    for name, kernel in (("upsample_2x", upsample_2x), ("attention", attention)):
        if kernel is not None:
            _kernels[name] = kernel
    return previous


@contextlib.contextmanager
def kernels(upsample_2x=None, attention=None):
    """`set_kernels` while the block runs; the previous implementations afterwards."""
    previous = set_kernels(upsample_2x, attention)
    try:
        yield
    finally:
        set_kernels(**previous)


class QKVAttentionLegacy(nn.Module):
    """Multi-head attention on a (B, 3*H*C, T) qkv tensor whose heads are split before q/k/v.

    This is the layout of improved-diffusion checkpoints.
    """

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        batch, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(batch, self.n_heads, 3 * ch, length).split(ch, dim=2)
        return _kernels["attention"](q, k, v).reshape(batch, -1, length)


class QKVAttention(nn.Module):
    """Multi-head attention on a (B, 3*H*C, T) qkv tensor split into q, k, v before the heads."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        batch, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        q, k, v = (t.reshape(batch, self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))
        return _kernels["attention"](q, k, v).reshape(batch, -1, length)


def _heads(channels, num_heads, num_head_channels):
    if num_head_channels == -1:
        return num_heads
    if channels % num_head_channels:
        raise ModelConfigError(
            "num_head_channels", f"{num_head_channels} does not divide the {channels} channels of an attention layer"
        )
    return channels // num_head_channels


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, as a residual branch (zero-initialised)."""

    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_checkpoint=False,
                 use_new_attention_order=False):
        super().__init__()
        self.channels = channels
        self.num_heads = _heads(channels, num_heads, num_head_channels)
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = (QKVAttention if use_new_attention_order else QKVAttentionLegacy)(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x):
        batch, channels, *spatial = x.shape
        x = x.reshape(batch, channels, -1)
        h = self.attention(self.qkv(self.norm(x)))
        return (x + self.proj_out(h)).reshape(batch, channels, *spatial)
