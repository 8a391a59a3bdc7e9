"""A timestep-aware ResNet-18/50/101 classifier built on torchvision, for guidance and CAM baselines."""

import torch
import torch.nn as nn
import torchvision

from .nn import SiLU, linear, timestep_embedding, zero_module

_BUILDERS = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50, 101: torchvision.models.resnet101}


class ResNetClassifier(nn.Module):
    """torchvision ResNet-18/50/101 with a chosen input width, class count and optional time input.

    `keep_resolution` drops the stem's max-pool and layer 4's stride: the last feature map is then
    1/8 of the input instead of 1/32 (8 x 8 at 64 px), which CAM methods need on small images.

    The timestep is embedded (sinusoidal -> MLP) and, after each of the four
    residual stages, projected to a per-channel scale and shift:
    h * (1 + scale) + shift. The projections start at zero, so an untrained
    time path leaves the ResNet unchanged; training on noised images teaches
    it how the noise level should modulate the features.

    BatchNorm is torchvision's ordinary BatchNorm, trained with batch statistics
    and running averages. The original code froze it (running statistics fixed
    at their initial values and never updated), which for a network trained
    from scratch reduces BatchNorm to a plain affine layer.

    No weights are downloaded (torchvision builders are called with weights=None).
    Module names conv1, bn1, layer1..layer4 and fc follow torchvision.
    """

    def __init__(self, depth=50, in_channels=1, num_classes=2, time_conditioned=True, time_embed_dim=512,
                 keep_resolution=False):
        super().__init__()
        if depth not in _BUILDERS:
            raise ValueError(f"depth {depth}: ResNet depth not supported (choose 18, 50 or 101)")
        backbone = _BUILDERS[depth](weights=None)
        if keep_resolution:
            backbone.maxpool = nn.Identity()
            first = backbone.layer4[0]
            for module in (first.conv1, first.conv2, first.downsample[0]):
                module.stride = (1, 1)
        self.depth = depth
        self.keep_resolution = keep_resolution
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.time_conditioned = time_conditioned
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1, self.relu, self.maxpool = backbone.bn1, backbone.relu, backbone.maxpool
        self.layer1, self.layer2 = backbone.layer1, backbone.layer2
        self.layer3, self.layer4 = backbone.layer3, backbone.layer4
        self.avgpool = backbone.avgpool
        self.fc = nn.Linear(backbone.fc.in_features, num_classes)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

        if time_conditioned:
            self.time_channels = time_embed_dim // 4
            self.time_embed = nn.Sequential(
                linear(self.time_channels, time_embed_dim), SiLU(), linear(time_embed_dim, time_embed_dim)
            )
            stage_widths = [(stage[-1].bn3 if hasattr(stage[-1], "bn3") else stage[-1].bn2).num_features
                            for stage in self.stages]
            self.time_proj = nn.ModuleList(
                nn.Sequential(SiLU(), zero_module(linear(time_embed_dim, 2 * width))) for width in stage_widths
            )

    @property
    def stages(self):
        """The four residual stages, in order."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x, timesteps=None):
        """Class logits (B, num_classes) for x at `timesteps` (None: t=0)."""
        h = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        emb = None
        if self.time_conditioned:
            if timesteps is None:
                timesteps = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            timesteps = torch.as_tensor(timesteps, device=x.device)
            if timesteps.ndim == 0:
                timesteps = timesteps.expand(x.shape[0])
            emb = self.time_embed(timestep_embedding(timesteps, self.time_channels).to(h.dtype))
        for index, stage in enumerate(self.stages):
            h = stage(h)
            if emb is not None:
                scale, shift = self.time_proj[index](emb)[:, :, None, None].chunk(2, dim=1)
                h = h * (1 + scale) + shift
        return self.fc(torch.flatten(self.avgpool(h), 1))
