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
`apply_model_dir` is the `--model_dir` of image_p_seg.py and segment_scans.py. Nothing in the folder is
looked up through a path outside it, so it works wherever it is copied.
"""

import datetime
import hashlib
import json
import os
import platform
import shutil

import torch

from .checkpoint_util import ARGS_FILE, check_same_diffusion, load_classifier, load_model_and_diffusion, parse_step
from .cli import UserError, atomic_directory, read_json  # noqa: F401  (read_json: also for the commands)
from .weights import read_checkpoint

FORMAT = 1
DDPM_WEIGHTS = "ddpm/model.pt"
DDPM_ARGS = "ddpm/args.json"
CLASSIFIER_WEIGHTS = "classifier/model.pt"
CLASSIFIER_ARGS = "classifier/args.json"
PREPROCESSING = "preprocessing.json"
SELECTION = "selection.json"
MODEL_CARD = "model.json"
README = "README.md"
# The entries an export writes; anything else in an earlier folder at the same place (figures, other
# models such as runs/demo/resnet18) is carried over untouched.
FOLDER_ENTRIES = ("ddpm", "classifier", PREPROCESSING, SELECTION, MODEL_CARD, README)
DEFAULT_METHOD = "cg-cdm"
DEFAULT_CHOICE = "mask_tuned"

# dataset.json keys that describe where the data were or which subject is where: the model card
# summarises them, the preprocessing leaves them out.
DATASET_ONLY_KEYS = ("input_dir", "input_dir_relative", "subjects", "cases", "counts", "val_fraction", "seed")
# selection.json paths that name the models the settings were chosen with: the folder's own copies.
SELECTION_MODEL_PATHS = {"model_path": DDPM_WEIGHTS, "classifier_path": CLASSIFIER_WEIGHTS}


def _is_absolute_path(value):
    return isinstance(value, str) and (os.path.isabs(value) or (len(value) > 2 and value[1:3] in (":\\", ":/")))


def without_absolute_paths(value):
    """`value` (JSON data) with every string that is an absolute path left out, at any depth."""
    if isinstance(value, dict):
        return {k: without_absolute_paths(v) for k, v in value.items() if not _is_absolute_path(v)}
    if isinstance(value, list):
        return [without_absolute_paths(v) for v in value if not _is_absolute_path(v)]
    return value


# ---------------------------------------------------------------------------------------------
# The records of a folder


def preprocessing_record(settings, path):
    """preprocessing.json from a prepared dataset's dataset.json (`settings`, read from `path`).

    It keeps every setting of the data (options, modalities, dataset, label scheme, region, and keys
    a converter may add), not where the data were, and names the channel order and orientation.
    """
    from .segment.scans import dataset_preprocessing

    options, modalities = dataset_preprocessing(settings, path)  # UserError unless a prepared dataset
    record = {k: v for k, v in settings.items() if k not in DATASET_ONLY_KEYS}
    record.update(modalities=list(modalities), channel_order=list(modalities))
    record.setdefault("orientation", "closest canonical (RAS+), axial slices volume[:, :, z]")
    # in words, beside the machine-read label_scheme / region a converter may record
    record["lesion"] = (f"region {settings['region']}" if settings.get("region") else
                        "label values " + ", ".join(str(v) for v in options.lesion_labels) if options.lesion_labels
                        else "every nonzero label (whole tumour)")
    return without_absolute_paths(record)


def training_data_record(settings, dataset=None):
    """What the model card says about the training data: dataset (else `dataset`, the training flag),
    subjects and slices per split."""
    subjects = settings.get("subjects") or {}
    counts = settings.get("counts") or {}
    record = {
        "dataset": settings.get("dataset") or dataset or "BraTS-style subject folders",
        "subjects": {split: len(names) for split, names in subjects.items()},
        "slices": counts,
        "val_fraction": settings.get("val_fraction"),
        "split_seed": settings.get("seed"),
    }
    for key in ("region", "label_scheme", "layout"):
        if key in settings:
            record[key] = settings[key]
    options = settings.get("options") or {}
    record["lesion_labels"] = list(options.get("lesion_labels") or [])
    return without_absolute_paths(record)


def portable_selection(selection):
    """selection.json with its model paths replaced by the folder's own files and every other absolute
    path (the training data's folder, a scan decision's paths) removed; all else as it is."""
    portable = without_absolute_paths({k: v for k, v in selection.items() if k not in SELECTION_MODEL_PATHS})
    for key, relative in SELECTION_MODEL_PATHS.items():
        if key in selection:
            portable[key] = relative
    return dict(sorted(portable.items()))


def validation_record(summary, path):
    """The scores of a summary.json of image_p_seg.py (slices) or segment_scans.py (whole scans)."""
    settings = summary.get("settings") or {}
    if isinstance(summary.get("variants"), dict):
        variants = {}
        for name, result in summary["variants"].items():
            otsu = result.get("otsu") or {}
            variants[name] = {k: otsu.get(k) for k in ("n", "dice_mean", "dice_std", "iou_mean", "hd95_mean")}
        return {"kind": "slices", "method": summary.get("method"), "split": settings.get("split"),
                "slices": settings.get("slices"), "n_scored": summary.get("n_scored"),
                "seconds_per_image": summary.get("seconds_per_image"), "variants": variants}
    if "n_scans" in summary:
        return {"kind": "scans", "method": summary.get("method"), "n_scans": summary.get("n_scans"),
                "n_with_reference": summary.get("n_with_reference"), "dice_3d_mean": summary.get("dice_3d_mean"),
                "hd95_mm_mean": summary.get("hd95_mm_mean")}
    raise UserError(f"--validation {path}: not a summary.json of image_p_seg.py or segment_scans.py")


def project_version():
    try:
        from importlib.metadata import version

        return version("guided-diffusion-cdm")
    except Exception:  # not installed as a distribution (a plain checkout on the path)
        return "unknown"


def _network_record(config, keys):
    return {k: config[k] for k in keys if k in config}


DDPM_CARD_KEYS = ("image_size", "in_channels", "num_classes", "num_channels", "num_res_blocks", "channel_mult",
                  "attention_resolutions", "num_heads", "learn_sigma", "class_cond", "diffusion_steps",
                  "noise_schedule", "max_noise_level", "lr", "batch_size", "ema_rate")
CLASSIFIER_CARD_KEYS = ("image_size", "in_channels", "num_classes", "model_type", "classifier_width",
                        "classifier_depth", "classifier_attention_resolutions", "noised", "max_noise_level", "lr",
                        "batch_size", "ema_rate")


WEIGHT_KINDS = ("auto", "ema", "raw")


def weights_kind(source, config, kind="auto"):
    """'EMA <rate>' or 'raw': from the file name (ema_<rate>_<step>.pt, model<step>.pt) unless `kind` says."""
    name = os.path.basename(source)
    rate = str(config.get("ema_rate") or "").split(",")[0]
    if kind == "ema" or (kind == "auto" and name.startswith("ema_")):
        return f"EMA {name[len('ema_'):].rsplit('_', 1)[0] if name.startswith('ema_') else rate}".rstrip()
    if kind == "raw" or parse_step(source) or not rate:  # trained without an EMA: the raw weights
        return "raw"
    return f"as in {name}"


def weights_record(source, config, state, precision, kind="auto"):
    """The model card's entry for one network."""
    name = os.path.basename(source)
    kind = weights_kind(source, config, kind)
    steps = parse_step(source) or config.get("max_steps")
    return {"exported_from": name, "weights": kind, "training_steps": steps, "precision": precision,
            "parameters": int(sum(v.numel() for v in state.values() if torch.is_tensor(v))),
            "configuration": _network_record(config, DDPM_CARD_KEYS if "num_res_blocks" in config
                                             else CLASSIFIER_CARD_KEYS)}


