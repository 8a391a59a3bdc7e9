"""CAM-family saliency baselines on the trained classifier, at t = 0.

Grad-CAM, Grad-CAM++, LayerCAM and Score-CAM come from the `grad-cam` library
(`pytorch_grad_cam`), applied to the last spatial feature map (`cam_target_layer`) with the
classifier called as `classifier(x)` (timesteps None means t = 0). Plain CAM
(Zhou et al. 2016) is computed here from the head's weights, because the
library has no such method: for a head that is global average pooling
followed by a linear layer, CAM_c = sum_k W[c, k] * F_k, with F the feature map
entering the pooling. The encoder classifier with `--classifier_pool adaptive`
and the ResNets have such a head. The attention-pooling encoder has none; for
it "cam" falls back to Grad-CAM, the gradient form of CAM (Selvaraju et al.
2017), which equals CAM up to a positive factor whenever the head is GAP + linear.

All maps follow the library's convention: ReLU, per-image min-max to [0, 1],
bilinear resize to the input size. Output: float32 numpy (B, H, W).
"""

import contextlib
import io

import numpy as np
import torch
import torch.nn as nn


CAM_METHODS = ("cam", "gradcam", "gradcam++", "layercam", "scorecam")


def _library_class(method):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM

    return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM, "scorecam": ScoreCAM}[method]


def cam_target_layer(classifier):
    """The module whose output is the classifier's last spatial feature map (the usual CAM target).

    ResNets: layer 4. The encoder UNet: the normalisation + activation entering its pooling head
    (`out[1]`) for the pooled heads, else its middle block.
    """
    if hasattr(classifier, "layer4"):
        return classifier.layer4
    pool = getattr(classifier, "pool", None)
    if pool in ("adaptive", "attention"):
        return classifier.out[1]
    if hasattr(classifier, "middle_block"):
        return classifier.middle_block
    raise ValueError(f"{type(classifier).__name__}: no known feature map for CAM (expected a ResNet or the encoder UNet)")


def gap_linear_head(classifier):
    """(pooling module, weight (K, C), bias (K,)) when the head is global average pooling + linear, else None."""
    out = getattr(classifier, "out", None)
    if getattr(classifier, "pool", None) == "adaptive" and isinstance(out, nn.Sequential):
        pooling, projection = out[2], out[3]
        return pooling, projection.weight.flatten(1), projection.bias
    avgpool, fc = getattr(classifier, "avgpool", None), getattr(classifier, "fc", None)
    if isinstance(avgpool, nn.AdaptiveAvgPool2d) and isinstance(fc, nn.Linear):
        return avgpool, fc.weight, fc.bias
    return None


def _targets_tensor(target_class, batch, device):
    target = torch.as_tensor(target_class, device=device).long()
    if target.ndim == 0:
        target = target.expand(batch)
    if target.shape != (batch,):
        raise ValueError(f"target_class must be an int or have shape ({batch},), got {tuple(target.shape)}")
    return target


def class_activation_map(classifier, x, target_class):
    """Raw CAM (B, h, w) at the feature resolution: sum_k W[c, k] F_k (no bias, ReLU or resizing).

    Its spatial mean plus the bias is the class logit, which is what makes it CAM.
    Raises ValueError when the head is not GAP + linear.
    """
    head = gap_linear_head(classifier)
    if head is None:
        raise ValueError(f"{type(classifier).__name__} has no global-average-pooling + linear head")
    pooling, weight, _ = head
    target = _targets_tensor(target_class, x.shape[0], x.device)
    captured = {}

    def keep_features(module, inputs, output):
        captured["features"] = inputs[0]  # returns None: the forward pass is unchanged

    handle = pooling.register_forward_hook(keep_features)
    try:
        with torch.no_grad():
            classifier(x)
    finally:
        handle.remove()
    features = captured["features"].float()
    return torch.einsum("bchw,bc->bhw", features, weight[target].detach().float())


def _scale_like_library(maps, size):
    from pytorch_grad_cam.utils.image import scale_cam_image

    # As the library does for one target layer: ReLU, min-max, resize (it wants width, height), min-max again.
    return scale_cam_image(scale_cam_image(np.maximum(maps, 0), (size[1], size[0])))


def cam_saliency(classifier, x0, target_class, method="gradcam"):
    """Saliency maps (B, H, W) in [0, 1] of `method` (one of CAM_METHODS) for class `target_class`.

    `target_class` is an int or a (B,) tensor of class indices.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"method {method!r}: CAM methods are {', '.join(CAM_METHODS)}")
    classifier.eval()
    size = tuple(x0.shape[-2:])
    target = _targets_tensor(target_class, x0.shape[0], x0.device)
    if method == "cam" and gap_linear_head(classifier) is not None:
        raw = class_activation_map(classifier, x0, target).cpu().numpy()
        return _scale_like_library(raw, size).astype(np.float32)
    if method == "cam":
        method = "gradcam"  # the gradient form of CAM for heads that are not GAP + linear (see module doc)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = cam_target_layer(classifier)
    # Score-CAM draws a progress bar per image; the caller's bar is enough.
    quiet = contextlib.redirect_stderr(io.StringIO()) if method == "scorecam" else contextlib.nullcontext()
    with torch.enable_grad(), quiet, _library_class(method)(model=classifier, target_layers=[layer]) as cam:
        if method == "scorecam":
            cam.batch_size = 64  # masked copies of the input per classifier call
        maps = cam(input_tensor=x0, targets=[ClassifierOutputTarget(int(c)) for c in target])
    return np.asarray(maps, dtype=np.float32)
