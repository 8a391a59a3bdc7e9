"""Timestep respacing: run a diffusion trained on T steps with a subset of its steps."""

import numpy as np
import torch as th

from .gaussian_diffusion import FlagValueError, GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """Return the set of original timestep indices to keep.

    `section_counts` is one of:
      - "ddimN": the evenly strided set range(0, T, stride) with exactly N members;
      - "N" or "N1,N2,...": the T steps are cut into as many equal sections as counts,
        and each section keeps its count of steps, evenly strided, first and last included;
      - a list of ints: the same as the comma form;
      - "" (or None): every step.
    Impossible requests raise a ValueError naming --timestep_respacing.
    """
    if section_counts is None or section_counts == "":
        return set(range(num_timesteps))
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            return _ddim_steps(num_timesteps, section_counts)
        try:
            section_counts = [int(part) for part in section_counts.split(",")]
        except ValueError:
            raise FlagValueError(
                f"--timestep_respacing: {section_counts!r} is not 'ddimN', a count or comma-separated counts"
            ) from None
    counts = [int(c) for c in section_counts]
    if not counts or any(c < 0 for c in counts):
        raise FlagValueError(f"--timestep_respacing: step counts must be non-negative integers, got {counts}")
    if len(counts) > num_timesteps:
        raise FlagValueError(f"--timestep_respacing: {len(counts)} sections for only {num_timesteps} steps")

    base_size, remainder = divmod(num_timesteps, len(counts))
    kept = []
    start = 0
    for index, count in enumerate(counts):
        size = base_size + (1 if index < remainder else 0)  # earlier sections absorb the remainder
        if count > size:
            raise FlagValueError(
                f"--timestep_respacing: section {index} has {size} steps, cannot keep {count} of them"
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept.extend(start + round(stride * k) for k in range(count))
        start += size
    return set(kept)


def _ddim_steps(num_timesteps, spec):
    try:
        wanted = int(spec[len("ddim"):])
    except ValueError:
        raise FlagValueError(f"--timestep_respacing: {spec!r} is not of the form 'ddimN'") from None
    for stride in range(1, num_timesteps + 1):
        steps = range(0, num_timesteps, stride)
        if len(steps) == wanted:
            return set(steps)
    raise FlagValueError(
        f"--timestep_respacing: no integer stride gives exactly {wanted} of {num_timesteps} steps ({spec!r})"
    )


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

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.rescale_timesteps, self.original_num_steps)

    def _scale_timesteps(self, t):
        # The wrapper maps and scales; the timesteps it receives are respaced indices.
        return t


class _WrappedModel:
    """Calls `model(x, k_t, **kwargs)` with the original timestep k_t of respaced index t."""

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps

    def __call__(self, x, ts, **kwargs):
        original_ts = self.timestep_map.to(ts.device)[ts.long()]
        if self.rescale_timesteps:
            original_ts = original_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, original_ts, **kwargs)
