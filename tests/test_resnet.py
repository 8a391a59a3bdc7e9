"""Tests for guided_diffusion.resnet (ResNet-50/101 classifiers, CPU)."""

import socket

import pytest
import torch
import torchvision

from guided_diffusion.segment.cam import cam_target_layer
from guided_diffusion.resnet import ResNetClassifier

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail loudly if anything tries to download weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)


@pytest.mark.parametrize("depth,in_channels", [(50, 1), (50, 4), (101, 4)])
def test_output_shape(depth, in_channels):
    model = ResNetClassifier(depth=depth, in_channels=in_channels, num_classes=3).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, in_channels, 64, 64), torch.tensor([0, 999]))
    assert logits.shape == (2, 3)
    assert model.conv1.in_channels == in_channels


def test_depth_selects_torchvision_architecture():
    blocks = lambda m: [len(stage) for stage in m.stages]  # noqa: E731
    assert blocks(ResNetClassifier(depth=50)) == [3, 4, 6, 3]
    assert blocks(ResNetClassifier(depth=101, time_conditioned=False)) == [3, 4, 23, 3]
    with pytest.raises(ValueError, match="depth 34"):
        ResNetClassifier(depth=34)


def test_backbone_parameter_names_follow_torchvision():
    ours = ResNetClassifier(depth=50, in_channels=1, num_classes=2).state_dict()
    reference = torchvision.models.resnet50(weights=None).state_dict()
    backbone_keys = {k for k in ours if not k.startswith("time_")}
    assert backbone_keys == set(reference)
    for key in reference:
        if not key.startswith(("conv1.", "fc.")):
            assert ours[key].shape == reference[key].shape, key
    assert ours["conv1.weight"].shape == (64, 1, 7, 7)
    assert ours["fc.weight"].shape == (2, 2048)


def test_time_path_has_no_effect_until_trained():
    torch.manual_seed(0)
    model = ResNetClassifier(depth=50, in_channels=1, num_classes=2).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        at_zero, at_late = model(x, torch.tensor([0, 0])), model(x, torch.tensor([700, 700]))
        assert torch.equal(at_zero, at_late)
        assert torch.equal(model(x), at_zero)

    # one optimiser step on the time path alone makes the output depend on t
    time_params = [p for n, p in model.named_parameters() if n.startswith("time_")]
    opt = torch.optim.SGD(time_params, lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(x, torch.tensor([700, 700])), torch.tensor([0, 1]))
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in time_params)
    opt.step()
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([0, 0])), model(x))
        assert not torch.allclose(model(x, torch.tensor([0, 0])), model(x, torch.tensor([700, 700])), atol=1e-6)


def test_unconditioned_resnet_ignores_timesteps():
    model = ResNetClassifier(depth=50, time_conditioned=False).eval()
    assert not any(n.startswith("time_") for n, _ in model.named_parameters())
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x, torch.tensor([500])))


def test_batchnorm_is_trained_normally():
    model = ResNetClassifier(depth=50).train()
    before = model.bn1.running_mean.clone()
    model(torch.randn(4, 1, 32, 32) * 3 + 1, torch.tensor([1, 2, 3, 4]))
    assert isinstance(model.bn1, torch.nn.BatchNorm2d)
    assert not torch.equal(before, model.bn1.running_mean)


def test_cam_target_layer_is_last_stage_and_gradcam_runs():
    model = ResNetClassifier(depth=50, in_channels=1, num_classes=2).eval()
    assert cam_target_layer(model) is model.layer4
    grad_cam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with grad_cam.GradCAM(model=model, target_layers=[cam_target_layer(model)]) as cam:
        maps = cam(input_tensor=torch.randn(2, 1, 64, 64), targets=[ClassifierOutputTarget(1)] * 2)
    assert maps.shape == (2, 64, 64)
