"""A trained model as one folder that carries everything a segmentation needs.

    FOLDER/ddpm/model.pt, ddpm/args.json              the class-conditional DDPM and its configuration
    FOLDER/classifier/model.pt, classifier/args.json  the noise-conditioned classifier (guidance, detection)
    FOLDER/preprocessing.json   how a scan becomes model inputs: the training data's dataset.json
                                settings (options, modalities, label scheme), readable as --dataset_json
    FOLDER/selection.json       the settings chosen on the training split (scripts/ablation.py); the
                                paths in it are relative to the folder or removed
    FOLDER/model.json           the model card: training data, splits, steps, scores, versions, date,
                                the method and choice to use, and the size and SHA-256 of each file
    FOLDER/README.md            the same card for people

`export_model_folder` writes one (scripts/export_model.py; scripts/train_recipe.py ends with it) and
`apply_model_dir` is the `--model_dir` of image_p_seg.py and segment_scans.py; the records of the card
and the folder's file names are in `model_card`. Nothing in the folder is
looked up through a path outside it, so it works wherever it is copied.
"""

import datetime
import json
import os
import platform
import shutil

import torch

from .checkpoint_util import ARGS_FILE, check_same_diffusion, load_classifier, load_model_and_diffusion
from .cli import UserError, atomic_directory, read_json  # noqa: F401  (read_json: also for the commands)
from .model_card import (  # noqa: F401  (the names of a folder, for the commands)
    CLASSIFIER_ARGS, CLASSIFIER_WEIGHTS, DDPM_ARGS, DDPM_WEIGHTS, DEFAULT_CHOICE, DEFAULT_METHOD, FOLDER_ENTRIES,
    FORMAT, MODEL_CARD, PREPROCESSING, README, SELECTION, WEIGHT_KINDS, file_record, portable_selection,
    preprocessing_record, project_version, readme_text, selection_summary, training_data_record, validation_record,
    weights_record,
)
from .weights import read_checkpoint

# ---------------------------------------------------------------------------------------------
# Export


def check_networks(ddpm_path, classifier_path, preprocessing):
    """Both networks rebuilt from their args.json with their weights loaded (a file of another
    configuration is a UserError naming it), checked against each other and the preprocessing."""
    cpu = torch.device("cpu")
    _, _, ddpm_config = load_model_and_diffusion(ddpm_path, device=cpu, flag="--ddpm")
    if not ddpm_config.get("class_cond"):
        raise UserError(f"--ddpm {ddpm_path}: the DDPM is not class-conditional (class_cond False); CDM needs one "
                        f"trained with --class_cond True")
    _, classifier_config = load_classifier(classifier_path, device=cpu, flag="--classifier")
    check_same_diffusion(classifier_config, ddpm_config, classifier_path, ddpm_path)
    for key in ("image_size", "in_channels", "num_classes"):
        if classifier_config.get(key) != ddpm_config[key]:
            raise UserError(f"--classifier {classifier_path}: {key}={classifier_config.get(key)} but the DDPM "
                            f"{ddpm_path} has {key}={ddpm_config[key]}")
    size, channels = preprocessing["options"]["image_size"], len(preprocessing["modalities"])
    if size != ddpm_config["image_size"] or channels != ddpm_config["in_channels"]:
        raise UserError(f"--dataset_json: the data are {size} px with {channels} channel(s) but the DDPM "
                        f"{ddpm_path} takes image_size={ddpm_config['image_size']}, in_channels="
                        f"{ddpm_config['in_channels']}: trained on other data")
    return ddpm_config, classifier_config


def _state_of(path, flag):
    state = read_checkpoint(path, flag, shared=False)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        return state["model"], False
    return state, True


def _write_weights(source, state, plain, destination, half):
    """The weights at `destination`: the file's bytes as they are when nothing changes, else saved anew."""
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    if plain and not half:
        shutil.copyfile(source, destination)
        return state
    if half:
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    torch.save(state, destination)
    return state


def _precision(state):
    dtypes = {str(v.dtype).replace("torch.", "") for v in state.values()
              if torch.is_tensor(v) and v.is_floating_point()}
    return ", ".join(sorted(dtypes)) or "n/a"


