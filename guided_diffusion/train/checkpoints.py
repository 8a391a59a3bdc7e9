"""Checkpoint files of a training run: the one place that knows their names and what they hold.

Files written by rank 0 into `save_dir` at every save (the model file last, so its presence means
the checkpoint is complete; every write is atomic):

    ema_{rate}_{step:06d}.pt   EMA weights (state dict), one per rate
    opt{step:06d}.pt           optimizer, loss scale, sampler history, step
    model{step:06d}.pt         weights (state dict, float32)
"""

import glob
import os
import re

import numpy as np
import torch

from .. import dist_util
from ..cli import UserError, atomic_torch_save

_STEP_RE = re.compile(r"(\d+)\.pt$")


def checkpoint_files(save_dir, step, ema_rates):
    """Paths of the files that make up the checkpoint at `step`."""
    return {
        "model": os.path.join(save_dir, f"model{step:06d}.pt"),
        "opt": os.path.join(save_dir, f"opt{step:06d}.pt"),
        "ema": {rate: os.path.join(save_dir, f"ema_{rate}_{step:06d}.pt") for rate in ema_rates},
    }


def parse_step(path):
    """The step number in `model000123.pt`-style names (0 when there is none)."""
    match = _STEP_RE.search(os.path.basename(path))
    return int(match.group(1)) if match else 0


def is_optimizer_file(path):
    """Whether `path` is named like an optimizer file `opt{step}.pt`."""
    return re.fullmatch(r"opt\d+\.pt", os.path.basename(path)) is not None


def step_files(save_dir, prefix="model"):
    """The `{prefix}NNNNNN.pt` files in `save_dir`, oldest step first."""
    pattern = re.compile(rf"{re.escape(prefix)}\d+\.pt")
    paths = [p for p in glob.glob(os.path.join(glob.escape(save_dir), f"{glob.escape(prefix)}[0-9]*.pt"))
             if pattern.fullmatch(os.path.basename(p))]
    return sorted(paths, key=parse_step)


def latest_checkpoint(save_dir, prefix="model"):
    """Newest `{prefix}NNNNNN.pt` in `save_dir`, or None."""
    paths = step_files(save_dir, prefix)
    return paths[-1] if paths else None


def latest_complete_checkpoint(save_dir, ema_rates):
    """Newest `model{step}.pt` in `save_dir` whose optimizer and EMA files exist too, or None."""
    for path in reversed(step_files(save_dir, "model")):
        files = checkpoint_files(save_dir, parse_step(path), ema_rates)
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


# ---------------------------------------------------------------------------------------------
# Reading


def read_checkpoint(path, flag, weights_only=True):
    """`torch.load` of `path` on the CPU; any failure to read it is a UserError naming `flag` and the path.

    A text file, an empty or truncated file, a folder or a file torch cannot unpickle all give one
    line (torch itself raises KeyError, IndexError, EOFError, RuntimeError or UnpicklingError,
    depending on the first bytes).
    """
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such checkpoint file")
    try:
        return dist_util.load_state_dict(path, map_location="cpu", weights_only=weights_only)
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot be read ({err.strerror or err})") from None
    except Exception:
        raise UserError(f"{flag} {path}: not a readable PyTorch checkpoint "
                        f"(empty, truncated, or not a file written by torch.save)") from None


def load_weights(module, path, flag):
    """Load a state dict into `module`, turning an unreadable file or a shape or key mismatch into a UserError."""
    if is_optimizer_file(path) and os.path.isfile(path):
        model_name = os.path.basename(checkpoint_files("", parse_step(path), ())["model"])
        raise UserError(f"{flag} {path}: an optimizer file; give the {model_name} (or ema_*.pt) of that step")
    state = read_checkpoint(path, flag)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{flag} {path}: expected a state dict of tensors, found {type(state).__name__}")
    bad = [name for name, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{flag} {path}: parameter {bad[0]} holds NaN or infinite values")
    own = module.state_dict()
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            raise UserError(
                f"{flag} {path}: parameter {name} has shape {tuple(tensor.shape)} but the configuration "
                f"builds {tuple(own[name].shape)}"
            )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"{flag} {path}: checkpoint does not fit the configured network ({detail})")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return module


