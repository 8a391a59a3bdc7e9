"""Classifier guidance: the gradient of log p(y | x_t, t) that steers a diffusion sampler.

The diffusion's `cond_fn` hook adds it to the mean (ancestral sampling) or to
the score (DDIM). Sampling and segmentation build their guidance here.
"""

import torch
import torch.nn.functional as F


def num_classes_of(model):
    """The number of classes a (class-conditional) UNet takes as `y`; None for an unconditional one."""
    return getattr(model, "num_classes", None)


def label_model(model, conditional=None):
    """The UNet as the diffusion calls it: drops `guide_y` (meant for cond_fn) and, for an
    unconditional model, `y` (an unconditional DDPM guided toward a class by a classifier).
    `conditional` defaults to whether the model has classes (`num_classes_of`)."""
    if conditional is None:
        conditional = num_classes_of(model) is not None

    def call(x, t, y=None, guide_y=None, **kwargs):
        return model(x, t, y=y, **kwargs) if conditional else model(x, t, **kwargs)

    return call


def classifier_log_prob_gradient(classifier, x, t, target):
    """d/dx of sum_i log p(target_i | x_i, t_i).

    `target` is a LongTensor of class indices (B,) or a float tensor (B, K) of class weights, for which the
    weighted sum of log-probabilities is differentiated.
    """
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
        if target.dtype.is_floating_point:
            selected = (log_probs * target.to(log_probs.dtype)).sum()
        else:
            selected = log_probs[torch.arange(len(target), device=x.device), target.long()].sum()
        return torch.autograd.grad(selected, x_in)[0]


def make_classifier_cond_fn(classifier, scale):
    """A `cond_fn(x, t, y=None, guide_y=None, **kw)` returning scale * grad log p(target | x_t, t).

    The target is `guide_y` when given (e.g. the healthy label for one branch of CG-CDM while the UNet is
    conditioned on a soft label), else the conditioning label `y`.
    """

    def cond_fn(x, t, y=None, guide_y=None, **kwargs):
        target = guide_y if guide_y is not None else y
        if target is None:
            raise ValueError("classifier guidance needs a target label (y or guide_y)")
        return scale * classifier_log_prob_gradient(classifier, x, t, target)

    return cond_fn
