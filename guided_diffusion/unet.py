"""The diffusion UNet (class-conditional, soft labels allowed) and its encoder-half classifier,
assembled from the blocks of `unet_blocks`.

Module and parameter names follow the openai improved/guided-diffusion family
(input_blocks, middle_block, output_blocks, out, time_embed, label_emb, ResBlock
in_layers/emb_layers/out_layers/skip_connection, AttentionBlock
norm/qkv/attention/proj_out), so checkpoints of that family load.
`attention_resolutions` holds downsample factors (1, 2, 4, ...), not pixel sizes.
"""

import torch
import torch.nn as nn

from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import SiLU, conv_nd, linear, normalization, timestep_embedding, zero_module
from .unet_blocks import (  # noqa: F401  (re-exported: the blocks are part of this module's interface)
    AttentionBlock,
    Downsample,
    ModelConfigError,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    TimestepBlock,
    TimestepEmbedSequential,
    Upsample,
    _heads,
)


def _check_levels(image_size, channel_mult, attention_resolutions):
    levels = len(channel_mult)
    if image_size % 2 ** (levels - 1):
        raise ModelConfigError(
            "image_size", f"{image_size} is not divisible by {2 ** (levels - 1)}, "
                          f"as the {levels} levels of channel_mult {tuple(channel_mult)} require"
        )
    factors = {2**i for i in range(levels)}
    missing = sorted(set(attention_resolutions) - factors)
    if missing:
        raise ModelConfigError(
            "attention_resolutions", f"the downsample factors {missing} never occur in a network with "
                                     f"channel_mult {tuple(channel_mult)} (available: {sorted(factors)})"
        )


def _timesteps_for(x, timesteps):
    """A (B,) timestep tensor on x's device; None means t=0 (for single-argument callers such as CAM)."""
    if timesteps is None:
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    timesteps = torch.as_tensor(timesteps, device=x.device)
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(x.shape[0])
    return timesteps


class _Encoder(nn.Module):
    """The part shared by UNetModel and EncoderUNetModel: time embedding, encoder, middle block."""

    def _build_encoder(self, in_channels, model_channels, num_res_blocks, attention_resolutions, dropout,
                       channel_mult, conv_resample, dims, use_checkpoint, num_heads, num_head_channels,
                       use_scale_shift_norm, resblock_updown, use_new_attention_order):
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), SiLU(), linear(time_embed_dim, time_embed_dim)
        )
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
        self.input_block_chans = [ch]
        res_kwargs = dict(dims=dims, use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm)
        attn_kwargs = dict(num_heads=num_heads, num_head_channels=num_head_channels,
                           use_checkpoint=use_checkpoint, use_new_attention_order=use_new_attention_order)
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, time_embed_dim, dropout, out_channels=int(mult * model_channels),
                                   **res_kwargs)]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, **attn_kwargs))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                if resblock_updown:
                    down = ResBlock(ch, time_embed_dim, dropout, out_channels=ch, down=True, **res_kwargs)
                else:
                    down = Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                self.input_block_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_embed_dim, dropout, **res_kwargs),
            AttentionBlock(ch, **attn_kwargs),
            ResBlock(ch, time_embed_dim, dropout, **res_kwargs),
        )
        return ch, ds

    def convert_to_fp16(self):
        """Cast the torso's convolutions (input, middle and, in the UNet, output blocks) to float16,
        for inference; training keeps float32 weights under autocast."""
        for part in self._torso():
            part.apply(convert_module_to_f16)

    def convert_to_fp32(self):
        """Cast the torso back to float32."""
        for part in self._torso():
            part.apply(convert_module_to_f32)

    def _torso(self):
        return [self.input_blocks, self.middle_block] + ([self.output_blocks] if hasattr(self, "output_blocks") else [])

    @property
    def dtype(self):
        """The dtype the network's torso computes in (float16 after `convert_to_fp16`)."""
        return self.input_blocks[0][0].weight.dtype

    def _time_embedding(self, x, timesteps):
        t_emb = timestep_embedding(_timesteps_for(x, timesteps), self.model_channels)
        return self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))


