"""`--settings selection.json`: the settings the ablation chose, applied instead of retyped.

`scripts/ablation.py` writes selection.json with named choices (`mask_tuned`: best Dice against the
training masks; `label_free`: chosen without any mask; `mask_tuned_cdm`: the same for CDM), each
holding Q, R, tau, s and its post-processing, and a `detection` record with the detection threshold
and the map-separability minimum chosen on the training split's image labels. `apply_settings_file` copies the chosen one onto the
parsed flags, except the flags typed on the command line, which win; the summary records what was
used (`applied`).
"""

import json
import os

from ..cli import UserError

POINT_FLAGS = ("noise_level", "steps", "tau", "classifier_scale", "noise_draws")
POSTPROCESSING_FLAGS = ("smooth_sigma", "foreground_only", "keep_largest", "positive_part")


def read_selection(path):
    """selection.json as a dict; UserError naming --settings unless it is one."""
    if not os.path.isfile(path):
        raise UserError(f"--settings {path}: no such file (scripts/ablation.py writes selection.json)")
    try:
        with open(path) as f:
            selection = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"--settings {path}: not a JSON file ({err})") from None
    if not isinstance(selection, dict) or not choices_of(selection):
        raise UserError(f"--settings {path}: not a selection of scripts/ablation.py (no choice with "
                        f"noise_level, steps, tau and classifier_scale)")
    return selection


def choices_of(selection):
    """Names of the selection's choices: entries that hold a full point (Q, R, tau, s)."""
    return [name for name, value in selection.items()
            if isinstance(value, dict) and all(k in value for k in POINT_FLAGS[:4])]


def apply_settings_file(args, explicit, fields=None):
    """Copy the choice `args.choice` of `args.settings` onto `args` where not typed (`explicit`).

    fields: the flags this command has (default: every flag of a choice and the threshold). Returns the
    dict of applied values ({} without --settings), recorded in the run's summary.
    """
    if not args.settings:
        return {}
    selection = read_selection(args.settings)
    names = choices_of(selection)
    if args.choice not in names:
        raise UserError(f"--choice {args.choice!r}: not in --settings {args.settings} (choose one of "
                        f"{', '.join(names)})")
    chosen = selection[args.choice]
    values = {k: chosen[k] for k in POINT_FLAGS if k in chosen}
    values.update({k: v for k, v in (chosen.get("postprocessing") or {}).items() if k in POSTPROCESSING_FLAGS})
    detection = selection.get("detection") or {}
    for key, flag in (("threshold", "detect_threshold"), ("min_separability", "min_separability")):
        if detection.get(key) is not None:
            values[flag] = detection[key]
    applied = {}
    for key, value in values.items():
        if key in explicit or (fields is not None and key not in fields) or not hasattr(args, key):
            continue
        setattr(args, key, str(value) if key == "tau" else value)
        applied[key] = value
    return {"file": os.path.abspath(args.settings), "choice": args.choice, "applied": applied}
