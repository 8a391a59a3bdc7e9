"""What is specific to training the noise-conditioned classifier that guides CG-CDM.

The classifier sees images noised by the *DDPM's* diffusion (same T, schedule and timestep
rescaling), and receives each timestep exactly as it will during guided sampling. Validation
reports accuracy and AUROC overall and per quarter of the noise range (`_q0` least noisy ... `_q3`).
Checkpointing, EMA, mixed precision and resume come from `train.loop.TrainLoopBase`.
"""

import numpy as np
import torch
import torch.nn.functional as F

from . import dist_util, logger
from .metrics import binary_auroc  # (also importable from here, where it lived)
from .resample import LossAwareSampler, UniformSampler, timestep_limit
from .train.loop import TrainLoopBase, log_loss_dict

NUM_BUCKETS = 4


def timestep_model(model, diffusion):
    """`f(x, t)` calling `model` with t mapped and rescaled the way the diffusion feeds its networks."""
    return diffusion.wrap_model(model)


def noise_bucket(t, num_timesteps, buckets=NUM_BUCKETS):
    """Index of the quarter (for 4 buckets) of [0, num_timesteps) that holds timestep `t`."""
    return np.minimum((np.asarray(t) * buckets) // num_timesteps, buckets - 1).astype(int)


def auroc(probs, labels):
    """AUROC of class probabilities (N, K): class 1 vs 0 for K=2, else the mean one-vs-rest AUROC."""
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if probs.shape[1] == 2:
        return binary_auroc(probs[:, 1], labels == 1)
    values = [binary_auroc(probs[:, k], labels == k) for k in range(probs.shape[1])]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def classification_metrics(probs, labels, timesteps, num_timesteps, prefix="val"):
    """Loss, accuracy and AUROC overall and per noise bucket; undefined values are left out."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    buckets = noise_bucket(timesteps, num_timesteps)
    metrics = {}
    for suffix, keep in [("", np.ones(len(labels), bool))] + [
        (f"_q{b}", buckets == b) for b in range(NUM_BUCKETS)
    ]:
        if not keep.any():
            continue
        p, y = probs[keep], labels[keep]
        metrics[f"{prefix}_loss{suffix}"] = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())
        metrics[f"{prefix}_acc{suffix}"] = float((p.argmax(1) == y).mean())
        value = auroc(p, y)
        if np.isfinite(value):
            metrics[f"{prefix}_auroc{suffix}"] = value
    return metrics


@torch.no_grad()
def evaluate_classifier(model, diffusion, dataset, *, noised=True, batch_size=32, max_images=512, seed=0,
                        device=None, max_timestep=None):
    """Validation metrics of `model` on `dataset` (items with `image` and `label`).

    The same (at most `max_images`) images get the same timesteps and noise at every evaluation
    and whatever the number of processes: the draws depend on the image index only. Processes
    share the images and gather the predictions; every process returns the same dict.
    """
    device = device or dist_util.dev()
    n = len(dataset)
    subset = np.arange(n)
    if max_images and n > max_images:
        subset = np.sort(np.random.default_rng([seed, 1]).permutation(n)[:max_images])
    num_timesteps = max_timestep or diffusion.num_timesteps
    if noised:
        timesteps = np.random.default_rng([seed, 2]).integers(0, num_timesteps, size=len(subset))
    else:
        timesteps = np.zeros(len(subset), dtype=np.int64)
    call = timestep_model(model, diffusion)
    was_training = model.training
    model.eval()
    mine = list(range(dist_util.get_rank(), len(subset), dist_util.get_world_size()))
    results = []
    for start in range(0, len(mine), batch_size):
        positions = mine[start:start + batch_size]
        items = [dataset[int(subset[p])] for p in positions]
        images = torch.stack([torch.as_tensor(_field(it, "image", 0), dtype=torch.float32) for it in items])
        labels = [int(_field(it, "label", 1)) for it in items]
        noise = torch.stack([
            torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(seed * 1_000_003 + int(subset[p])))
            for p in positions
        ])
        t = torch.as_tensor(timesteps[positions], dtype=torch.long)
        x = diffusion.q_sample(images, t, noise=noise) if noised else images
        logits = call(x.to(device), t.to(device))
        probs = F.softmax(logits.float(), dim=1).cpu().numpy()
        results.extend(zip(positions, probs, labels))
    model.train(was_training)
    gathered = sorted((r for part in dist_util.all_gather_objects(results) for r in part), key=lambda r: r[0])
    positions, probs, labels = zip(*gathered)
    return classification_metrics(np.stack(probs), np.array(labels), timesteps[list(positions)], num_timesteps)


def _field(item, key, index):
    return item[key] if isinstance(item, dict) else item[index]


class ClassifierTrainLoop(TrainLoopBase):
    """Trains a classifier on noised images `q_sample(x0, t)` with cross-entropy on the image labels.

    :param noised: if False, train on clean images at t=0 (a plain classifier).
    :param val_dataset: dataset for validation every `eval_interval` steps (None or 0: never).
    :param max_noise_level: validate on timesteps below this fraction of T only, and train there too
        unless `schedule_sampler` is given (it carries its own range), e.g. 0.25 when the classifier
        will only guide CG-CDM at t = 0.1 T; 1.0 uses the whole chain.
    """

    plot_keys = ("train_loss", "val_loss", "val_acc", "val_auroc")

    def __init__(self, *, model, diffusion, noised=True, schedule_sampler=None, val_dataset=None,
                 eval_interval=0, val_batch_size=None, val_max_images=512, max_noise_level=1.0, **kwargs):
        self.diffusion = diffusion
        self.noised = noised
        self.max_timestep = timestep_limit(diffusion.num_timesteps, max_noise_level)
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion, max_noise_level)
        self.val_dataset = val_dataset
        self.eval_interval = eval_interval
        self.val_max_images = val_max_images
        super().__init__(model=model, **kwargs)
        self.val_batch_size = val_batch_size or self.batch_size
        self._train_call = timestep_model(self.ddp_model, diffusion)

    def compute_loss(self, batch, cond):
        labels = cond["y"]
        weights = torch.ones(batch.shape[0], device=self.device)
        if self.noised:
            t, weights = self.schedule_sampler.sample(batch.shape[0], self.device)
            batch = self.diffusion.q_sample(batch, t)
        else:
            t = torch.zeros(batch.shape[0], dtype=torch.long, device=self.device)
        logits = self._train_call(batch, t)
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        if self.noised and isinstance(self.schedule_sampler, LossAwareSampler):
            self.schedule_sampler.update_with_local_losses(t, losses.detach())
        correct = (logits.argmax(dim=1) == labels).float()
        log_loss_dict(self.diffusion, t, {"train_loss": losses.detach(), "train_acc@1": correct})
        # Importance weights keep the loss an unbiased estimate of the mean over uniform t.
        return (losses * weights).mean()

    def after_step(self):
        if self.val_dataset is None or not self.eval_interval or self.step % self.eval_interval:
            return
        metrics = evaluate_classifier(
            self.model, self.diffusion, self.val_dataset, noised=self.noised, batch_size=self.val_batch_size,
            max_images=self.val_max_images, seed=self.seed, device=self.device, max_timestep=self.max_timestep,
        )
        logger.logkvs(metrics)
