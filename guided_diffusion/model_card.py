"""The records of a model folder (`model_folder`): its file names, the preprocessing, training-data,
weights and validation records of the model card, and the card's README text."""

import hashlib
import os

import torch

from .checkpoint_util import parse_step
from .cli import UserError

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
