"""Schedule samplers: how training picks timesteps, with importance weights keeping the loss unbiased."""

from abc import ABC, abstractmethod

import numpy as np
import torch as th
import torch.distributed as dist

from .gaussian_diffusion import FlagValueError


def create_named_schedule_sampler(name, diffusion):
    """Build the sampler `name` ("uniform" or "loss-second-moment") for `diffusion`."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise FlagValueError(f"--schedule_sampler: unknown sampler {name!r} (expected 'uniform' or 'loss-second-moment')")


class ScheduleSampler(ABC):
    """Draws timesteps t with probability p_t ∝ weights()[t]."""

    @abstractmethod
    def weights(self):
        """Unnormalised positive sampling weights, one per timestep (numpy array)."""

    def sample(self, batch_size, device):
        """Draw `batch_size` timesteps; return (indices, weights) with weight 1/(T·p_t)."""
        w = np.asarray(self.weights(), dtype=np.float64)
        p = w / w.sum()
        indices = np.random.choice(len(p), size=(batch_size,), p=p)
        weights = 1.0 / (len(p) * p[indices])
        return (
            th.from_numpy(indices).long().to(device),
            th.from_numpy(weights).float().to(device),
        )


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones(diffusion.num_timesteps, dtype=np.float64)

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

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros((diffusion.num_timesteps, history_per_term), dtype=np.float64)
        self._loss_counts = np.zeros(diffusion.num_timesteps, dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones(self.diffusion.num_timesteps, dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= weights.sum()
        return weights * (1 - self.uniform_prob) + self.uniform_prob / len(weights)

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            t = int(t)
            if self._loss_counts[t] == self.history_per_term:
                # Full: drop the oldest loss.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return bool((self._loss_counts == self.history_per_term).all())
