"""The diffusion sub-chains the segmentation methods walk, their labels and their noise.

Step indices. Timestep index t means x_t = q_sample(x0, t) (t + 1 noising steps). CDM noises x0
to index Q and takes R DDIM steps at the current indices Q, Q - s, ..., Q - (R - 1)s (stride s,
default 1), each mapping x_t to x_{t-s}; the last state is x_{Q - R s}. The original code noised
to index 400 but stepped from 399 (x_400 was denoised as if it were x_399); here the first step is
taken at the index the image was noised to. The steps are an explicit sub-chain of the model's own
(unspaced) diffusion, so `timestep_respacing` plays no part.

Noise level. `noise_level` in (0, 1) is a fraction of T: Q = round(f * T) (0.1 gives the paper's
Q = 400 of T = 4000); an integer >= 1 is Q itself.

Errors name the parameter (`noise_level`, `steps`, ...); the command layer names its flags.
"""

import numpy as np
import torch
import torch.nn.functional as F

from ..guidance import num_classes_of
from ..respace import SpacedDiffusion


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
        raise ValueError(
            f"noise_level {noise_level}: give a fraction of the diffusion steps in (0, 1) or an integer step >= 1"
        )
    if not 1 <= step < num_timesteps:
        raise ValueError(f"noise_level {noise_level} gives step {step}, outside [1, {num_timesteps - 1}] for T={num_timesteps}")
    return step


def cdm_timesteps(q, steps, stride=1):
    """The original indices visited by CDM: [Q, Q - s, ..., Q - R s] (R steps, R + 1 states)."""
    if steps < 1:
        raise ValueError(f"steps {steps}: need at least one DDIM step")
    if stride < 1:
        raise ValueError(f"stride {stride}: must be a positive integer")
    if q - steps * stride < 0:
        raise ValueError(f"steps {steps} with stride {stride} would step below t=0 from the noise level Q={q}")
    return [q - j * stride for j in range(steps + 1)]


def full_chain_timesteps(top, stride=1):
    """[top, top - s, ..., 0]: every s-th index from `top` down to 0, always ending at 0."""
    if stride < 1:
        raise ValueError(f"stride {stride}: must be a positive integer")
    return sorted(set(range(top, -1, -stride)) | {0}, reverse=True)


def base_diffusion_check(diffusion):
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
    base_diffusion_check(diffusion)
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


def require_class_conditional(model, method):
    """Raise a ValueError unless `model` takes class labels (CDM compares two label conditions)."""
    if num_classes_of(model) is None:
        raise ValueError(f"{method} needs a class-conditional DDPM (one trained with class_cond True)")


def soft_labels(y1, tau, healthy_label, num_classes):
    """tau * onehot(y1) + (1 - tau) * onehot(healthy): the B-branch condition (B, num_classes)."""
    target = F.one_hot(y1.long(), num_classes).float()
    healthy = F.one_hot(torch.full_like(y1.long(), healthy_label), num_classes).float()
    return tau * target + (1.0 - tau) * healthy


def check_labels(y1, healthy_label, num_classes):
    if num_classes is None:
        return
    if not 0 <= healthy_label < num_classes:
        raise ValueError(f"healthy_label {healthy_label}: the model has classes 0..{num_classes - 1}")
    if len(y1) and (int(y1.min()) < 0 or int(y1.max()) >= num_classes):
        raise ValueError(f"image labels {sorted(set(y1.tolist()))} are outside the model's classes 0..{num_classes - 1}")


def check_tau(tau):
    if not 0 <= tau < 1:
        raise ValueError(f"tau {tau}: must lie in [0, 1) (the map divides by 1 - tau)")


def initial_noise(x0, noise):
    if noise is None:
        return torch.randn_like(x0)
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from the images' {tuple(x0.shape)}")
    return noise.to(device=x0.device, dtype=x0.dtype)



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