def _check_out_dir(out_dir):
    """An export replaces an earlier model folder at `out_dir`, never some other non-empty folder."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir}: exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not any(
            os.path.exists(os.path.join(out_dir, name)) for name in (MODEL_CARD, "ddpm")):
        raise UserError(f"--out_dir {out_dir}: exists, is not empty and is not a model folder (no {MODEL_CARD} or "
                        f"ddpm/); choose a new or empty folder")


def export_model_folder(out_dir, *, ddpm, classifier, dataset_json, selection=None, validation=(),
                        choice=DEFAULT_CHOICE, method=DEFAULT_METHOD, half=False, weight_kinds=("auto", "auto"),
                        log=print):
    """Write the model folder `out_dir` (see the module docstring) atomically; returns model.json's dict.

    ddpm, classifier: weight files (model{step}.pt or the EMA ema_{rate}_{step}.pt) with args.json beside
    them; dataset_json: the training data's dataset.json (or its folder); selection: scripts/ablation.py's
    selection.json or None; validation: summary.json files of image_p_seg.py / segment_scans.py runs;
    weight_kinds: what the DDPM's and the classifier's files hold, "ema", "raw" or "auto" (from the name).
    """
    from .segment.methods import METHODS

    if method not in METHODS:
        raise UserError(f"--method {method!r}: unknown; choose one of {', '.join(METHODS)}")
    for flag, path in (("--ddpm", ddpm), ("--classifier", classifier)):
        if not os.path.isfile(path):
            raise UserError(f"{flag} {path}: no such weight file")
        if not os.path.isfile(os.path.join(os.path.dirname(path), ARGS_FILE)):
            raise UserError(f"{flag} {path}: no {ARGS_FILE} beside it, so its configuration is unknown")
    if os.path.isdir(dataset_json):
        dataset_json = os.path.join(dataset_json, "dataset.json")
    settings = read_json(dataset_json, "--dataset_json")
    preprocessing = preprocessing_record(settings, dataset_json)
    chosen = read_selection_file(selection, choice) if selection else None
    scores = [validation_record(read_json(path, "--validation"), path) for path in validation]
    _check_out_dir(out_dir)
    ddpm_config, classifier_config = check_networks(ddpm, classifier, preprocessing)
    carried = [name for name in (os.listdir(out_dir) if os.path.isdir(out_dir) else [])
               if name not in FOLDER_ENTRIES and not name.startswith(".")]
    with atomic_directory(out_dir) as tmp:
        entries = {}
        for key, source, weights, args_name, config, kind in (
                ("ddpm", ddpm, DDPM_WEIGHTS, DDPM_ARGS, ddpm_config, weight_kinds[0]),
                ("classifier", classifier, CLASSIFIER_WEIGHTS, CLASSIFIER_ARGS, classifier_config, weight_kinds[1])):
            state, plain = _state_of(source, f"--{key}")
            state = _write_weights(source, state, plain, os.path.join(tmp, weights), half)
            shutil.copyfile(os.path.join(os.path.dirname(source), ARGS_FILE), os.path.join(tmp, args_name))
            saved = read_json(os.path.join(tmp, args_name), f"--{key}")
            config.update(saved)
            entries[key] = {**weights_record(source, config, state, _precision(state), kind),
                            "files": [weights, args_name]}
        _write_json(os.path.join(tmp, PREPROCESSING), preprocessing)
        files = [DDPM_WEIGHTS, DDPM_ARGS, CLASSIFIER_WEIGHTS, CLASSIFIER_ARGS, PREPROCESSING]
        if chosen is not None:
            _write_json(os.path.join(tmp, SELECTION), portable_selection(chosen))
            files.append(SELECTION)
        card = {
            "format": FORMAT,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"guided_diffusion_cdm": project_version(), "torch": torch.__version__,
                         "python": platform.python_version()},
            "use": {"method": method, "choice": choice if chosen is not None else None},
            "training_data": training_data_record(settings, ddpm_config.get("dataset")),
            "preprocessing": {**preprocessing["options"], "modalities": preprocessing["modalities"],
                              "lesion": preprocessing["lesion"]},
            "ddpm": entries["ddpm"], "classifier": entries["classifier"],
            "selection": selection_summary(chosen, choice),
            "validation": scores,
            "files": {name: file_record(os.path.join(tmp, name)) for name in files},
        }
        _write_json(os.path.join(tmp, MODEL_CARD), card)
        with open(os.path.join(tmp, README), "w") as f:
            f.write(readme_text(card))
        for name in carried:  # what an earlier folder held beside the model (figures, other networks)
            source = os.path.join(out_dir, name)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(tmp, name), symlinks=True)
            else:
                shutil.copy2(source, os.path.join(tmp, name), follow_symlinks=False)
    log(f"wrote {out_dir}: {', '.join(files + [MODEL_CARD, README])}"
        + (f" (kept {', '.join(sorted(carried))})" if carried else ""))
    return card


def read_selection_file(path, choice):
    """selection.json as a dict, its choice `choice` and every other choice checked as the front ends read them."""
    from .segment.config import choices_of
    from .segment.settings_file import config_of, read_selection

    selection = read_selection(path, "--selection")
    for name in [choice] + choices_of(selection):
        config_of(selection, name, path, "--selection")
    return selection


def _write_json(path, value):
    with open(path, "w") as f:
        f.write(json.dumps(value, indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Use: --model_dir


def read_model_card(folder, flag="--model_dir"):
    """model.json of a model folder, after checking that every file it lists is there with its size."""
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {folder}: no such folder")
    path = os.path.join(folder, MODEL_CARD)
    if not os.path.isfile(path):
        raise UserError(f"{flag} {folder}: no {MODEL_CARD}, so not a model folder (scripts/export_model.py writes one)")
    card = read_json(path, flag)
    if not isinstance(card.get("files"), dict) or not isinstance(card.get("use"), dict):
        raise UserError(f"{flag} {folder}: {MODEL_CARD} is not a model card (no files or use)")
    for name, record in card["files"].items():
        file_path = os.path.join(folder, name)
        if not os.path.isfile(file_path):
            raise UserError(f"{flag} {folder}: {name} is missing (the folder is incomplete; copy or export it again)")
        size = os.path.getsize(file_path)
        if isinstance(record, dict) and record.get("bytes") not in (None, size):
            raise UserError(f"{flag} {folder}: {name} has {size} bytes but {MODEL_CARD} records {record['bytes']} "
                            f"(changed or truncated since it was exported)")
    return card


def preprocessing_beside(model_path):
    """The preprocessing.json of the model folder a DDPM file sits in (FOLDER/ddpm/model.pt), or None."""
    folder = os.path.dirname(os.path.dirname(os.path.abspath(model_path)))
    candidate = os.path.join(folder, PREPROCESSING)
    return candidate if os.path.isfile(candidate) else None


def apply_model_dir(args, explicit):
    """--model_dir: the folder's weights, preprocessing, selection, method and choice onto `args`, except
    where a flag was typed (`explicit`), which wins. Returns {flag: value taken} ({} without --model_dir)."""
    folder = getattr(args, "model_dir", "")
    if not folder:
        return {}
    card = read_model_card(folder)
    use = card["use"]
    taken = {}

    def take(flag, value):
        if flag not in explicit and hasattr(args, flag):
            setattr(args, flag, value)
            taken[flag] = value

    take("model_path", os.path.join(folder, DDPM_WEIGHTS))
    if "save_dir" not in explicit:  # --save_dir names the classifier's folder
        take("classifier_path", os.path.join(folder, CLASSIFIER_WEIGHTS))
    take("dataset_json", os.path.join(folder, PREPROCESSING))
    if SELECTION in card["files"]:
        take("settings", os.path.join(folder, SELECTION))
        if use.get("choice") and "settings" in taken:  # a typed --settings keeps its own --choice
            take("choice", use["choice"])
    if use.get("method") and not getattr(args, "guided", False):
        take("method", use["method"])
    return taken
