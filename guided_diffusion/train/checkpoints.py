"""Checkpoint files of a training run: the one place that knows their names and what they hold.

Files written by rank 0 into `save_dir` at every save (each write atomic: a temporary name, renamed
when complete), in this order:

    ema_{rate}_{step:06d}.pt   EMA weights (state dict), one per rate
    opt{step:06d}.pt           optimizer, loss scale, sampler history (tensors), step
    model{step:06d}.pt         weights (state dict, float32)
    checkpoint{step:06d}.json  the completion record: every file above with its size and SHA-256

A step is complete when its record is there and every file it lists has that size and checksum.
A step without a record (a run of an older version, or one killed between the model file and the
record) counts as complete when its model, optimizer and EMA files all read. `--resume_checkpoint
auto` takes the newest complete step; a broken newer one (truncated, emptied, changed) is skipped
with one warning and its files are set aside as `NAME.broken`, never deleted.

Every file is read with `torch.load(weights_only=True)`: tensors and plain data only, so a
checkpoint from someone else is data, not code. A file whose pickle would call anything else
(`os.system`, ...) is refused with one line, whichever way it was chosen.
"""

import glob
import hashlib
import json
import os
import pickle
import pickletools
import re
import sys
import warnings
import zipfile

import numpy as np
import torch

from .. import dist_util
from ..cli import UserError, atomic_torch_save, atomic_write_text

_STEP_RE = re.compile(r"(\d+)\.pt$")
BROKEN_SUFFIX = ".broken"


class UnreadableCheckpoint(UserError):
    """A checkpoint file that is missing, empty, truncated or changed since it was written."""


class RefusedCheckpoint(UserError):
    """A checkpoint file whose pickle would run code: never loaded, also not under `auto`."""


