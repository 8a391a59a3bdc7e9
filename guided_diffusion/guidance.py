"""Classifier guidance: the gradient of log p(y | x_t, t) that steers a diffusion sampler.

The diffusion's `cond_fn` hook adds it to the mean (ancestral sampling) or to
the score (DDIM). Sampling and segmentation build their guidance here.

Keys of `model_kwargs` meant for the guidance only (the UNet never sees them, see `label_model`):
`guide_y`, the guidance target when it differs from the conditioning label `y`, and `guide_copies`
k > 1, which says the batch is k stacked copies of the same images (rows i, i + n, ..., with
n = batch / k), as CDM's branches are at their first step: the classifier then runs once on the n images.
The gradient is always computed in float32 with autocast off: guidance stays in a safe precision
when the UNet runs in bf16 / fp16 (`inference.prepare_for_inference`).
"""

import torch
import torch.nn.functional as F

GUIDANCE_KEYS = ("guide_y", "guide_copies")


def num_classes_of(model):
    """The number of classes a (class-conditional) UNet takes as `y`; None for an unconditional one."""
    return getattr(model, "num_classes", None)


def label_model(model, conditional=None):
    """The UNet as the diffusion calls it: drops the guidance-only keys (`GUIDANCE_KEYS`) and, for an
    unconditional model, `y` (an unconditional DDPM guided toward a class by a classifier).
    `conditional` defaults to whether the model has classes (`num_classes_of`)."""
    if conditional is None:
        conditional = num_classes_of(model) is not None

    def call(x, t, y=None, guide_y=None, guide_copies=None, **kwargs):
        return model(x, t, y=y, **kwargs) if conditional else model(x, t, **kwargs)

    return call


def _class_weights(target, num_classes):
    """Targets as float class weights (B, K): one-hot rows for class indices."""
    if target.dtype.is_floating_point:
        return target.float()
    return F.one_hot(target.long(), num_classes).float()


def classifier_log_prob_gradient(classifier, x, t, target, copies=1):
    """d/dx of sum_i log p(target_i | x_i, t_i), in float32 (autocast off).

    `target` is a LongTensor of class indices (B,) or a float tensor (B, K) of class weights, for which the
    weighted sum of log-probabilities is differentiated. `copies` k > 1: x and t are k stacked copies of
    the same n = B / k rows; the classifier runs on the n rows once (see `_shared_copies_gradient`).
    """
    with torch.enable_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        if copies > 1:
            return _shared_copies_gradient(classifier, x, t, target, copies).to(x.dtype)
        x_in = x.detach().float().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
        if target.dtype.is_floating_point:
            selected = (log_probs * target.to(log_probs.dtype)).sum()
        else:
            selected = log_probs[torch.arange(len(target), device=x.device), target.long()].sum()
        return torch.autograd.grad(selected, x_in)[0].to(x.dtype)


def _shared_copies_gradient(classifier, x, t, target, copies):
    """The gradients of k targets for one forward pass on the n images that x repeats k times.

    d/dx sum_c w_c log p_c = J^T (w - p sum_c w_c), J the Jacobian of the logits: a vector whose entries
    sum to zero, hence a combination of the K - 1 directions J^T (e_c - e_0) = d/dx (log p_c - log p_0).
    With two classes one backward pass serves every copy; with more classes than copies, one per copy.
    """
    if x.shape[0] % copies:
        raise ValueError(f"guide_copies {copies} does not divide the batch of {x.shape[0]}")
    n = x.shape[0] // copies
    x_in = x[:n].detach().float().requires_grad_(True)
    log_probs = F.log_softmax(classifier(x_in, t[:n] if torch.is_tensor(t) and t.ndim else t).float(), dim=-1)
    num_classes = log_probs.shape[1]
    weights = _class_weights(target, num_classes).split(n)
    if num_classes - 1 >= copies:
        return torch.cat([torch.autograd.grad((log_probs * w).sum(), x_in, retain_graph=c < copies - 1)[0]
                          for c, w in enumerate(weights)])
    directions = [torch.autograd.grad((log_probs[:, c] - log_probs[:, 0]).sum(), x_in,
                                      retain_graph=c < num_classes - 1)[0] for c in range(1, num_classes)]
    probs = log_probs.detach().exp()
    broadcast = (n,) + (1,) * (x.ndim - 1)
    grads = []
    for w in weights:
        coefficients = w - probs * w.sum(dim=1, keepdim=True)
        grads.append(sum(coefficients[:, c].view(broadcast) * d for c, d in enumerate(directions, start=1)))
    return torch.cat(grads)


def make_classifier_cond_fn(classifier, scale):
    """A `cond_fn(x, t, y=None, guide_y=None, guide_copies=1, **kw)` returning scale * grad log p(target | x_t, t).

    The target is `guide_y` when given (e.g. the healthy label for one branch of CG-CDM while the UNet is
    conditioned on a soft label), else the conditioning label `y`.
    """

    def cond_fn(x, t, y=None, guide_y=None, guide_copies=1, **kwargs):
        target = guide_y if guide_y is not None else y
        if target is None:
            raise ValueError("classifier guidance needs a target label (y or guide_y)")
        return scale * classifier_log_prob_gradient(classifier, x, t, target, copies=guide_copies or 1)

    return cond_fn
