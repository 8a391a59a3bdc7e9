"""Saliency maps for weakly supervised segmentation from a class-conditional DDPM.

Every method takes a batch of images x0 in [-1, 1] (B, C, H, W) with their
image-level labels y1 (B,) and returns one saliency map per image, a float32
numpy array (B, H, W) (channels summed). `saliency_to_mask` (from
`metrics`) turns maps into masks: per-image min-max, Otsu, optional largest
component. All methods share one keyword signature; see `METHODS`.

CDM / CG-CDM (Algorithm 1 of the paper), `cdm_saliency`:
  x_Q = q_sample(x0, Q) with one noise draw; two branches start from the same x_Q:
  A is conditioned on y1, B on the soft label tau*y1 + (1 - tau)*y0 (a weighted
  mix of the UNet's label-embedding rows, no cloned model). R deterministic
  DDIM steps run as ONE UNet call per step for both branches and the whole
  batch. With a `cond_fn` (CG-CDM) each branch's score is shifted by the
  classifier gradient toward its own hard label (A: y1, B: y0).
  a = sum over steps of (x_A - x_B) / (1 - tau), summed over channels.

Step indices. Timestep index t means x_t = q_sample(x0, t) (t + 1 noising
steps). x0 is noised to index Q and the R DDIM steps use the current indices
Q, Q - s, ..., Q - (R - 1)s (stride s, default 1), each mapping x_t to x_{t-s};
the last state is x_{Q - R s}. The original code noised to index 400 but
stepped from 399 (x_400 was denoised as if it were x_399); here the first step
is taken at the index the image was noised to. The steps are an explicit
sub-chain of the model's own (unspaced) diffusion, so `--timestep_respacing`
plays no part.

Noise level. `noise_level` in (0, 1) is a fraction of T: Q = round(f * T)
(0.1 gives the paper's Q = 400 of T = 4000); an integer >= 1 is Q itself.

Baselines:
  `anomaly_saliency`: reconstruction-based anomaly detection with classifier
    guidance (Wolleb et al. 2022): DDIM-encode x0 (conditioned on y1) for L
    steps with `ddim_reverse_sample`, decode the same L steps conditioned on and
    guided toward the healthy label, map = sum_c |x0 - x_hat|. L comes from
    `noise_level`.
  `cgdiff_saliency`: the original code's ancestral variant ("CG-Diff"): from
    the shared x_Q, ancestral sampling down to x_0 with y1 and with y0 (the
    same noise draws in both branches, optional guidance toward each label),
    map = sum_c (x_A - x_B).
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .cli import UserError
from .metrics import saliency_to_mask  # noqa: F401  (re-exported: map -> mask lives with the metrics)
from .respace import SpacedDiffusion


# ---------------------------------------------------------------------------------------------
# Step bookkeeping


def noise_step(noise_level, num_timesteps):
    """The timestep index Q for `noise_level`: a fraction of T in (0, 1), or an integer index >= 1."""
    level = float(noise_level)
    if 0 < level < 1:
        step = int(round(level * num_timesteps))
    elif level >= 1 and level == int(level):
        step = int(level)
    else:
        raise UserError(
            f"--noise_level {noise_level}: give a fraction of the diffusion steps in (0, 1) or an integer step >= 1"
        )
    if not 1 <= step < num_timesteps:
        raise UserError(f"--noise_level {noise_level} gives step {step}, outside [1, {num_timesteps - 1}] for T={num_timesteps}")
    return step


def cdm_timesteps(q, steps, stride=1):
    """The original indices visited by CDM: [Q, Q - s, ..., Q - R s] (R steps, R + 1 states)."""
    if steps < 1:
        raise UserError(f"--steps {steps}: need at least one DDIM step")
    if stride < 1:
        raise UserError(f"--stride {stride}: must be a positive integer")
    if q - steps * stride < 0:
        raise UserError(f"--steps {steps} with --stride {stride} would step below t=0 from the noise level Q={q}")
    return [q - j * stride for j in range(steps + 1)]


def full_chain_timesteps(top, stride=1):
    """[top, top - s, ..., 0]: every s-th index from `top` down to 0, always ending at 0."""
    if stride < 1:
        raise UserError(f"--stride {stride}: must be a positive integer")
    return sorted(set(range(top, -1, -stride)) | {0}, reverse=True)


def _base_diffusion_check(diffusion):
    original = getattr(diffusion, "original_num_steps", diffusion.num_timesteps)
    if original != diffusion.num_timesteps:
        raise ValueError(
            "segmentation needs the unspaced diffusion (timestep_respacing ''); it picks its own steps"
        )


def chain_diffusion(diffusion, timesteps):
    """A SpacedDiffusion that visits exactly the original `timesteps` of the unspaced `diffusion`.

    Its index i is the i-th smallest of `timesteps`, and a DDIM / ancestral step at index i
    goes from that original timestep to the next smaller one (ᾱ of the kept steps). Models and
    guidance see original timesteps (rescaled when the diffusion rescales).
    """
    _base_diffusion_check(diffusion)
    return SpacedDiffusion(
        use_timesteps=set(int(t) for t in timesteps),
        betas=diffusion.betas,
        model_mean_type=diffusion.model_mean_type,
        model_var_type=diffusion.model_var_type,
        loss_type=diffusion.loss_type,
        rescale_timesteps=diffusion.rescale_timesteps,
    )


# ---------------------------------------------------------------------------------------------
# Labels


def _num_classes(model):
    return getattr(model, "num_classes", None)


def require_class_conditional(model, method):
    """Raise a UserError unless `model` takes class labels (CDM compares two label conditions)."""
    if _num_classes(model) is None:
        raise UserError(f"--method {method} needs a class-conditional DDPM (trained with --class_cond True)")


def _label_model(model):
    """The UNet as the diffusion calls it: drops `guide_y` (meant for cond_fn) and, for an
    unconditional model, `y`."""
    conditional = _num_classes(model) is not None

    def call(x, t, y=None, guide_y=None, **kwargs):
        return model(x, t, y=y, **kwargs) if conditional else model(x, t, **kwargs)

    return call


def soft_labels(y1, tau, healthy_label, num_classes):
    """tau * onehot(y1) + (1 - tau) * onehot(healthy): the B-branch condition (B, num_classes)."""
    target = F.one_hot(y1.long(), num_classes).float()
    healthy = F.one_hot(torch.full_like(y1.long(), healthy_label), num_classes).float()
    return tau * target + (1.0 - tau) * healthy


def _check_labels(y1, healthy_label, num_classes):
    if num_classes is None:
        return
    if not 0 <= healthy_label < num_classes:
        raise UserError(f"--healthy_label {healthy_label}: the model has classes 0..{num_classes - 1}")
    if len(y1) and (int(y1.min()) < 0 or int(y1.max()) >= num_classes):
        raise UserError(f"image labels {sorted(set(y1.tolist()))} are outside the model's classes 0..{num_classes - 1}")


def _check_tau(tau):
    if not 0 <= tau < 1:
        raise UserError(f"--tau {tau}: must lie in [0, 1) (the map divides by 1 - tau)")


def _initial_noise(x0, noise):
    if noise is None:
        return torch.randn_like(x0)
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from the images' {tuple(x0.shape)}")
    return noise.to(device=x0.device, dtype=x0.dtype)


# ---------------------------------------------------------------------------------------------
# CDM / CG-CDM


def cdm_branch_steps(model, diffusion, x0, y1, *, noise_level=0.1, steps=10, taus=(0.95,), stride=1,
                     healthy_label=0, cond_fn=None, noise=None, clip_denoised=True):
    """Run CDM's branches and yield (x_A, [x_B for each tau]) after each of the R DDIM steps.

    Branch A (label y1) does not depend on tau, so several taus share it: each step is one
    model call on a batch of (1 + len(taus)) * B images.
    """
    _base_diffusion_check(diffusion)
    require_class_conditional(model, "cdm")
    num_classes = _num_classes(model)
    y1 = y1.to(x0.device).long()
    _check_labels(y1, healthy_label, num_classes)
    taus = [float(t) for t in taus]
    for tau in taus:
        _check_tau(tau)
    times = cdm_timesteps(noise_step(noise_level, diffusion.num_timesteps), steps, stride)
    chain = chain_diffusion(diffusion, times)
    batch, branches = x0.shape[0], 1 + len(taus)

    x_q = diffusion.q_sample(x0, torch.full((batch,), times[0], device=x0.device, dtype=torch.long),
                             noise=_initial_noise(x0, noise))
    labels = torch.cat([F.one_hot(y1, num_classes).float()]
                       + [soft_labels(y1, tau, healthy_label, num_classes) for tau in taus])
    guide = torch.cat([y1] + [torch.full_like(y1, healthy_label)] * len(taus))
    model_kwargs = {"y": labels.to(x0.device), "guide_y": guide}
    step_model = _label_model(model)
    x = x_q.repeat(branches, *([1] * (x0.ndim - 1)))
    zeros = torch.zeros_like(x)  # eta = 0: no fresh noise
    for index in range(steps, 0, -1):
        t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
        with torch.no_grad():
            x = chain.ddim_sample(step_model, x, t, clip_denoised=clip_denoised, cond_fn=cond_fn,
                                  model_kwargs=model_kwargs, eta=0.0, noise=zeros)["sample"]
        parts = x.split(batch)
        yield parts[0], list(parts[1:])


def cdm_saliency_multi(model, diffusion, x0, y1, *, taus=(0.95,), absolute=False, **kwargs):
    """CDM maps for several taus from one run: {tau: float32 array (B, H, W)}.

    a_tau = sum over steps of (x_A - x_B(tau)) / (1 - tau), summed over channels
    (of |a_tau| when `absolute`). Keyword arguments as `cdm_branch_steps`.
    """
    taus = [float(t) for t in taus]
    sums = None
    for x_a, x_bs in cdm_branch_steps(model, diffusion, x0, y1, taus=taus, **kwargs):
        diffs = [(x_a - x_b) / (1.0 - tau) for tau, x_b in zip(taus, x_bs)]
        sums = diffs if sums is None else [s + d for s, d in zip(sums, diffs)]
    return {tau: _channel_sum(s, absolute) for tau, s in zip(taus, sums)}


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
    _base_diffusion_check(diffusion)
    y1 = y1.to(x0.device).long()
    _check_labels(y1, healthy_label, _num_classes(model))
    times = full_chain_timesteps(noise_step(noise_level, diffusion.num_timesteps), stride)
    return y1, times, chain_diffusion(diffusion, times)


def anomaly_saliency(model, diffusion, x0, y1, *, noise_level=0.1, steps=None, tau=None, stride=1,
                     healthy_label=0, cond_fn=None, noise=None, clip_denoised=True, absolute=True):
    """Reconstruction baseline: DDIM-encode L steps with y1, decode L guided steps toward y0.

    L = `noise_step(noise_level)`; with `stride` s the encoder and decoder visit every s-th
    index (0, s, ..., L). map = sum_c |x0 - x_hat| (signed when `absolute` is False).
    `steps`, `tau` and `noise` are unused (the encoding is deterministic).
    """
    del steps, tau, noise
    y1, times, chain = _full_chain_setup(model, diffusion, x0, y1, healthy_label, noise_level, stride)
    top = len(times) - 1
    step_model = _label_model(model)
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


def cgdiff_saliency(model, diffusion, x0, y1, *, noise_level=0.1, steps=None, tau=None, stride=1, healthy_label=0,
                    cond_fn=None, noise=None, clip_denoised=True, absolute=False, generator=None):
    """The original code's ancestral variant: sample x_Q -> x_0 with y1 and with y0, map = x_A - x_B.

    Both branches start from the same x_Q and share every ancestral noise draw (from
    `generator`, default torch's global one), so they differ only through the label (and the
    guidance toward it). With `stride` s the chain visits Q, Q - s, ..., 0. `steps` and `tau`
    are unused.
    """
    del steps, tau
    y1, times, chain = _full_chain_setup(model, diffusion, x0, y1, healthy_label, noise_level, stride)
    batch = x0.shape[0]
    x_q = diffusion.q_sample(x0, torch.full((batch,), times[0], device=x0.device, dtype=torch.long),
                             noise=_initial_noise(x0, noise))
    labels = torch.cat([y1, torch.full_like(y1, healthy_label)])
    model_kwargs = {"y": labels, "guide_y": labels}
    step_model = _label_model(model)
    x = torch.cat([x_q, x_q])
    for index in range(len(times) - 1, -1, -1):
        t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
        draw = torch.randn(x_q.shape, generator=generator, device="cpu").to(x.device, x.dtype)
        with torch.no_grad():
            x = chain.p_sample(step_model, x, t, clip_denoised=clip_denoised, cond_fn=cond_fn,
                               model_kwargs=model_kwargs, noise=torch.cat([draw, draw]))["sample"]
    x_a, x_b = x.split(batch)
    return _channel_sum(x_a - x_b, absolute)


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class Method:
    """A saliency method: its function and what it needs."""

    name: str
    function: object
    guided: bool  # uses classifier guidance (a noise-conditioned classifier) by definition
    needs_class_cond: bool  # compares label conditions of the DDPM
    uses_tau: bool
    description: str


METHODS = {
    "cg-cdm": Method("cg-cdm", cdm_saliency, True, True, True,
                     "CDM with classifier guidance on both branches (the paper's CG-CDM)"),
    "cdm": Method("cdm", cdm_saliency, False, True, True, "conditional diffusion model, no classifier"),
    "cg-diff": Method("cg-diff", cgdiff_saliency, True, False, False,
                      "ancestral sampling from Q with y1 and with y0, difference of the results"),
    "anomaly": Method("anomaly", anomaly_saliency, True, False, False,
                      "DDIM encode / guided decode toward the healthy label, |x - x_hat|"),
}


def estimate_model_calls(method, num_timesteps, noise_level=0.1, steps=10, stride=1):
    """UNet calls per batch that `method` makes (for progress reporting and benchmarks)."""
    q = noise_step(noise_level, num_timesteps)
    if method in ("cdm", "cg-cdm"):
        return steps
    chain = full_chain_timesteps(q, stride)
    return 2 * (len(chain) - 1) if method == "anomaly" else len(chain)


def per_image_noise(shape, seed, indices, device="cpu", dtype=torch.float32):
    """Noise (len(indices), *shape) where image i's draw depends only on (seed, indices[i]).

    Results then do not depend on the batch size or on which images share a batch.
    """
    draws = []
    for index in indices:
        state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state) >> 1)  # 63 bits: a valid torch seed
        draws.append(torch.randn(tuple(shape), generator=generator))
    return torch.stack(draws).to(device=device, dtype=dtype)
