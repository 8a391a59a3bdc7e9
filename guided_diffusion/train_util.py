"""Training loops that never lose work: checkpoints, exact resume, EMA, mixed precision, DDP.

`TrainLoopBase` holds everything the DDPM and the classifier loops share; a subclass only says how
one microbatch turns into a loss (`compute_loss`) and may add work after a step (`after_step`).

Files written by rank 0 into `save_dir` at every save (the model file last, so its presence means
the checkpoint is complete; every write is atomic):

    ema_{rate}_{step:06d}.pt   EMA weights (state dict), one per rate
    opt{step:06d}.pt           optimizer, loss scale, sampler history, step
    model{step:06d}.pt         weights (state dict, float32)
    loss_curve.png             curves drawn from progress.csv

Resume is exact (bitwise on CPU): the data order is a function of (seed, step) (`ShuffledBatches`)
and the random state is reseeded from (seed, step, rank) before every step, so a run stopped after N
steps and resumed continues with the same batches, timesteps and noise as a run never stopped.
"""

import contextlib
import copy
import csv
import math
import os
import re
import signal

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel.distributed import DistributedDataParallel as DDP

from . import dist_util, logger
from .checkpoint_util import load_weights, parse_step, read_checkpoint
from .cli import UserError, atomic_path, atomic_torch_save
from .cli import signal_name as _signal_name
from .fp16_util import MixedPrecisionTrainer
from .nn import update_ema
from .resample import LossAwareSampler, UniformSampler

AMP_CHOICES = ("auto", "none", "fp16", "bf16")


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


# ---------------------------------------------------------------------------------------------
# Data: an infinite, seekable stream of batches