def file_record(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def _fmt(value, digits=3):
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def readme_text(card):
    """README.md: the model card in a few lines."""
    data, use, ddpm, classifier = card["training_data"], card["use"], card["ddpm"], card["classifier"]
    prep = card["preprocessing"]
    subjects = ", ".join(f"{n} {split}" for split, n in data["subjects"].items()) or "not recorded"
    slices = "; ".join(f"{split}: {c.get('tumor', 0)} tumour, {c.get('normal', 0)} normal"
                       for split, c in data["slices"].items()) or "not recorded"
    lines = [
        "# CDM / CG-CDM model folder", "",
        f"Weakly supervised lesion segmentation (conditional diffusion models): a class-conditional DDPM and a "
        f"noise-conditioned classifier trained on image-level labels only. Written {card['created']} by "
        f"guided-diffusion-cdm {card['versions']['guided_diffusion_cdm']} with torch {card['versions']['torch']}.", "",
        "## Use", "",
        "```bash",
        "python scripts/segment_scans.py --model_dir THIS_FOLDER --input scan_flair.nii.gz --out_dir masks",
        "python scripts/image_p_seg.py --model_dir THIS_FOLDER --src_dir SLICE_DATASET --out_dir seg",
        "```", "",
        f"`--model_dir` takes the weights, their configuration, the preprocessing and the method `{use['method']}` "
        + (f"with the settings `{use['choice']}` of selection.json" if use.get("choice") else "with untuned defaults")
        + "; typed flags win.", "",
        "## Training data", "",
        f"- dataset: {data['dataset']}; subjects: {subjects}",
        f"- slices: {slices}",
        f"- lesion: {prep['lesion']}" + (f" (label scheme {data['label_scheme']})" if data.get("label_scheme") else ""),
        f"- preprocessing: {', '.join(prep['modalities'])} ({prep['intensity']} intensities), crop {prep['crop']}, "
        f"{prep['image_size']} x {prep['image_size']} px", "",
        "## Networks", "",
        f"- DDPM: {ddpm['weights']} weights after {ddpm['training_steps']} steps ({ddpm['parameters']:,} parameters, "
        f"{ddpm['precision']})",
        f"- classifier: {classifier['weights']} weights after {classifier['training_steps']} steps "
        f"({classifier['parameters']:,} parameters, {classifier['precision']})", "",
    ]
    selection = card.get("selection")
    if selection:
        chosen = selection.get("chosen") or {}
        lines += ["## Settings chosen on the training split", "",
                  f"- `{use.get('choice')}`: Q = {chosen.get('noise_level')} T, R = {chosen.get('steps')}, tau = "
                  f"{chosen.get('tau')}, s = {chosen.get('classifier_scale')}, {chosen.get('noise_draws', 1)} noise "
                  f"draw(s); training Dice {_fmt(chosen.get('training_dice'))} on {selection.get('n_training_images')} "
                  f"tumour slices",
                  f"- detection threshold: {_fmt(selection.get('detect_threshold'))}", ""]
    validation = card.get("validation") or []
    if validation:
        lines += ["## Validation", ""]
        for record in validation:
            if record["kind"] == "slices":
                for name, scores in record["variants"].items():
                    lines.append(f"- {record['method']} on {scores.get('n')} {record.get('split')} tumour slices "
                                 f"({name}): Dice {_fmt(scores.get('dice_mean'))}, IoU {_fmt(scores.get('iou_mean'))}, "
                                 f"HD95 {_fmt(scores.get('hd95_mean'), 2)} px")
            else:
                lines.append(f"- {record['method']} on {record['n_with_reference']} whole scans: Dice "
                             f"{_fmt(record.get('dice_3d_mean'))}, HD95 {_fmt(record.get('hd95_mm_mean'), 2)} mm")
        lines.append("")
    return "\n".join(lines)


def selection_summary(selection, choice):
    if not selection:
        return None
    detection = selection.get("detection") or {}
    chosen = selection.get(choice) or {}
    return {"choices": sorted(k for k, v in selection.items() if isinstance(v, dict) and "noise_level" in v),
            "split": selection.get("split"), "n_training_images": selection.get("n_training_images"),
            "chosen": {k: v for k, v in chosen.items() if not isinstance(v, (dict, list))},
            "postprocessing": chosen.get("postprocessing"), "detect_threshold": detection.get("threshold"),
            "min_separability": detection.get("min_separability")}


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
    """selection.json as a dict, its choice `choice` checked as every front end will read it."""
    from .segment.config import SegmentationConfig, choices_of

    selection = read_json(path, "--selection")
    names = choices_of(selection)
    if not names:
        raise UserError(f"--selection {path}: not a selection of scripts/ablation.py (no choice with noise_level, "
                        f"steps, tau and classifier_scale)")
    if choice not in names:
        raise UserError(f"--choice {choice!r}: not in --selection {path} (choose one of {', '.join(names)})")
    for name in names:
        try:
            SegmentationConfig.from_selection(selection, name)
        except ValueError as err:
            raise UserError(f"--selection {path}: {err}") from None
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
