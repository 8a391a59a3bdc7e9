"""CAM-family baselines: planted region, the defining identity of CAM, and CAM = Grad-CAM for GAP + linear heads."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from guided_diffusion.segment.cam import CAM_METHODS, cam_saliency, class_activation_map, gap_linear_head
from guided_diffusion.metrics import dice
from guided_diffusion.segment.postprocess import saliency_to_mask
from guided_diffusion.resnet import ResNetClassifier
from guided_diffusion.script_util import create_classifier


class BrightnessClassifier(nn.Module):
    """Features = x (one channel, through a fixed 1x1 conv), GAP, linear: logit_1 - logit_0 grows with brightness."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(1, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.features.weight.fill_(1.0)
            self.features.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.fc.bias.zero_()

    @property
    def layer4(self):  # the last spatial feature map, where CAM looks for a ResNet's
        return self.features

    def forward(self, x, timesteps=None):
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def planted_images(batch=2, size=32):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, size, size, generator=generator) * 0.05
    region = np.zeros((size, size), bool)
    region[8:19, 12:25] = True
    x[:, :, torch.from_numpy(region)] = 1.0
    return x, region


@pytest.mark.parametrize("method", CAM_METHODS)
def test_every_method_finds_the_region_that_drives_the_logit(method):
    x, region = planted_images()
    maps = cam_saliency(BrightnessClassifier(), x, 1, method)
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    for mask in saliency_to_mask(maps):
        assert dice(mask, region) == 1.0


def randomised(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return module.eval()


def adaptive_encoder():
    classifier = create_classifier(32, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="16",
                                   classifier_channel_mult="1,2", classifier_pool="adaptive")
    return randomised(classifier, 1)


def test_cam_spatial_mean_plus_bias_is_the_logit():
    x = torch.randn(2, 1, 32, 32)
    for classifier in (adaptive_encoder(), ResNetClassifier(50, in_channels=1, num_classes=2).eval()):
        pooling, weight, bias = gap_linear_head(classifier)
        with torch.no_grad():
            logits = classifier(x)
        for target in (0, 1):
            raw = class_activation_map(classifier, x, target)
            torch.testing.assert_close(raw.mean(dim=(1, 2)) + bias[target], logits[:, target], rtol=1e-4, atol=1e-5)


def test_cam_equals_grad_cam_when_the_target_layer_feeds_the_average_pool():
    classifier = adaptive_encoder()
    x = torch.randn(3, 1, 32, 32)
    targets = torch.tensor([0, 1, 1])
    cam = cam_saliency(classifier, x, targets, "cam")
    grad_cam = cam_saliency(classifier, x, targets, "gradcam")
    assert cam.std() > 0.05
    np.testing.assert_allclose(cam, grad_cam, atol=1e-4)


def test_attention_pool_encoder_runs_every_method_and_cam_falls_back_to_grad_cam():
    classifier = randomised(create_classifier(32, classifier_width=32, classifier_depth=1,
                                              classifier_attention_resolutions="16", classifier_channel_mult="1,2",
                                              classifier_num_head_channels=32), 3)
    assert gap_linear_head(classifier) is None
    x = torch.randn(2, 1, 32, 32)
    maps = {method: cam_saliency(classifier, x, 1, method) for method in CAM_METHODS}
    for method, result in maps.items():
        assert result.shape == (2, 32, 32) and np.all(np.isfinite(result)), method
    np.testing.assert_array_equal(maps["cam"], maps["gradcam"])
    with pytest.raises(ValueError):
        class_activation_map(classifier, x, 1)


def test_unknown_method_is_a_user_error():
    with pytest.raises(ValueError, match="method"):
        cam_saliency(BrightnessClassifier(), torch.zeros(1, 1, 8, 8), 1, "eigencam")
