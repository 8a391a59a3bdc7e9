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

Every file is read with `weights.read_checkpoint` (`torch.load(weights_only=True)`): tensors and
plain data only, so a checkpoint from someone else is data, not code. A file whose pickle would call
anything else (`os.system`, ...) is refused with one line, whichever way it was chosen. The reading
and the `{prefix}{step:06d}.pt` names live in `weights`, which inference shares.
"""

import hashlib
import json
import os
import sys

import numpy as np
import torch

from .. import dist_util
from ..cli import UserError, atomic_torch_save, atomic_write_text
from ..weights import (  # noqa: F401  (reading weights is shared with inference; re-exported for old imports)
    RefusedCheckpoint,
    UnreadableCheckpoint,
    is_optimizer_file,
    latest_checkpoint,
    load_weights,
    parse_step,
    read_checkpoint,
    step_file,
    step_files,
)

BROKEN_SUFFIX = ".broken"


def checkpoint_files(save_dir, step, ema_rates):
    """Paths of the files that make up the checkpoint at `step` (`record`: its completion record)."""
    return {
        "model": step_file(save_dir, "model", step),
        "opt": step_file(save_dir, "opt", step),
        "ema": {rate: step_file(save_dir, f"ema_{rate}_", step) for rate in ema_rates},
        "record": os.path.join(save_dir, f"checkpoint{step:06d}.json"),
    }


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
