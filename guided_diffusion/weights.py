"""Reading weights safely: what inference and training both need, without the training package.

Every checkpoint file is read with `torch.load(weights_only=True)`: tensors and plain data only, so
a checkpoint from someone else is data, not code. A file whose pickle would call anything else
(`os.system`, ...) is refused with one line (`RefusedCheckpoint`); one that is missing, empty,
truncated or not written by torch.save is `UnreadableCheckpoint`. `load_weights` also refuses
weights that do not fit the network or hold NaN.

The step files of a run are named `{prefix}{step:06d}.pt` (`model000100.pt`, `opt000100.pt`,
`ema_0.9999_000100.pt`): `step_file`, `parse_step`, `step_files` and `latest_checkpoint` know that
pattern; `train.checkpoints` builds a training run's checkpoints (and their completion records) on it.
"""

import glob
import os
import pickle
import pickletools
import re
import warnings
import zipfile

import numpy as np
import torch

from . import dist_util
from .cli import UserError

_STEP_RE = re.compile(r"(\d+)\.pt$")


class UnreadableCheckpoint(UserError):
    """A checkpoint file that is missing, empty, truncated or changed since it was written."""


class RefusedCheckpoint(UserError):
    """A checkpoint file whose pickle would run code: never loaded, also not under `auto`."""


# ---------------------------------------------------------------------------------------------
# Step file names


def step_file(folder, prefix, step):
    """The file of `step` named by `prefix` in `folder`: `{prefix}{step:06d}.pt`."""
    return os.path.join(folder, f"{prefix}{step:06d}.pt")


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


# ---------------------------------------------------------------------------------------------
# Reading


def _numpy_arrays():
    """What the pickle of a numpy array names: optimizer files of earlier versions hold the sampler
    history as arrays. Rebuilding one makes an array of a given dtype and bytes, nothing else."""
    core = getattr(np, "_core", None) or np.core
    numeric_dtypes = [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *numeric_dtypes,
            (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]  # numpy 1's module name


def read_checkpoint(path, flag, shared=True):
    """`torch.load(weights_only=True)` of `path` on the CPU; any failure to read it is a UserError naming
    `flag` and the path: `RefusedCheckpoint` for a pickle that would run code, `UnreadableCheckpoint`
    for the rest (a text file, an empty or truncated file; torch raises KeyError, IndexError, EOFError
    or RuntimeError, depending on the first bytes).

    `shared`: rank 0 reads the file and every process gets it (call it on every rank); else a plain
    read by this process alone.
    """
    where = f"{flag} {path}" if flag else str(path)
    if os.path.isdir(path):
        raise UserError(f"{where}: is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise UnreadableCheckpoint(f"{where}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals(_numpy_arrays()), warnings.catch_warnings():
            # A pickle not written by torch.save (refused or unreadable below) need not warn as well.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            if shared:
                return dist_util.load_state_dict(path, map_location="cpu", weights_only=True)
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise UnreadableCheckpoint(f"{where}: cannot be read ({err.strerror or err})") from None
    except Exception as err:
        code = _code_in_pickle(path) if isinstance(err, pickle.UnpicklingError) else None
        if code:
            raise RefusedCheckpoint(f"{where}: refused, its pickle would call {code}; a checkpoint is data, "
                                    f"not code, and is only read as tensors and plain values") from None
        raise UnreadableCheckpoint(f"{where}: not a readable PyTorch checkpoint "
                                   f"(empty, truncated, or not a file written by torch.save)") from None


# Globals a plain checkpoint names; anything else in a refused pickle is what the message reports.
_PLAIN_GLOBALS = ("torch.", "collections.", "numpy.", "_codecs.encode", "builtins.set")


def _code_in_pickle(path):
    """The first global outside tensors and plain data that the pickle of `path` names (read as
    opcodes, never run), e.g. 'posix.system'; None when none is found."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                data = archive.read(name)
        else:
            with open(path, "rb") as f:
                data = f.read()
        strings, memo = [], {}  # the strings pushed so far, and those memoized (STACK_GLOBAL takes two)
        for opcode, arg, _ in pickletools.genops(data):
            name = None
            if opcode.name in ("GLOBAL", "INST"):
                name = arg.replace(" ", ".")
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                name = ".".join(strings[-2:])
            elif opcode.name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and strings:
                memo[arg] = strings[-1]
            elif opcode.name in ("GET", "BINGET", "LONG_BINGET") and arg in memo:
                strings.append(memo[arg])
            elif isinstance(arg, str):
                strings.append(arg)
            if name and not name.startswith(_PLAIN_GLOBALS):
                return name
    except Exception:  # a damaged pickle: nothing to name
        return None
    return None


def load_weights(module, path, flag):
    """Load a state dict into `module`, turning an unreadable file or a shape or key mismatch into a UserError."""
    if is_optimizer_file(path) and os.path.isfile(path):
        model_name = os.path.basename(step_file("", "model", parse_step(path)))
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
