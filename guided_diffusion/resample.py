"""Schedule samplers: how training picks timesteps, with importance weights keeping the loss unbiased."""

from abc import ABC, abstractmethod

import numpy as np
import torch as th
import torch.distributed as dist

from .errors import ParameterError


def timestep_limit(num_timesteps, max_noise_level):
    """The number of timesteps t < max_noise_level * T that a truncated sampler draws from (at least 1)."""
    if not 0 < max_noise_level <= 1:
        raise ValueError(f"max_noise_level {max_noise_level}: expected a fraction in (0, 1]")
    return max(1, int(round(max_noise_level * num_timesteps)))


def create_named_schedule_sampler(name, diffusion, max_noise_level=1.0):
    """Build the sampler `name` ("uniform" or "loss-second-moment") for `diffusion`.

    With `max_noise_level` < 1 it draws only t < max_noise_level * T (CDM evaluates the model at
    t <= Q alone, so training capacity spent on the rest of the chain is lost to it).
    """
    if name == "uniform":
        return UniformSampler(diffusion, max_noise_level)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion, max_noise_level=max_noise_level)
    raise ParameterError("name", f"unknown sampler {name!r} (expected 'uniform' or 'loss-second-moment')")


class ScheduleSampler(ABC):
    """Draws timesteps t < num_drawn with probability p_t ∝ weights()[t].

    `num_drawn` is T for the whole chain, fewer for a sampler truncated by `max_noise_level`.
    """

    num_drawn = None

    @abstractmethod
    def weights(self):
        """Unnormalised positive sampling weights, one per drawable timestep (numpy array of num_drawn)."""

    def sample(self, batch_size, device):
        """Draw `batch_size` timesteps; return (indices, weights) with weight 1/(num_drawn·p_t).

        The weights keep the loss an unbiased estimate of its mean over t uniform in [0, num_drawn).
        """
        w = np.asarray(self.weights(), dtype=np.float64)
        p = w / w.sum()
        indices = np.random.choice(len(p), size=(batch_size,), p=p)
        weights = 1.0 / (len(p) * p[indices])
        return (
            th.from_numpy(indices).long().to(device),
            th.from_numpy(weights).float().to(device),
        )


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion, max_noise_level=1.0):
        self.diffusion = diffusion
        self.num_drawn = timestep_limit(diffusion.num_timesteps, max_noise_level)
        self._weights = np.ones(self.num_drawn, dtype=np.float64)

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler that adapts to the losses observed at each timestep."""

    def update_with_local_losses(self, local_ts, local_losses):
        """Record this process's (timestep, loss) pairs, gathered across all processes if distributed.

        Every process must call this at the same time, so that all samplers stay identical.
        Batch sizes may differ between processes.
        """
        local_ts = local_ts.detach()
        local_losses = local_losses.detach()
        if dist.is_available() and dist.is_initialized():
            timesteps = _all_gather_ragged(local_ts.long())
            losses = _all_gather_ragged(local_losses.float())
        else:
            timesteps = local_ts.tolist()
            losses = local_losses.tolist()
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Record the (timestep, loss) pairs of every process (plain Python lists)."""


def _all_gather_ragged(tensor):
    """All-gather 1-D tensors of different lengths; return the concatenation in rank order as a list."""
    world_size = dist.get_world_size()
    length = th.tensor([tensor.numel()], dtype=th.long, device=tensor.device)
    lengths = [th.zeros_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length)
    lengths = [int(n.item()) for n in lengths]
    if max(lengths) == 0:
        return []
    # all_gather needs equal shapes: pad to the longest, then trim.
    padded = th.zeros(max(lengths), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.numel()] = tensor.reshape(-1)
    gathered = [th.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return [value for part, n in zip(gathered, lengths) for value in part[:n].tolist()]


class LossSecondMomentResampler(LossAwareSampler):
    """p_t ∝ √E[loss_t²] over the last `history_per_term` losses, mixed with `uniform_prob` of uniform.

    Uniform until every timestep has a full history.
    """

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001, max_noise_level=1.0):
        self.diffusion = diffusion
        self.num_drawn = timestep_limit(diffusion.num_timesteps, max_noise_level)
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros((self.num_drawn, history_per_term), dtype=np.float64)
        self._loss_counts = np.zeros(self.num_drawn, dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones(self.num_drawn, dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= weights.sum()
        return weights * (1 - self.uniform_prob) + self.uniform_prob / len(weights)

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            t = int(t)
            if t >= self.num_drawn:  # only from a caller that draws its own timesteps
                continue
            if self._loss_counts[t] == self.history_per_term:
                # Full: drop the oldest loss.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return bool((self._loss_counts == self.history_per_term).all())