class UNetModel(_Encoder):
    """The denoising UNet with timestep embedding and optional class conditioning.

    :param image_size: training image size; must be divisible by 2**(len(channel_mult)-1).
    :param attention_resolutions: downsample factors at which attention is used.
    :param num_classes: if set, the model is class-conditional with `num_classes` labels.
    :param use_fp16: recorded for the loaders, which call `convert_to_fp16()` for inference (training
        maps it onto float16 autocast).
    :param num_heads_upsample: heads of the decoder's attention (-1: same as num_heads).
    """

    def __init__(self, image_size, in_channels=1, model_channels=128, out_channels=None, num_res_blocks=2,
                 attention_resolutions=(), dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2,
                 num_classes=None, use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False):
        super().__init__()
        _check_levels(image_size, channel_mult, attention_resolutions)
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels or in_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16

        ch, ds = self._build_encoder(
            in_channels, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult,
            conv_resample, dims, use_checkpoint, num_heads, num_head_channels, use_scale_shift_norm,
            resblock_updown, use_new_attention_order,
        )
        time_embed_dim = model_channels * 4
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        res_kwargs = dict(dims=dims, use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm)
        skip_chans = list(self.input_block_chans)
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip_ch = skip_chans.pop()
                layers = [ResBlock(ch + skip_ch, time_embed_dim, dropout, out_channels=int(model_channels * mult),
                                   **res_kwargs)]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads_upsample,
                                                 num_head_channels=num_head_channels,
                                                 use_checkpoint=use_checkpoint,
                                                 use_new_attention_order=use_new_attention_order))
                if level and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(ResBlock(ch, time_embed_dim, dropout, out_channels=ch, up=True,
                                               **res_kwargs))
                    else:
                        layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        input_ch = int(channel_mult[0] * model_channels)
        self.out = nn.Sequential(
            normalization(ch), SiLU(), zero_module(conv_nd(dims, input_ch, self.out_channels, 3, padding=1))
        )

    def label_embedding(self, y):
        """Embedding of hard labels (LongTensor (B,)) or soft label weights (float (B, num_classes)).

        Soft weights give y @ label_emb.weight, a weighted mix of the class rows;
        a one-hot row equals the hard label.
        """
        if y.is_floating_point():
            if y.ndim != 2 or y.shape[1] != self.num_classes:
                raise ValueError(
                    f"soft labels must have shape (batch, {self.num_classes}), got {tuple(y.shape)}"
                )
            return y.to(self.label_emb.weight.dtype) @ self.label_emb.weight
        if y.ndim != 1:
            raise ValueError(f"class labels must have shape (batch,), got {tuple(y.shape)}")
        return self.label_emb(y)

    def forward(self, x, timesteps=None, y=None):
        """Predict the model output for x at `timesteps` (None: t=0) and class `y`.

        :param x: (B, in_channels, H, W) input.
        :param y: (B,) class indices or (B, num_classes) soft label weights;
            required iff the model is class-conditional.
        :return: (B, out_channels, H, W) output.
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                "y must be given to a class-conditional model" if y is None
                else "y was given to a model without class conditioning (num_classes=None)"
            )
        factor = 2 ** (len(self.channel_mult) - 1)
        if any(size % factor for size in x.shape[2:]):
            raise ValueError(f"input size {tuple(x.shape[2:])} is not divisible by {factor}")
        emb = self._time_embedding(x, timesteps)
        if y is not None:
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"y has {y.shape[0]} rows for a batch of {x.shape[0]}")
            emb = emb + self.label_embedding(y).to(emb.dtype)

        skips = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


class AttentionPool2d(nn.Module):
    """Attention pooling: the spatial mean token attends over all positions (CLIP style)."""

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None):
        super().__init__()
        self.spacial_dim = spacial_dim
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = _heads(embed_dim, None, num_heads_channels)
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x):
        batch, channels, *spatial = x.shape
        if any(size != self.spacial_dim for size in spatial):
            raise ValueError(
                f"attention pooling expects a {self.spacial_dim}x{self.spacial_dim} map, got {tuple(spatial)}; "
                "the input size must equal the classifier's image_size"
            )
        x = x.reshape(batch, channels, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = self.c_proj(self.attention(self.qkv_proj(x)))
        return x[:, :, 0]


POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


class EncoderUNetModel(_Encoder):
    """The noise-conditioned classifier: the UNet's encoder and middle block plus a pooling head.

    :param out_channels: number of classes (logits).
    :param pool: "adaptive" (global average), "attention" (AttentionPool2d; needs
        num_head_channels != -1), "spatial" / "spatial_v2" (MLP on the spatial
        means of every block).
    """

    def __init__(self, image_size, in_channels=1, model_channels=128, out_channels=2, num_res_blocks=2,
                 attention_resolutions=(), dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2,
                 use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
                 use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False,
                 pool="adaptive"):
        super().__init__()
        del num_heads_upsample  # no decoder; accepted so the UNet's flag set can be passed through
        if pool not in POOLS:
            raise ModelConfigError("pool", f"{pool!r} is not one of {', '.join(POOLS)}")
        if pool == "attention" and num_head_channels == -1:
            raise ModelConfigError(
                "pool", "attention needs num_head_channels != -1 (attention pooling splits heads by width)"
            )
        _check_levels(image_size, channel_mult, attention_resolutions)
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.channel_mult = tuple(channel_mult)
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.pool = pool

        ch, ds = self._build_encoder(
            in_channels, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult,
            conv_resample, dims, use_checkpoint, num_heads, num_head_channels, use_scale_shift_norm,
            resblock_updown, use_new_attention_order,
        )
        feature_size = sum(self.input_block_chans) + ch
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch), SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)), nn.Flatten(),
            )
        elif pool == "attention":
            self.out = nn.Sequential(
                normalization(ch), SiLU(),
                AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels),
            )
        elif pool == "spatial":
            self.out = nn.Sequential(nn.Linear(feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
        else:
            self.out = nn.Sequential(
                nn.Linear(feature_size, 2048), normalization(2048), SiLU(), nn.Linear(2048, out_channels)
            )

    def forward(self, x, timesteps=None):
        """Class logits (B, out_channels) for x at `timesteps` (None: t=0)."""
        emb = self._time_embedding(x, timesteps)
        spatial = self.pool.startswith("spatial")
        means = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial:
                means.append(h.type(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.type(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))
        return self.out(h.type(x.dtype))