# ---------------------------------------------------------------------------------------------
# A training run's checkpoint: weights, EMA, optimizer


def params_to_state_dict(model, params):
    """The model's state dict with its parameters replaced by `params` (float32), e.g. EMA weights."""
    state_dict = model.state_dict()
    for (name, _), value in zip(model.named_parameters(), params):
        state_dict[name] = value.detach().float()
    return state_dict


def sampler_state(sampler):
    """The array state of a schedule sampler (the loss history of loss-aware samplers)."""
    return {k: v.copy() for k, v in vars(sampler).items() if isinstance(v, np.ndarray)}


def load_sampler_state(sampler, state):
    for k, v in (state or {}).items():
        if hasattr(sampler, k):
            setattr(sampler, k, np.array(v))


def save_checkpoint(save_dir, step, model, ema_rates, ema_params, opt_state):
    """Write the EMA files (one per rate), the optimizer file and, last, the model file of `step`;
    returns the model file's path."""
    files = checkpoint_files(save_dir, step, ema_rates)
    for rate, params in zip(ema_rates, ema_params):
        atomic_torch_save(params_to_state_dict(model, params), files["ema"][rate])
    atomic_torch_save(opt_state, files["opt"])
    # Written last: a model file means the whole checkpoint is on disk.
    atomic_torch_save(params_to_state_dict(model, model.parameters()), files["model"])
    return files["model"]


def load_ema(resume_path, model, ema_rates, ema_params, warn):
    """Copy the EMA weights saved beside `resume_path` into `ema_params` (one list per rate); a missing
    file keeps the current weights for that rate (`warn` is told)."""
    files = checkpoint_files(os.path.dirname(resume_path), parse_step(resume_path), ema_rates)
    names = [name for name, _ in model.named_parameters()]
    for rate, params in zip(ema_rates, ema_params):
        path = files["ema"][rate]
        if not os.path.isfile(path):
            warn(f"warning: {path} not found; EMA at rate {rate} restarts from the weights")
            continue
        state = read_checkpoint(path, "--resume_checkpoint")
        try:
            values = [state[name].detach().float().clone() for name in names]
            if any(p.shape != v.shape for p, v in zip(params, values)):
                raise ValueError("shape")
        except (KeyError, TypeError, AttributeError, ValueError):
            raise UserError(f"--resume_checkpoint {resume_path}: {path} does not fit the "
                            f"configured network") from None
        for p, v in zip(params, values):
            p.copy_(v.to(p.device))


def read_opt_state(resume_path, warn):
    """The optimizer file beside `resume_path` as a dict with key `optimizer` (None when missing)."""
    path = checkpoint_files(os.path.dirname(resume_path), parse_step(resume_path), ())["opt"]
    if not os.path.isfile(path):
        warn(f"warning: {path} not found; the optimizer restarts")
        return None
    state = read_checkpoint(path, "--resume_checkpoint", weights_only=False)
    if not isinstance(state, dict):
        raise UserError(f"--resume_checkpoint {resume_path}: {path} is not an optimizer file")
    if "optimizer" not in state:  # a bare optimizer state dict (openai-style opt file)
        state = {"optimizer": state}
    return state


def load_optimizer(opt, state, resume_path):
    """`opt.load_state_dict` of an optimizer file's state; a mismatch is a UserError naming the file."""
    try:
        opt.load_state_dict(state["optimizer"])
    except (KeyError, TypeError, ValueError) as err:
        path = checkpoint_files(os.path.dirname(resume_path), parse_step(resume_path), ())["opt"]
        raise UserError(f"--resume_checkpoint {resume_path}: {path} does not fit this network "
                        f"and optimizer ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
