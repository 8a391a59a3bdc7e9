"""Saliency maps for weakly supervised segmentation from a class-conditional DDPM.

Every function takes a batch of images x0 in [-1, 1] (B, C, H, W) with their image-level labels y1
(B,) and returns maps as float32 numpy arrays (B, H, W) (channels summed). `postprocess` turns maps
into masks; `methods` wraps these functions behind one protocol.

CDM / CG-CDM (Algorithm 1 of the paper), `cdm_saliency_multi`:
  x_Q = q_sample(x0, Q) with one noise draw; two branches start from the same x_Q: A is
  conditioned on y1, B on the soft label tau*y1 + (1 - tau)*y0 (a weighted mix of the UNet's
  label-embedding rows, no cloned model). R deterministic DDIM steps run as ONE UNet call per step
  for both branches, every tau and the whole batch. With a `cond_fn` (CG-CDM) each branch's score
  is shifted by the classifier gradient toward its own hard label (A: y1, B: y0).
  a = sum over steps of (x_A - x_B) / (1 - tau), summed over channels.

Baselines:
  `anomaly_saliency`: reconstruction-based anomaly detection with classifier guidance (Wolleb et
    al. 2022): DDIM-encode x0 (conditioned on y1) for L steps with `ddim_reverse_sample`, decode
    the same L steps conditioned on and guided toward the healthy label, map = sum_c |x0 - x_hat|.
  `cgdiff_saliency`: the original code's ancestral variant ("CG-Diff"): from the shared x_Q,
    ancestral sampling down to x_0 with y1 and with y0 (the same noise draws in both branches,
    optional guidance toward each label), map = sum_c (x_A - x_B).
"""

import torch
import torch.nn.functional as F

from ..guidance import label_model, num_classes_of
from .chain import (
    base_diffusion_check,
    cdm_timesteps,
    chain_diffusion,
    check_labels,
    check_tau,
    full_chain_timesteps,
    initial_noise,
    noise_step,
    require_class_conditional,
    soft_labels,
)


def cdm_branch_steps(model, diffusion, x0, y1, *, noise_level=0.1, steps=10, taus=(0.95,), stride=1,
                     healthy_label=0, cond_fn=None, noise=None, clip_denoised=True):
    """Run CDM's branches and yield (x_A, [x_B for each tau]) after each of the R DDIM steps.

    Branch A (label y1) does not depend on tau, so several taus share it: each step is one
    model call on a batch of (1 + len(taus)) * B images.
    """
    base_diffusion_check(diffusion)
    require_class_conditional(model, "cdm")
    num_classes = num_classes_of(model)
    y1 = y1.to(x0.device).long()
    check_labels(y1, healthy_label, num_classes)
    taus = [float(t) for t in taus]
    for tau in taus:
        check_tau(tau)
    times = cdm_timesteps(noise_step(noise_level, diffusion.num_timesteps), steps, stride)
    chain = chain_diffusion(diffusion, times)
    batch, branches = x0.shape[0], 1 + len(taus)

    x_q = diffusion.q_sample(x0, torch.full((batch,), times[0], device=x0.device, dtype=torch.long),
                             noise=initial_noise(x0, noise))
    labels = torch.cat([F.one_hot(y1, num_classes).float()]
                       + [soft_labels(y1, tau, healthy_label, num_classes) for tau in taus])
    guide = torch.cat([y1] + [torch.full_like(y1, healthy_label)] * len(taus))
    model_kwargs = {"y": labels.to(x0.device), "guide_y": guide}
    step_model = label_model(model)
    x = x_q.repeat(branches, *([1] * (x0.ndim - 1)))
    zeros = torch.zeros_like(x)  # eta = 0: no fresh noise
    for index in range(steps, 0, -1):
        t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
        # Every branch starts from the same x_Q: the guidance classifier runs once on the B images.
        step_kwargs = {**model_kwargs, "guide_copies": branches} if index == steps else model_kwargs
        with torch.no_grad():
            x = chain.ddim_sample(step_model, x, t, clip_denoised=clip_denoised, cond_fn=cond_fn,
                                  model_kwargs=step_kwargs, eta=0.0, noise=zeros)["sample"]
        parts = x.split(batch)
        yield parts[0], list(parts[1:])


def cdm_saliency_by_steps(model, diffusion, x0, y1, *, taus=(0.95,), record_steps=None, absolute=False, **kwargs):
    """CDM maps after several step counts and for several taus from one run: {(r, tau): (B, H, W)}.

    The map after r steps is the partial sum of the first r terms, so one run of R = max(record_steps)
    steps gives the maps of every R' <= R (the ablation over R costs one run). `record_steps`
    defaults to the final step only. Keyword arguments as `cdm_branch_steps`.
    """
    taus = [float(t) for t in taus]
    steps = kwargs.get("steps", 10)
    record = set(record_steps or [steps])
    if min(record) < 1 or max(record) > steps:
        raise ValueError(f"record_steps {sorted(record)}: must lie in 1..steps ({steps})")
    sums, maps = None, {}
    for r, (x_a, x_bs) in enumerate(cdm_branch_steps(model, diffusion, x0, y1, taus=taus, **kwargs), start=1):
        diffs = [(x_a - x_b) / (1.0 - tau) for tau, x_b in zip(taus, x_bs)]
        sums = diffs if sums is None else [s + d for s, d in zip(sums, diffs)]
        if r in record:
            maps.update({(r, tau): _channel_sum(s, absolute) for tau, s in zip(taus, sums)})
    return maps


