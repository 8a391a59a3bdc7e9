"""Training loops that never lose work: checkpoints, exact resume, EMA, mixed precision, DDP.

`TrainLoopBase` holds everything the DDPM and the classifier loops share; a subclass only says how
one microbatch turns into a loss (`compute_loss`) and may add work after a step (`after_step`).
The data stream is `stream.ShuffledBatches`, the files of a checkpoint are `checkpoints`' business,
mixed precision is `precision`'s, and progress.csv with its loss curves is `plots`'.

Resume is exact (bitwise on CPU): the data order is a function of (seed, step) (`ShuffledBatches`)
and the random state is reseeded from (seed, step, rank) before every step, so a run stopped after N
steps and resumed continues with the same batches, timesteps and noise as a run never stopped.
"""

import contextlib
import copy
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel.distributed import DistributedDataParallel as DDP

from .. import dist_util, logger
from ..cli import UserError, WriteError
from ..cli import signal_name as _signal_name
from ..nn import update_ema
from ..resample import LossAwareSampler, UniformSampler
from . import checkpoints
from .plots import plot_curves, truncate_progress
from .precision import Precision, resolve_amp
from .stopping import graceful_stop


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""



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


def seed_step(seed, step, rank):
    """Seed torch (CPU and CUDA) and numpy from (seed, step, rank): the randomness of one step."""
    torch_seed, numpy_seed = np.random.SeedSequence([seed, step, rank]).generate_state(2)
    torch.manual_seed(int(torch_seed))
    np.random.seed(int(numpy_seed))



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
        (bf16 on a GPU that supports it, else fp16 on GPU, none on CPU). `use_fp16` means "fp16".
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
        amp_dtype = resolve_amp(amp, use_fp16, self.device)
        self.stop_requested = False
        self.stop_signal = None  # the signal that stopped the run early, if one did
        self.last_saved = None

        self.model = model.to(self.device, memory_format=self.memory_format)
        self.resume_path = checkpoints.resolve_resume_checkpoint(resume_checkpoint, save_dir, self.ema_rates,
                                                                 warn=logger.log)
        self.step = 0
        if self.resume_path:
            self.step = checkpoints.parse_step(self.resume_path)
            checkpoints.load_weights(self.model, self.resume_path, "--resume_checkpoint")
        dist_util.sync_params(list(self.model.parameters()) + list(self.model.buffers()))

        self.precision = Precision(self.model.parameters(), amp_dtype, self.device.type,
                                   initial_lg_loss_scale=initial_lg_loss_scale, fp16_scale_growth=fp16_scale_growth)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.ema_params = [copy.deepcopy([p.detach() for p in self.model.parameters()]) for _ in self.ema_rates]
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
            with graceful_stop(self):
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
        except BaseException as err:
            if bar is not None:
                bar.leave = False  # erase the bar, so that an error is the one line the user sees
            if isinstance(err, WriteError):
                last = self.last_checkpoint()
                raise err.with_note(f"the last complete checkpoint is {last}" if last else
                                    "no checkpoint was saved yet") from None
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
        self.precision.zero_grad()
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
                with self.precision.autocast():
                    loss = self.compute_loss(micro, micro_cond)
                if bad_loss is None and not torch.isfinite(loss.detach()):
                    bad_loss = float(loss.detach())
                # Weight by microbatch size so the gradient is that of the mean over the whole batch.
                self.precision.backward(loss * (micro.shape[0] / batch.shape[0]))
        bad, stop = self._agree_across_ranks(bad_loss is not None, self.stop_signal or self.stop_requested)
        if stop and not self.stop_requested:  # another process was signalled: stop together
            self.stop_requested = True
            self.stop_signal = self.stop_signal or int(stop)
        if bad:
            self._fail_non_finite(bad_loss)
        took_step = self.precision.step(self.opt)
        for key, value in self.precision.log_values.items():
            logger.logkv_mean(key, value)
        if took_step:
            for rate, params in zip(self.ema_rates, self.ema_params):
                update_ema(params, self.precision.params, rate)
        logger.logkv("step", self.step + 1)
        logger.logkv("samples", (self.step + 1) * self.batch_size * self.world_size)
        logger.logkv("lr", lr)

    def _agree_across_ranks(self, *flags):
        """The largest value of each flag over all ranks (e.g. whether any rank saw it), so all stop together."""
        if not dist_util.is_distributed():
            return flags
        t = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(int(v) for v in t.tolist())

    def _fail_non_finite(self, value):
        good = self.last_checkpoint()
        where = f"the last good checkpoint is {good}" if good else "no checkpoint was saved yet"
        what = "loss" if value is None else f"loss {value}"
        message = (f"non-finite {what} at step {self.step + 1}; stopped without saving it ({where}); "
                   f"lower --lr or check the data, then resume with --resume_checkpoint auto")
        logger.log(message)
        raise NonFiniteLossError(message)

    def last_checkpoint(self):
        """The model file of the last complete checkpoint: the one this run saved last, or resumed from (None)."""
        if self.last_saved is not None:
            return checkpoints.checkpoint_files(self.save_dir, self.last_saved, ())["model"]
        return self.resume_path or None

    def _dump_logs(self):
        logger.dumpkvs()

    # -- checkpoints --------------------------------------------------------------------------

    def save(self):
        """Write the checkpoint of the current step (rank 0) and redraw the loss curves."""
        if self.rank == 0:
            path = checkpoints.save_checkpoint(self.save_dir, self.step, self.model, self.ema_rates, self.ema_params,
                                               self._opt_state())
            plot_curves(os.path.join(self.save_dir, "progress.csv"), os.path.join(self.save_dir, "loss_curve.png"),
                        self.plot_keys)
            logger.log(f"saved checkpoint {path}")
        self.last_saved = self.step
        dist_util.barrier()

    def _opt_state(self):
        return {
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "grad_scaler": self.precision.state_dict(),
            "sampler": checkpoints.sampler_state(self.schedule_sampler) if self.schedule_sampler is not None else {},
            "extra": self.extra_state(),
        }

    def _load_resume_state(self):
        logger.log(f"resuming from {self.resume_path} at step {self.step}")
        if self.rank == 0:
            truncate_progress(os.path.join(self.save_dir, "progress.csv"), self.step)
        checkpoints.load_ema(self.resume_path, self.model, self.ema_rates, self.ema_params, logger.log)
        state = checkpoints.read_opt_state(self.resume_path, logger.log)
        if state is None:
            return
        checkpoints.load_optimizer(self.opt, state, self.resume_path)
        self.precision.load_state_dict(state.get("grad_scaler"))
        if self.schedule_sampler is not None:
            checkpoints.load_sampler_state(self.schedule_sampler, state.get("sampler"))
        self.load_extra_state(state.get("extra") or {})


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