def checkpoint_files(save_dir, step, ema_rates):
    """Paths of the files that make up the checkpoint at `step` (`record`: its completion record)."""
    return {
        "model": os.path.join(save_dir, f"model{step:06d}.pt"),
        "opt": os.path.join(save_dir, f"opt{step:06d}.pt"),
        "ema": {rate: os.path.join(save_dir, f"ema_{rate}_{step:06d}.pt") for rate in ema_rates},
        "record": os.path.join(save_dir, f"checkpoint{step:06d}.json"),
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


def _files_of(model_path, ema_rates):
    return checkpoint_files(os.path.dirname(model_path), parse_step(model_path), ema_rates)


def complete_candidates(save_dir, ema_rates):
    """Model files in `save_dir`, newest first, whose step has a record, or else an optimizer file and
    the EMA files of `ema_rates` (the others are saves cut short before their model file)."""
    for path in reversed(step_files(save_dir, "model")):
        files = _files_of(path, ema_rates)
        if os.path.isfile(files["record"]) or (
                os.path.isfile(files["opt"]) and all(os.path.isfile(p) for p in files["ema"].values())):
            yield path


def latest_complete_checkpoint(save_dir, ema_rates):
    """Newest candidate model file of `complete_candidates` (its files exist; they are not read), or None."""
    return next(complete_candidates(save_dir, ema_rates), None)


# ---------------------------------------------------------------------------------------------
# Writing


def file_digest(path):
    """SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(save_dir, step, model, ema_rates, ema_params, opt_state):
    """Write the EMA files (one per rate), the optimizer file, the model file and, last, the completion
    record of `step`; returns the model file's path.

    Should a write fail (a full disk), the files of this step written so far are removed again, so the
    folder holds complete checkpoints only (files of the step that were there before are kept).
    """
    files = checkpoint_files(save_dir, step, ema_rates)
    contents = [(files["ema"][rate], params_to_state_dict(model, ema)) for rate, ema in zip(ema_rates, ema_params)]
    contents += [(files["opt"], opt_state), (files["model"], params_to_state_dict(model, model.parameters()))]
    new = [path for path in [p for p, _ in contents] + [files["record"]] if not os.path.exists(path)]
    try:
        record = {}
        for path, obj in contents:
            atomic_torch_save(obj, path)
            record[os.path.basename(path)] = {"bytes": os.path.getsize(path), "sha256": file_digest(path)}
        atomic_write_text(files["record"], json.dumps({"step": step, "files": record}, indent=1) + "\n")
    except BaseException:
        for path in new:
            if os.path.exists(path):
                os.remove(path)
        raise
    return files["model"]


# ---------------------------------------------------------------------------------------------
# Checking and choosing the checkpoint to resume from

_sound = set()  # checkpoints found complete by this process, as (files, sizes, mtimes): checked once


def checkpoint_problem(model_path, ema_rates):
    """Why the checkpoint of `model_path` is not complete, as `PATH: what` (None when it is complete).

    With a record: every listed file must have the recorded size and SHA-256. Without: the model file
    and those of the optimizer and the EMA of `ema_rates` that exist must read. A file whose pickle
    would run code raises `RefusedCheckpoint`.
    """
    files = _files_of(model_path, ema_rates)
    paths = [model_path, files["record"], files["opt"], *files["ema"].values()]
    signature = tuple((p, st.st_size, st.st_mtime_ns) for p in paths for st in [_stat(p)] if st is not None)
    if signature in _sound:
        return None
    if os.path.isfile(files["record"]):
        problem = _record_problem(files["record"])
    else:
        problem = _first_read_problem([model_path] + [p for p in paths[2:] if os.path.isfile(p)])
    if problem is None:
        _sound.add(signature)
    return problem


def _stat(path):
    try:
        return os.stat(path)
    except OSError:
        return None


def _first_read_problem(paths):
    for path in paths:
        if not os.path.isfile(path):
            return f"{path}: no such checkpoint file"
        try:
            read_checkpoint(path, "", shared=False)
        except RefusedCheckpoint:
            raise
        except UserError as err:
            return str(err).strip()
    return None


def _record_problem(record_path):
    name = os.path.basename(record_path)
    try:
        with open(record_path) as f:
            listed = json.load(f)["files"]
        expected = {file: (int(entry["bytes"]), str(entry["sha256"])) for file, entry in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{record_path}: an unreadable completion record"
    for file, (size, digest) in expected.items():
        path = os.path.join(os.path.dirname(record_path), file)
        if not os.path.isfile(path):
            return f"{path}: missing, though {name} lists it"
        actual = os.path.getsize(path)
        if actual != size:
            held = "it is empty" if actual == 0 else f"it holds {actual} bytes"
            problem = f"{path}: not a readable PyTorch checkpoint ({held}; {size} were written, says {name})"
        elif file_digest(path) != digest:
            problem = (f"{path}: not a readable PyTorch checkpoint (its SHA-256 differs from {name}'s: "
                       f"changed since it was written)")
        else:
            continue
        _refuse_code(path)  # a file replaced by one that would run code is no accident: an error, not skipped
        return problem
    return None


def _refuse_code(path):
    """Raise `RefusedCheckpoint` if the pickle of `path` would run code (it is only read, weights only)."""
    try:
        read_checkpoint(path, "", shared=False)
    except RefusedCheckpoint:
        raise
    except UserError:
        pass


def set_aside(model_path, ema_rates):
    """Rename the files of a broken checkpoint to `NAME.broken` (`.broken2`, ... if taken); returns the
    new names."""
    files = _files_of(model_path, ema_rates)
    listed = []
    if os.path.isfile(files["record"]):
        try:
            with open(files["record"]) as f:
                listed = [os.path.join(os.path.dirname(model_path), n) for n in json.load(f)["files"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    renamed = {}
    for path in dict.fromkeys([model_path, files["opt"], *files["ema"].values(), *listed, files["record"]]):
        if os.path.isfile(path):
            target, n = path + BROKEN_SUFFIX, 1
            while os.path.exists(target):
                n += 1
                target = f"{path}{BROKEN_SUFFIX}{n}"
            os.rename(path, target)
            renamed[path] = target
    return list(renamed.values())


def resolve_resume_checkpoint(resume_checkpoint, save_dir, ema_rates, warn=None):
    """The model file to resume from: a checkpoint given by name (a broken one is an error), the newest
    complete one for `auto` (broken newer ones are skipped with a warning and set aside), or None.

    Under several processes rank 0 checks (and renames) and every process gets its answer.
    """
    if not resume_checkpoint:
        return None
    warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))

    def resolve():
        try:
            if resume_checkpoint == "auto":
                return _newest_complete(save_dir, ema_rates, warn)
            return _checked_by_name(resume_checkpoint, ema_rates)
        except RefusedCheckpoint as err:
            raise RefusedCheckpoint(f"--resume_checkpoint {err}") from None

    return dist_util.run_on_main_process(resolve)


def _checked_by_name(path, ema_rates):
    if not os.path.isfile(path):
        raise UserError(f"--resume_checkpoint {path}: no such file")
    problem = checkpoint_problem(path, ema_rates)
    if problem is not None:
        raise UnreadableCheckpoint(f"--resume_checkpoint {problem}")
    return path


def _newest_complete(save_dir, ema_rates, warn):
    if not os.path.isdir(save_dir):
        return None
    for path in complete_candidates(save_dir, ema_rates):
        problem = checkpoint_problem(path, ema_rates)
        if problem is None:
            return path
        aside = ", ".join(os.path.basename(p) for p in set_aside(path, ema_rates))
        warn(f"warning: --resume_checkpoint auto: skipping the broken checkpoint of step {parse_step(path)} "
             f"({problem}); its files are kept as {aside}")
    incomplete = step_files(save_dir, "model")
    if incomplete:
        files = _files_of(incomplete[-1], ema_rates)
        raise UserError(
            f"--resume_checkpoint auto: {save_dir} holds {os.path.basename(incomplete[-1])} but no complete "
            f"checkpoint (no {os.path.basename(files['record'])}, and an optimizer or ema_{{rate}} file of "
            f"--ema_rate is missing: another --ema_rate?); give a model file by name to resume from it")
    return None


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
    """The array state of a schedule sampler (the loss history of loss-aware samplers), as tensors:
    plain data for a weights-only load."""
    return {k: torch.from_numpy(v.copy()) for k, v in vars(sampler).items() if isinstance(v, np.ndarray)}


def load_sampler_state(sampler, state):
    """Restore `sampler_state` (tensors, or the numpy arrays of earlier versions)."""
    for k, v in (state or {}).items():
        if hasattr(sampler, k):
            setattr(sampler, k, v.numpy().copy() if torch.is_tensor(v) else np.array(v))


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
    state = read_checkpoint(path, "--resume_checkpoint")
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