def cdm_saliency_multi(model, diffusion, x0, y1, *, taus=(0.95,), absolute=False, **kwargs):
    """CDM maps for several taus from one run: {tau: float32 array (B, H, W)}.

    a_tau = sum over steps of (x_A - x_B(tau)) / (1 - tau), summed over channels
    (of |a_tau| when `absolute`). Keyword arguments as `cdm_branch_steps`.
    """
    steps = kwargs.get("steps", 10)
    maps = cdm_saliency_by_steps(model, diffusion, x0, y1, taus=taus, absolute=absolute, **kwargs)
    return {float(tau): maps[(steps, float(tau))] for tau in taus}


def cdm_saliency(model, diffusion, x0, y1, *, noise_level=0.1, steps=10, tau=0.95, stride=1, healthy_label=0,
                 cond_fn=None, noise=None, clip_denoised=True, absolute=False):
    """CDM (no `cond_fn`) or CG-CDM (`cond_fn` = classifier guidance) saliency maps (B, H, W)."""
    maps = cdm_saliency_multi(model, diffusion, x0, y1, taus=[tau], absolute=absolute, noise_level=noise_level,
                              steps=steps, stride=stride, healthy_label=healthy_label, cond_fn=cond_fn,
                              noise=noise, clip_denoised=clip_denoised)
    return maps[float(tau)]


def _channel_sum(diff, absolute=False):
    if absolute:
        diff = diff.abs()
    return diff.sum(dim=1).float().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Baselines


def _full_chain_setup(model, diffusion, x0, y1, healthy_label, noise_level, stride):
    """Checked labels, the visited timesteps Q, Q - s, ..., 0 and their respaced diffusion."""
    base_diffusion_check(diffusion)
    y1 = y1.to(x0.device).long()
    check_labels(y1, healthy_label, num_classes_of(model))
    times = full_chain_timesteps(noise_step(noise_level, diffusion.num_timesteps), stride)
    return y1, times, chain_diffusion(diffusion, times)


def anomaly_saliency(model, diffusion, x0, y1, *, noise_level=0.1, stride=1, healthy_label=0, cond_fn=None,
                     clip_denoised=True, absolute=True):
    """Reconstruction baseline: DDIM-encode L steps with y1, decode L guided steps toward y0.

    L = `noise_step(noise_level)`; with `stride` s the encoder and decoder visit every s-th
    index (0, s, ..., L). map = sum_c |x0 - x_hat| (signed when `absolute` is False). The
    encoding is deterministic, so no noise is drawn.
    """
    y1, times, chain = _full_chain_setup(model, diffusion, x0, y1, healthy_label, noise_level, stride)
    top = len(times) - 1
    step_model = label_model(model)
    healthy = torch.full_like(y1, healthy_label)
    x = x0
    with torch.no_grad():
        for index in range(top):
            t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
            x = chain.ddim_reverse_sample(step_model, x, t, clip_denoised=False, model_kwargs={"y": y1})["sample"]
    zeros = torch.zeros_like(x)
    for index in range(top, 0, -1):
        t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
        with torch.no_grad():
            x = chain.ddim_sample(step_model, x, t, clip_denoised=clip_denoised, cond_fn=cond_fn,
                                  model_kwargs={"y": healthy, "guide_y": healthy}, eta=0.0, noise=zeros)["sample"]
    return _channel_sum(x0 - x, absolute)


def cgdiff_saliency(model, diffusion, x0, y1, *, noise_level=0.1, stride=1, healthy_label=0, cond_fn=None, noise=None,
                    clip_denoised=True, absolute=False, generator=None):
    """The original code's ancestral variant: sample x_Q -> x_0 with y1 and with y0, map = x_A - x_B.

    Both branches start from the same x_Q and share every ancestral noise draw (from
    `generator`, default torch's global one), so they differ only through the label (and the
    guidance toward it). With `stride` s the chain visits Q, Q - s, ..., 0.
    """
    y1, times, chain = _full_chain_setup(model, diffusion, x0, y1, healthy_label, noise_level, stride)
    batch = x0.shape[0]
    x_q = diffusion.q_sample(x0, torch.full((batch,), times[0], device=x0.device, dtype=torch.long),
                             noise=initial_noise(x0, noise))
    labels = torch.cat([y1, torch.full_like(y1, healthy_label)])
    model_kwargs = {"y": labels, "guide_y": labels}
    step_model = label_model(model)
    x = torch.cat([x_q, x_q])
    for index in range(len(times) - 1, -1, -1):
        t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
        draw = torch.randn(x_q.shape, generator=generator, device="cpu").to(x.device, x.dtype)
        with torch.no_grad():
            x = chain.p_sample(step_model, x, t, clip_denoised=clip_denoised, cond_fn=cond_fn,
                               model_kwargs=model_kwargs, noise=torch.cat([draw, draw]))["sample"]
    x_a, x_b = x.split(batch)
    return _channel_sum(x_a - x_b, absolute)


