"""Inputs the original README's commands leave out, found where those commands imply they are.

The original README runs `python scripts/image_tumor_sample.py` with no flags and
`image_p_seg.py` without `--src_dir`: the model is the one the training command just wrote and
the data sit in the README's layout under `data/`. Each function here looks in those places
(paths relative to the working directory, the repository root in the README), says in one line
what it took, and otherwise raises one error naming the flag to pass.
"""

import os

from .checkpoint_util import latest_checkpoint
from .cli import UserError

# Where the DDPM / classifier training scripts write by default, and where the original README's
# commands write (runs/results/...).
DDPM_DIRS = ("runs/ddpm_tumor", "runs/results/diff_brats")
CLASSIFIER_DIRS = ("runs/classifier", "runs/results/guided_diff_brats_cls_resnet")
# The original README's data layout (data/brats_patch/flair/flair/{training,validation}) and its parent.
DATA_DIRS = ("data/brats_patch/flair/flair", "data/brats_patch/flair")
# The original code's file names, used when a folder holds no model{step}.pt.
LEGACY_CHECKPOINTS = ("model.pt", "classifier_model.pt")


def checkpoint_in(directory):
    """The newest model{step}.pt in `directory`, else its model.pt / classifier_model.pt, else None."""
    newest = latest_checkpoint(directory, "model")
    if newest is None:
        newest = next((p for p in (os.path.join(directory, n) for n in LEGACY_CHECKPOINTS) if os.path.isfile(p)), None)
    return newest


def checkpoint_from_dir(directory, flag, what):
    """The checkpoint in a folder the user named with `flag`; one error line when there is none."""
    if not os.path.isdir(directory):
        raise UserError(f"{flag} {directory}: no such directory")
    found = checkpoint_in(directory)
    if found is None:
        raise UserError(f"{flag} {directory}: no {what} checkpoint model*.pt in it")
    return found


def newest_checkpoint(directories, flag, what, log=print):
    """The most recently written checkpoint among `directories` (each folder's newest step)."""
    found = [p for p in (checkpoint_in(d) for d in directories if os.path.isdir(d)) if p is not None]
    if not found:
        raise UserError(f"{flag} is required (no {what} checkpoint in {' or '.join(directories)})")
    chosen = max(found, key=os.path.getmtime)
    log(f"{flag} not given: using {chosen}, the newest {what} checkpoint in {' / '.join(directories)}")
    return chosen


def original_data_dir(flag="--src_dir", log=print):
    """The original README's data folder, when it exists and holds a training/ or validation/ split."""
    for path in DATA_DIRS:
        if any(os.path.isdir(os.path.join(path, split)) for split in ("training", "validation", "validate")):
            log(f"{flag} not given: using {path}, the original README's data layout")
            return path
    raise UserError(f"{flag} is required (no slice dataset at {' or '.join(DATA_DIRS)})")