class ShuffledBatches:
    """Infinite stream of `(images, {"y": labels})` batches over a map-style dataset.

    Every epoch is a permutation drawn from (seed, epoch); its first `batch_size * world_size`
    images form global batch 0, and so on (the incomplete tail is dropped). Rank r takes the r-th
    slice of each global batch, so every process reads its own shard. Batch k is a pure function
    of (seed, k): `seek(k)` restarts the stream there without reading the skipped images.

    Dataset items are dicts with `image` and `label` (see `datasets.SliceDataset`) or
    `(image, label)` pairs. `class_cond=False` yields an empty condition dict.
    """

    def __init__(self, dataset, batch_size, *, seed=0, rank=None, world_size=None, num_workers=0,
                 class_cond=True, pin_memory=False):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = dist_util.get_rank() if rank is None else rank
        self.world_size = dist_util.get_world_size() if world_size is None else world_size
        self.num_workers = num_workers
        self.class_cond = class_cond
        self.pin_memory = pin_memory
        if batch_size < 1:
            raise UserError(f"--batch_size {batch_size}: must be at least 1")
        global_batch = batch_size * self.world_size
        self.batches_per_epoch = len(dataset) // global_batch
        if self.batches_per_epoch == 0:
            raise UserError(
                f"--batch_size {batch_size}: the dataset has only {len(dataset)} images, fewer than one batch "
                f"of {global_batch} ({batch_size} x {self.world_size} processes); lower --batch_size"
            )
        self._iterator = None
        self.seek(0)

    def indices(self, k):
        """Dataset indices of this rank's part of global batch `k`."""
        epoch, j = divmod(k, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        start = j * self.batch_size * self.world_size + self.rank * self.batch_size
        return order[start:start + self.batch_size].tolist()

    def seek(self, k):
        """Make the next batch global batch `k`."""
        self.position = k
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = self._make_iterator(self.position)
        self.position += 1
        batch = next(self._iterator)
        if isinstance(batch, _WorkerFailure):
            self.shutdown()
            raise UserError(batch.message)
        return batch

    def shutdown(self):
        """Stop the data-loader workers (a later `next` starts new ones at the current position)."""
        self._iterator = None

    def _index_batches(self, start):
        k = start
        while True:
            yield self.indices(k)
            k += 1

    def _make_iterator(self, start):
        if self.num_workers == 0:
            return (self.collate([self.dataset[i] for i in idx]) for idx in self._index_batches(start))
        loader = torch.utils.data.DataLoader(
            _ReportingDataset(self.dataset), batch_sampler=self._index_batches(start), num_workers=self.num_workers,
            collate_fn=self.collate, pin_memory=self.pin_memory, persistent_workers=False,
            worker_init_fn=_ignore_stop_signals,
        )
        return iter(loader)

    def collate(self, items):
        """Stack dataset items into `(images, cond)` (a worker's `_WorkerFailure` is passed on as is)."""
        failures = [it for it in items if isinstance(it, _WorkerFailure)]
        if failures:
            return failures[0]
        if isinstance(items[0], dict):
            images = [it["image"] for it in items]
            labels = [it["label"] for it in items]
        else:
            images, labels = zip(*[(it[0], it[1]) for it in items])
        images = torch.stack([torch.as_tensor(im, dtype=torch.float32) for im in images])
        cond = {"y": torch.as_tensor(np.asarray([int(l) for l in labels]), dtype=torch.long)} if self.class_cond else {}
        return images, cond


class _WorkerFailure:
    """A UserError met in a data-loader worker, sent back as a value: torch would wrap a raised one
    in the worker's traceback, and the main process re-raises it as the one line it is."""

    def __init__(self, message):
        self.message = message


class _ReportingDataset(torch.utils.data.Dataset):
    """The dataset as a data-loader worker reads it: a UserError becomes a `_WorkerFailure` item."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except UserError as err:
            return _WorkerFailure(str(err))


def _ignore_stop_signals(worker_id):
    """Data-loader workers ignore SIGINT and SIGTERM. Ctrl-C, `timeout`, SLURM and Kubernetes signal the
    whole process group; a worker killed by it would make the main process fail with a traceback
    instead of finishing its step and saving. Workers exit when the main process closes the loader or dies."""
    del worker_id
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the loops


def parse_ema_rates(ema_rate):
    """'0.9999,0.999' -> [0.9999, 0.999]; an empty string means no EMA."""
    if isinstance(ema_rate, (int, float)):
        return [float(ema_rate)]
    try:
        rates = [float(r) for r in str(ema_rate).split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--ema_rate {ema_rate!r}: expected comma-separated numbers, e.g. 0.9999,0.999")
    for r in rates:
        if not 0.0 <= r < 1.0:
            raise UserError(f"--ema_rate {ema_rate}: every rate must be in [0, 1)")
    return rates


def check_loop_settings(*, batch_size, microbatch, lr, log_interval, save_interval, max_steps, lr_anneal_steps,
                        weight_decay=0.0, seed=0):
    """ValueError naming the first training-loop setting that cannot work."""
    for name, value, low in (("batch_size", batch_size, 1), ("log_interval", log_interval, 1),
                             ("save_interval", save_interval, 1), ("max_steps", max_steps, 0),
                             ("lr_anneal_steps", lr_anneal_steps, 0), ("seed", seed, 0)):
        if value < low:
            raise ValueError(f"{name} {value}: must be at least {low}")
    if microbatch == 0 or microbatch < -1:
        raise ValueError(f"microbatch {microbatch}: must be positive, or -1 for no split")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr {lr}: must be a positive number")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay {weight_decay}: must be a non-negative number")


def annealed_lr(base_lr, step, anneal_steps):
    """Linear decay from `base_lr` at step 0 to 0 at `anneal_steps` (constant when anneal_steps <= 0)."""
    if anneal_steps <= 0:
        return base_lr
    return base_lr * max(0.0, 1.0 - step / anneal_steps)


def checkpoint_files(save_dir, step, ema_rates):
    """Paths of the files that make up the checkpoint at `step`."""
    return {
        "model": os.path.join(save_dir, f"model{step:06d}.pt"),
        "opt": os.path.join(save_dir, f"opt{step:06d}.pt"),
        "ema": {rate: os.path.join(save_dir, f"ema_{rate}_{step:06d}.pt") for rate in ema_rates},
    }


def latest_complete_checkpoint(save_dir, ema_rates):
    """Newest `model{step}.pt` in `save_dir` whose optimizer and EMA files exist too, or None."""
    names = [n for n in os.listdir(save_dir) if re.fullmatch(r"model\d+\.pt", n)]
    for name in sorted(names, key=parse_step, reverse=True):
        files = checkpoint_files(save_dir, parse_step(name), ema_rates)
        if os.path.isfile(files["opt"]) and all(os.path.isfile(p) for p in files["ema"].values()):
            return files["model"]
    return None


def resolve_resume_checkpoint(resume_checkpoint, save_dir, ema_rates):
    """The model file to resume from: an explicit path, the newest complete one for `auto`, or None."""
    if not resume_checkpoint:
        return None
    if resume_checkpoint == "auto":
        return latest_complete_checkpoint(save_dir, ema_rates) if os.path.isdir(save_dir) else None
    if not os.path.isfile(resume_checkpoint):
        raise UserError(f"--resume_checkpoint {resume_checkpoint}: no such file")
    return resume_checkpoint


def seed_step(seed, step, rank):
    """Seed torch (CPU and CUDA) and numpy from (seed, step, rank): the randomness of one step."""
    torch_seed, numpy_seed = np.random.SeedSequence([seed, step, rank]).generate_state(2)
    torch.manual_seed(int(torch_seed))
    np.random.seed(int(numpy_seed))


def sampler_state(sampler):
    """The array state of a schedule sampler (the loss history of loss-aware samplers)."""
    return {k: v.copy() for k, v in vars(sampler).items() if isinstance(v, np.ndarray)}


def load_sampler_state(sampler, state):
    for k, v in (state or {}).items():
        if hasattr(sampler, k):
            setattr(sampler, k, np.array(v))


def truncate_progress(csv_path, step):
    """Drop rows logged after `step` (work lost by a crash) so a resumed run's log has no duplicates."""
    if not os.path.isfile(csv_path):
        return
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "step" not in rows[0]:
        return
    col = rows[0].index("step")
    kept = [rows[0]] + [r for r in rows[1:] if not r[col] or float(r[col]) <= step]
    if len(kept) == len(rows):
        return
    with atomic_path(csv_path) as tmp:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)


