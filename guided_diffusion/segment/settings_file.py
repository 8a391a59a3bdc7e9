"""`--settings selection.json`: the settings the ablation chose, applied instead of retyped.

`scripts/ablation.py` writes selection.json with named choices (`mask_tuned`: best Dice against the
training masks; `label_free`: chosen without any mask; `mask_tuned_cdm`: the same for CDM), each
holding Q, R, tau, s, the noise draws, its post-processing and whole-scan decision, and a `detection`
record with the detection threshold and the map-separability minimum chosen on the training split's
image labels. A choice is read into one `config.SegmentationConfig`; `apply_settings_file` copies its
values onto the parsed flags, except the flags typed on the command line, which win; the summary
records what was used (`applied`). A key of the file that the command cannot honour is an error.
"""

import os

from ..cli import UserError, read_json
from .config import SegmentationConfig, choices_of


def read_selection(path, flag="--settings"):
    """selection.json as a dict; UserError naming `flag` unless it is one."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file (scripts/ablation.py writes selection.json)")
    selection = read_json(path, flag)
    if not choices_of(selection):
        raise UserError(f"{flag} {path}: not a selection of scripts/ablation.py (no choice with "
                        f"noise_level, steps, tau and classifier_scale)")
    return selection


def read_config(path, choice, flag="--settings"):
    """The `SegmentationConfig` of choice `choice` of the selection file `path`; UserError naming `flag`."""
    return config_of(read_selection(path, flag), choice, path, flag)


def config_of(selection, choice, path, flag="--settings"):
    """The `SegmentationConfig` of choice `choice` of `selection`, read from `path`; UserError naming `flag`
    (or --choice) when the choice is missing or cannot be used."""
    if choice not in choices_of(selection):
        raise UserError(f"--choice {choice!r}: not in {flag} {path} (choose one of "
                        f"{', '.join(choices_of(selection))})")
    try:
        return SegmentationConfig.from_selection(selection, choice)
    except ValueError as err:
        raise UserError(f"{flag} {path}: {err}") from None


def apply_settings_file(args, explicit):
    """Copy the configuration of choice `args.choice` of `args.settings` onto `args` where not typed
    (`explicit`). Returns (the dict of applied values, recorded in the run's summary; the configuration),
    ({}, None) without --settings."""
    if not args.settings:
        return {}, None
    config = read_config(args.settings, args.choice)
    applied = {}
    for key, value in config.values().items():
        if not hasattr(args, key):
            raise UserError(f"--settings {args.settings}: sets {key}, which this command has no flag for")
        if key in explicit:
            continue
        setattr(args, key, str(value) if key == "tau" else value)
        applied[key] = value
    return {"file": os.path.abspath(args.settings), "choice": args.choice, "applied": applied}, config
