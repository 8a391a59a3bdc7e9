"""Timestep respacing: run a diffusion trained on T steps with a subset of its steps."""

import numpy as np
import torch as th

from .errors import ParameterError
from .gaussian_diffusion import GaussianDiffusion, TimestepModel


def space_timesteps(num_timesteps, section_counts):
    """Return the set of original timestep indices to keep.

    `section_counts` is one of:
      - "ddimN": the evenly strided set range(0, T, stride) with exactly N members;
      - "N" or "N1,N2,...": the T steps are cut into as many equal sections as counts,
        and each section keeps its count of steps, evenly strided, first and last included;
      - a list of ints: the same as the comma form;
      - "" (or None): every step.
    Impossible requests raise a `ParameterError` naming `section_counts`.
    """
    if section_counts is None or section_counts == "":
        return set(range(num_timesteps))
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            return _ddim_steps(num_timesteps, section_counts)
        try:
            section_counts = [int(part) for part in section_counts.split(",")]
        except ValueError:
            raise ParameterError(
                "section_counts", f"{section_counts!r} is not 'ddimN', a count or comma-separated counts"
            ) from None
    counts = [int(c) for c in section_counts]
    if not counts or any(c < 0 for c in counts):
        raise ParameterError("section_counts", f"step counts must be non-negative integers, got {counts}")
    if len(counts) > num_timesteps:
        raise ParameterError("section_counts", f"{len(counts)} sections for only {num_timesteps} steps")

    base_size, remainder = divmod(num_timesteps, len(counts))
    kept = []
    start = 0
    for index, count in enumerate(counts):
        size = base_size + (1 if index < remainder else 0)  # earlier sections absorb the remainder
        if count > size:
            raise ParameterError("section_counts", f"section {index} has {size} steps, cannot keep {count} of them")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept.extend(start + round(stride * k) for k in range(count))
        start += size
    return set(kept)


def _ddim_steps(num_timesteps, spec):
    try:
        wanted = int(spec[len("ddim"):])
    except ValueError:
        raise ParameterError("section_counts", f"{spec!r} is not of the form 'ddimN'") from None
    for stride in range(1, num_timesteps + 1):
        steps = range(0, num_timesteps, stride)
        if len(steps) == wanted:
            return set(steps)
    raise ParameterError("section_counts",
                         f"no integer stride gives exactly {wanted} of {num_timesteps} steps ({spec!r})")


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the kept steps k_0 < k_1 < ... of a base diffusion.

    The betas are recomputed so that ᾱ at index i equals the base ᾱ at k_i. Models and
    guidance functions are wrapped so that they see the original timestep k_i (times
    1000/T_original when rescale_timesteps), whatever the respacing.
    """

    def __init__(self, use_timesteps, **kwargs):
        base_betas = np.asarray(kwargs["betas"], dtype=np.float64)
        self.original_num_steps = len(base_betas)
        self.use_timesteps = set(int(t) for t in use_timesteps)
        if not self.use_timesteps:
            raise ValueError("use_timesteps is empty")
        if min(self.use_timesteps) < 0 or max(self.use_timesteps) >= self.original_num_steps:
            raise ValueError(f"use_timesteps must lie in [0, {self.original_num_steps})")

        alphas_cumprod = np.cumprod(1.0 - base_betas)
        kept = sorted(self.use_timesteps)
        kept_alphas_cumprod = alphas_cumprod[kept]
        previous = np.append(1.0, kept_alphas_cumprod[:-1])
        kwargs["betas"] = 1.0 - kept_alphas_cumprod / previous
        self.timestep_map = th.tensor(kept, dtype=th.long)
        super().__init__(**kwargs)

    def wrap_model(self, model):
        if isinstance(model, TimestepModel):
            return model
        return TimestepModel(model, self.timestep_map, self.rescale_timesteps, self.original_num_steps)