def plot_curves(csv_path, png_path, keys):
    """Draw each of `keys` found in progress.csv against `step`, one panel per key, into `png_path`."""
    if not os.path.isfile(csv_path):
        return
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    series = {}
    for key in keys:
        points = [(float(r["step"]), float(r[key])) for r in rows if r.get("step") and r.get(key)]
        points = [(s, v) for s, v in points if math.isfinite(v)]
        if points:
            series[key] = points
    if not series:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.2), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, lw=1, marker="o" if len(steps) <= 50 else None, ms=3)
        ax.set_xlabel("step")
        ax.set_title(key)
        if key.endswith("loss") or key in ("mse", "vb"):
            if min(values) > 0:
                ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def log_loss_dict(diffusion, ts, losses):
    """Log the mean of each loss term and its mean per quarter of the diffusion (`loss_q0..q3`)."""
    for key, values in losses.items():
        logger.logkv_mean(key, values.mean().item())
        for t, v in zip(ts.cpu().numpy(), values.detach().float().cpu().numpy()):
            logger.logkv_mean(f"{key}_q{int(4 * t / diffusion.num_timesteps)}", v)


# ---------------------------------------------------------------------------------------------
# The shared loop


class TrainLoopBase:
    """Steps, microbatches, EMA, mixed precision, DDP, logging, checkpoints and exact resume.

    :param data: an iterator of `(batch, cond)`; if it has `seek(step)` (as `ShuffledBatches`),
        a resumed run continues with the very batches the uninterrupted run would have seen.
    :param amp: "none", "fp16" (autocast + loss scaling, CUDA), "bf16" (autocast), or "auto"
        (bf16 on a GPU that supports it, else fp16 on GPU, none on CPU). Excludes `use_fp16`, the
        model-conversion path with fp32 master weights.
    :param max_steps: stop after this many steps; 0 means `lr_anneal_steps`, or never if that is 0 too.
    :param lr_anneal_steps: decay the learning rate linearly to 0 over this many steps.
    """

    plot_keys = ("loss",)
    schedule_sampler = None  # a subclass that draws timesteps sets it; its state is checkpointed

    def __init__(self, *, model, data, batch_size, lr, save_dir, microbatch=-1, ema_rate="0.9999",
                 log_interval=10, save_interval=1000, resume_checkpoint="", use_fp16=False, amp="none",
                 fp16_scale_growth=1e-3, initial_lg_loss_scale=20.0, weight_decay=0.0, lr_anneal_steps=0,
                 max_steps=0, seed=0, channels_last=False, device=None, progress=True,
                 find_unused_parameters=False):
        check_loop_settings(batch_size=batch_size, microbatch=microbatch, lr=lr, log_interval=log_interval,
                            save_interval=save_interval, max_steps=max_steps, lr_anneal_steps=lr_anneal_steps,
                            weight_decay=weight_decay, seed=seed)
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.save_dir = save_dir
        self.ema_rates = parse_ema_rates(ema_rate)
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.max_steps = max_steps if max_steps > 0 else lr_anneal_steps
        self.seed = seed
        self.progress = progress
        self.device = device or dist_util.dev()
        self.rank = dist_util.get_rank()
        self.world_size = dist_util.get_world_size()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.amp_dtype = resolve_amp(amp, use_fp16, self.device)
        self.stop_requested = False
        self.stop_signal = None  # the signal that stopped the run early, if one did
        self.last_saved = None

        self.model = model.to(self.device, memory_format=self.memory_format)
        self.resume_path = resolve_resume_checkpoint(resume_checkpoint, save_dir, self.ema_rates)
        self.step = 0
        if self.resume_path:
            self.step = parse_step(self.resume_path)
            load_weights(self.model, self.resume_path, "--resume_checkpoint")
        dist_util.sync_params(list(self.model.parameters()) + list(self.model.buffers()))

        self.mp_trainer = MixedPrecisionTrainer(
            model=self.model, use_fp16=use_fp16, fp16_scale_growth=fp16_scale_growth,
            initial_lg_loss_scale=initial_lg_loss_scale,
        )
        self.opt = torch.optim.AdamW(self.mp_trainer.master_params, lr=lr, weight_decay=weight_decay)
        self.grad_scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.ema_params = [copy.deepcopy([p.detach() for p in self.mp_trainer.master_params]) for _ in self.ema_rates]
        if self.resume_path:
            self._load_resume_state()
        if hasattr(self.data, "seek"):
            self.data.seek(self.step)

        if dist_util.is_distributed():
            self.ddp_model = DDP(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=find_unused_parameters,
            )
        else:
            self.ddp_model = self.model

    # -- to be provided by subclasses --------------------------------------------------------

    def compute_loss(self, batch, cond):
        """Mean loss of one microbatch (a scalar tensor); log what should be logged."""
        raise NotImplementedError

    def after_step(self):
        """Work done after each step, before logging and saving (e.g. validation)."""

    def extra_state(self):
        """Subclass state saved in the optimizer file."""
        return {}

    def load_extra_state(self, state):
        pass

    # -- the loop -----------------------------------------------------------------------------

    def run_loop(self):
        """Train until `max_steps` (forever if 0); save at every `save_interval` and at the end."""
        if self.max_steps and self.step >= self.max_steps:
            logger.log(f"nothing to do: resumed at step {self.step} >= {self.max_steps} steps")
            return
        bar = None
        if self.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps or None, initial=self.step, desc="train", dynamic_ncols=True)
        try:
            with _graceful_stop(self):
                while not self.max_steps or self.step < self.max_steps:
                    batch = self._next_batch()
                    if batch is None:  # stopped while waiting for data
                        break
                    # After fetching: starting data-loader workers draws from the global generator.
                    seed_step(self.seed, self.step, self.rank)
                    self.run_step(*batch)
                    self.step += 1
                    self.after_step()
                    if bar is not None:
                        bar.update(1)
                    if self.step % self.log_interval == 0:
                        self._dump_logs()
                    if self.step % self.save_interval == 0 or self.stop_requested:
                        self.save()
                    if self.stop_requested:
                        break
                # Still under the stop handlers: a signal during the last save does not cut it short.
                if self.step % self.log_interval:
                    self._dump_logs()
                if self.last_saved != self.step:
                    self.save()
                if self.stop_requested:
                    logger.log(f"stopped by {_signal_name(self.stop_signal)} at step {self.step}; "
                               f"resume with --resume_checkpoint auto")
        except BaseException:
            if bar is not None:
                bar.leave = False  # erase the bar, so that an error is the one line the user sees
            raise
        finally:
            if bar is not None:
                bar.close()
            if hasattr(self.data, "shutdown"):
                self.data.shutdown()

    def _next_batch(self):
        """The next `(batch, cond)`; None when a stop was requested and the data-loader workers went with it."""
        try:
            return next(self.data)
        except UserError:
            raise
        except Exception:
            # A signal sent to the whole process group can reach a data-loader worker before it
            # ignores signals (while it starts); the loader then fails. The step is not begun, so the
            # state is that of the last step: stop cleanly and save it.
            if self.stop_requested or self._stop_pending():
                return None
            raise

    def _stop_pending(self):
        """Give a signal that is on its way to this process (e.g. from the process group) the chance to land."""
        import time

        time.sleep(0.2)
        return self.stop_requested

    def run_step(self, batch, cond):
        """One optimizer step over `batch` (split into microbatches), with the non-finite guard."""
        self.mp_trainer.zero_grad()
        lr = annealed_lr(self.lr, self.step, self.lr_anneal_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        cond = {k: v.to(self.device, non_blocking=True) for k, v in cond.items()}
        bad_loss = None
        for i in range(0, batch.shape[0], self.microbatch):
            micro = batch[i:i + self.microbatch]
            micro_cond = {k: v[i:i + self.microbatch] for k, v in cond.items()}
            last = i + self.microbatch >= batch.shape[0]
            sync = contextlib.nullcontext() if last or self.ddp_model is self.model else self.ddp_model.no_sync()
            with sync:
                with self._autocast():
                    loss = self.compute_loss(micro, micro_cond)
                if bad_loss is None and not torch.isfinite(loss.detach()):
                    bad_loss = float(loss.detach())
                # Weight by microbatch size so the gradient is that of the mean over the whole batch.
                self._backward(loss * (micro.shape[0] / batch.shape[0]))
        bad, stop = self._agree_across_ranks(bad_loss is not None, self.stop_signal or self.stop_requested)
        if stop and not self.stop_requested:  # another process was signalled: stop together
            self.stop_requested = True
            self.stop_signal = self.stop_signal or int(stop)
        if bad:
            self._fail_non_finite(bad_loss)
        took_step = self._optimize()
        if took_step:
            for rate, params in zip(self.ema_rates, self.ema_params):
                update_ema(params, self.mp_trainer.master_params, rate)
        logger.logkv("step", self.step + 1)
        logger.logkv("samples", (self.step + 1) * self.batch_size * self.world_size)
        logger.logkv("lr", lr)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _backward(self, loss):
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
        else:
            self.mp_trainer.backward(loss)

    def _optimize(self):
        if self.grad_scaler is None:
            took = self.mp_trainer.optimize(self.opt)
            for key, value in self.mp_trainer.log_values.items():
                logger.logkv_mean(key, value)
            return took
        self.grad_scaler.unscale_(self.opt)
        grads = [p.grad.detach().float() for p in self.mp_trainer.master_params if p.grad is not None]
        logger.logkv_mean("grad_norm", float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        scale = self.grad_scaler.get_scale()
        self.grad_scaler.step(self.opt)
        self.grad_scaler.update()
        logger.logkv_mean("lg_loss_scale", math.log2(self.grad_scaler.get_scale()))
        return self.grad_scaler.get_scale() >= scale

    def _agree_across_ranks(self, *flags):
        """The largest value of each flag over all ranks (e.g. whether any rank saw it), so all stop together."""
        if not dist_util.is_distributed():
            return flags
        t = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(int(v) for v in t.tolist())

    def _fail_non_finite(self, value):
        good = self.last_good_step()
        if good is None:
            where = "no checkpoint was saved yet"
        else:
            directory = os.path.dirname(self.resume_path) if good == self.step and self.last_saved is None else self.save_dir
            where = f"the last good checkpoint is {checkpoint_files(directory, good, self.ema_rates)['model']}"
        what = "loss" if value is None else f"loss {value}"
        message = (f"non-finite {what} at step {self.step + 1}; stopped without saving it ({where}); "
                   f"lower --lr or check the data, then resume with --resume_checkpoint auto")
        logger.log(message)
        raise NonFiniteLossError(message)

    def last_good_step(self):
        if self.last_saved is not None:
            return self.last_saved
        return self.step if self.resume_path else None

    def _dump_logs(self):
        logger.dumpkvs()

    # -- checkpoints --------------------------------------------------------------------------

    def save(self):
        """Write the EMA, optimizer and model files for the current step (rank 0), atomically."""
        if self.rank == 0:
            files = checkpoint_files(self.save_dir, self.step, self.ema_rates)
            for rate, params in zip(self.ema_rates, self.ema_params):
                atomic_torch_save(self.mp_trainer.master_params_to_state_dict(params), files["ema"][rate])
            atomic_torch_save(self._opt_state(), files["opt"])
            # Written last: a model file means the whole checkpoint is on disk.
            atomic_torch_save(self.mp_trainer.master_params_to_state_dict(self.mp_trainer.master_params), files["model"])
            plot_curves(os.path.join(self.save_dir, "progress.csv"), os.path.join(self.save_dir, "loss_curve.png"),
                        self.plot_keys)
            logger.log(f"saved checkpoint {files['model']}")
        self.last_saved = self.step
        dist_util.barrier()

    def _opt_state(self):
        return {
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "lg_loss_scale": self.mp_trainer.lg_loss_scale,
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "sampler": sampler_state(self.schedule_sampler) if self.schedule_sampler is not None else {},
            "extra": self.extra_state(),
        }

    def _load_resume_state(self):
        files = checkpoint_files(os.path.dirname(self.resume_path), self.step, self.ema_rates)
        logger.log(f"resuming from {self.resume_path} at step {self.step}")
        if self.rank == 0:
            truncate_progress(os.path.join(self.save_dir, "progress.csv"), self.step)
        for params, rate in zip(self.ema_params, self.ema_rates):
            path = files["ema"][rate]
            if os.path.isfile(path):
                state = read_checkpoint(path, "--resume_checkpoint")
                try:
                    values = self.mp_trainer.state_dict_to_master_params(state)
                    if any(p.shape != v.shape for p, v in zip(params, values)):
                        raise ValueError("shape")
                except (KeyError, TypeError, AttributeError, ValueError):
                    raise UserError(f"--resume_checkpoint {self.resume_path}: {path} does not fit the "
                                    f"configured network") from None
                for p, v in zip(params, values):
                    p.copy_(v.to(p.device))
            else:
                logger.log(f"warning: {path} not found; EMA at rate {rate} restarts from the weights")
        if not os.path.isfile(files["opt"]):
            logger.log(f"warning: {files['opt']} not found; the optimizer restarts")
            return
        state = read_checkpoint(files["opt"], "--resume_checkpoint", weights_only=False)
        if not isinstance(state, dict):
            raise UserError(f"--resume_checkpoint {self.resume_path}: {files['opt']} is not an optimizer file")
        if "optimizer" not in state:  # a bare optimizer state dict (openai-style opt file)
            state = {"optimizer": state}
        try:
            self.opt.load_state_dict(state["optimizer"])
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"--resume_checkpoint {self.resume_path}: {files['opt']} does not fit this network "
                            f"and optimizer ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        self.mp_trainer.lg_loss_scale = state.get("lg_loss_scale", self.mp_trainer.lg_loss_scale)
        if self.grad_scaler is not None and state.get("grad_scaler"):
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        if self.schedule_sampler is not None:
            load_sampler_state(self.schedule_sampler, state.get("sampler"))
        self.load_extra_state(state.get("extra") or {})


def resolve_amp(amp, use_fp16, device):
    """The autocast dtype for `--amp` on `device` (None: no autocast)."""
    if amp not in AMP_CHOICES:
        raise UserError(f"--amp {amp!r}: choose one of {', '.join(AMP_CHOICES)}")
    if use_fp16:
        if amp not in ("auto", "none"):
            raise UserError(f"--amp {amp} and --use_fp16 True are two kinds of mixed precision; choose one")
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA GPU (loss scaling); use --amp bf16 or none on this device")
    return {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]


@contextlib.contextmanager
def _graceful_stop(loop):
    """SIGTERM or a first Ctrl-C finishes the current step, saves, and stops; a second Ctrl-C aborts."""

    def request_stop(signum, frame):
        if loop.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        loop.stop_requested = True
        if loop.stop_signal is None:
            loop.stop_signal = signum

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread: leave signals alone
            pass
    if previous:
        child_handler = _deferred_worker_failures(loop)
        if child_handler is not None:
            previous[signal.SIGCHLD] = child_handler
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _deferred_worker_failures(loop):
    """While a stop is requested, a data-loader worker that died of the same signal must not raise in
    the middle of the step being finished (torch checks its workers on SIGCHLD). Installs a SIGCHLD
    handler that skips that check then; returns the handler it replaced (None if none was replaced)."""
    try:
        from torch.utils.data._utils import signal_handling

        signal_handling._set_SIGCHLD_handler()  # torch's own, installed now rather than with the first loader
    except Exception:  # not available on this platform or version
        return None
    torch_handler = signal.getsignal(signal.SIGCHLD)
    if not callable(torch_handler):
        return None

    def on_child_exit(signum, frame):
        if not loop.stop_requested:
            torch_handler(signum, frame)

    signal.signal(signal.SIGCHLD, on_child_exit)
    return torch_handler


# ---------------------------------------------------------------------------------------------
# The DDPM loop


class TrainLoop(TrainLoopBase):
    """Trains a (class-conditional) diffusion UNet with `diffusion.training_losses`.

    Timesteps come from `schedule_sampler` (uniform by default); a loss-aware sampler receives
    every microbatch's losses. Logs `loss`, `mse`, `vb` and their per-quarter means `*_q0..q3`.
    """

    plot_keys = ("loss", "mse", "vb")

    def __init__(self, *, model, diffusion, schedule_sampler=None, **kwargs):
        self.diffusion = diffusion
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        super().__init__(model=model, **kwargs)

    def compute_loss(self, batch, cond):
        t, weights = self.schedule_sampler.sample(batch.shape[0], self.device)
        losses = self.diffusion.training_losses(self.ddp_model, batch, t, model_kwargs=cond)
        if isinstance(self.schedule_sampler, LossAwareSampler):
            self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
        log_loss_dict(self.diffusion, t, {k: v * weights for k, v in losses.items()})
        return (losses["loss"].float() * weights).mean()
