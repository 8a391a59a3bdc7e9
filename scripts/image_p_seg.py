"""Weakly supervised tumour segmentation with CDM / CG-CDM and baselines, with metrics.

Example (the paper's CG-CDM with its defaults: Q = 0.1 T, R = 10, tau = 0.95, s = 10):
    python scripts/image_p_seg.py --src_dir data/demo/slices --model_path runs/ddpm/model010000.pt \
        --classifier_path runs/cls/model005000.pt --method cg-cdm

The tumour slices of the validation split that have masks (optionally one fold of them) are
segmented with `--method`; outputs go to `--out_dir` (default `<save_dir or the model's folder>/
seg_<method>`):
    metrics.csv   per image: Dice, IoU, HD95 (pixels) after Otsu, and after the largest component (_lcc)
    summary.json  mean / std / counts of every metric, with and without the largest-component step,
                  seconds per image, and the settings
    saliency.npz  the maps (float32, N x H x W) and image names
    masks/, masks_lcc/   predicted masks as PNG (255 = tumour)
    grid.png      image | ground truth | map | prediction for the first images
    volumes/      with --volumes True: masks pasted back into NIfTI volumes, 3-D Dice per subject
With several taus (`--tau 0.95,0.5,0`) the CDM runs once, every tau shares branch A, and each tau
gets its own sub-folder `tau_<value>/` plus a summary table in `<out_dir>/summary.json`.
"""

import argparse
import csv
import gzip
import io
import json
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from guided_diffusion import dist_util, logger
from guided_diffusion.cam import CAM_METHODS, cam_saliency, gap_linear_head
from guided_diffusion.checkpoint_util import (
    check_same_diffusion,
    explicit_flags,
    latest_checkpoint,
    load_classifier,
    load_model_and_diffusion,
)
from guided_diffusion.cli import UserError, atomic_path, atomic_write_text, require_dir, run_main
from guided_diffusion.guidance import make_classifier_cond_fn
from guided_diffusion.metrics import dice_3d, evaluate_masks, normalize_map, saliency_to_mask, summarize
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    classifier_defaults,
    diffusion_from_config,
    model_and_diffusion_defaults,
    str2bool,
)
from guided_diffusion.segmentation import METHODS, cdm_saliency_multi, per_image_noise, require_class_conditional

ALL_METHODS = tuple(METHODS) + CAM_METHODS


def segmentation_defaults():
    return dict(
        model_path="",
        src_dir="",
        save_dir="",
        out_dir="",
        classifier_path="",
        method="cdm",
        split="validation",
        fold=0,
        num_folds=1,
        batch_size=8,
        max_images=0,
        noise_level=0.1,
        steps=10,
        stride=1,
        tau="0.95",
        classifier_scale=10.0,
        healthy_label=0,
        clip_denoised=True,
        abs_map=False,
        seed=0,
        grid_images=8,
        volumes=False,
    )


HELP = {
    "model_path": "(required) class-conditional DDPM checkpoint with its args.json beside it",
    "src_dir": "(required) slice dataset root holding training/ and validation/ (validate/ also accepted)",
    "save_dir": "classifier folder (the original code's meaning): its newest model*.pt is the classifier "
                "when --classifier_path is empty; also the default parent of --out_dir",
    "out_dir": "output folder (default: <save_dir, else the model's folder>/seg_<method>)",
    "classifier_path": "noise-conditioned classifier checkpoint (args.json beside it); needed by cg-cdm, "
                       "cg-diff and anomaly (unless --classifier_scale 0) and by the CAM methods",
    "method": "cdm, cg-cdm (paper), cg-diff (original ancestral variant), anomaly (DDIM reconstruction with "
              "guidance), or a CAM baseline: " + ", ".join(CAM_METHODS),
    "split": "which split's tumour slices to segment",
    "fold": "evaluate fold k of --num_folds contiguous folds of the sorted tumour slices",
    "num_folds": "number of folds (1: every tumour slice)",
    "batch_size": "images per batch (CDM runs both branches of a batch in one UNet call per step)",
    "max_images": "evaluate at most this many images, evenly spaced over the sorted tumour slices (0: all)",
    "noise_level": "noise level Q: a fraction of the diffusion steps T in (0, 1) (0.1 = step 400 of 4000), "
                   "or an integer step; for anomaly it is the encoding depth L",
    "steps": "R, the number of DDIM steps from Q (CDM / CG-CDM)",
    "stride": "timesteps per DDIM / ancestral step (1: every step of the chain, as in the paper)",
    "tau": "soft-label weight of the image's label in branch B (paper 0.95); a comma list runs an ablation",
    "classifier_scale": "classifier guidance scale s (paper 10); 0 disables guidance",
    "healthy_label": "the class index of healthy images, y0",
    "clip_denoised": "clip the predicted x0 to [-1, 1] in each step",
    "abs_map": "sum |a| over channels instead of the signed a (cdm, cg-cdm, cg-diff); the signed map (paper) "
               "marks lesions the tumour label makes brighter, |a| also finds darker ones",
    "seed": "seed of the noise draw (each image's noise depends only on the seed and its position)",
    "grid_images": "images shown in grid.png",
    "volumes": "paste masks back into NIfTI volumes (needs manifest.csv in --src_dir) and report 3-D Dice",
}


def create_argparser():
    parser = argparse.ArgumentParser(
        description="Segment tumour slices from image-level labels with CDM / CG-CDM or a baseline.",
        allow_abbrev=False,
    )
    for key, value in segmentation_defaults().items():
        value_type = str2bool if isinstance(value, bool) else type(value)
        names = [f"--{key}"] + (["-f"] if key == "fold" else [])
        shown = "" if value == "" or "default" in HELP[key] else f" (default: {value})"
        parser.add_argument(*names, dest=key, default=value, type=value_type, help=HELP[key] + shown)
    parser.add_argument("--guided", nargs="?", const=True, default=False, type=str2bool,
                        help="the original code's switch: same as --method cg-cdm")
    checked = parser.add_argument_group(
        "checkpoint configuration",
        "Read from args.json beside each checkpoint; typing one only checks that it agrees.",
    )
    flags = dict(model_and_diffusion_defaults())
    flags.update({k: v for k, v in classifier_defaults().items() if k not in flags})
    add_dict_to_argparser(checked, flags)
    return parser


# ---------------------------------------------------------------------------------------------
# Arguments


def parse_taus(text):
    try:
        taus = [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--tau {text!r}: expected a number or a comma list such as 0.95,0.5,0")
    if not taus:
        raise UserError("--tau is empty")
    for tau in taus:
        if not 0 <= tau < 1:
            raise UserError(f"--tau {tau}: must lie in [0, 1)")
    return taus


def resolve_method(args):
    method = args.method
    if args.guided:
        if method not in ("cdm", "cg-cdm"):
            raise UserError(f"--guided is the original switch for --method cg-cdm; it does not combine with --method {method}")
        method = "cg-cdm"
    if method not in ALL_METHODS:
        raise UserError(f"--method {method!r}: unknown; choose one of {', '.join(ALL_METHODS)}")
    return method


def check_args(args, method, taus):
    if not args.model_path and method in METHODS:
        raise UserError("--model_path is required")
    if not args.src_dir:
        raise UserError("--src_dir is required")
    for flag in ("batch_size", "steps", "stride", "num_folds"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.max_images < 0:
        raise UserError(f"--max_images {args.max_images}: must be 0 (all) or positive")
    if len(taus) > 1 and not (method in METHODS and METHODS[method].uses_tau):
        raise UserError(f"--tau lists several values but --method {method} does not use tau")


def needs_classifier(method, scale):
    if method in CAM_METHODS:
        return True
    return METHODS[method].guided and scale != 0


def find_classifier(args, method):
    if args.classifier_path:
        return args.classifier_path
    if args.save_dir:
        require_dir(args.save_dir, "--save_dir")
        newest = latest_checkpoint(args.save_dir, "model")
        if newest is None:
            fallbacks = [os.path.join(args.save_dir, n) for n in ("model.pt", "classifier_model.pt")]
            newest = next((p for p in fallbacks if os.path.isfile(p)), None)
        if newest is None:
            raise UserError(f"--save_dir {args.save_dir}: no classifier checkpoint model*.pt in it; pass --classifier_path")
        return newest
    raise UserError(f"--classifier_path is required for --method {method} (or --save_dir, the classifier's folder)")


def check_classifier_fits(classifier_config, image_size, in_channels, num_classes, path):
    wanted = {"image_size": image_size, "in_channels": in_channels, "num_classes": num_classes}
    for key, value in wanted.items():
        if value is not None and classifier_config.get(key) != value:
            raise UserError(f"--classifier_path {path}: classifier has {key}={classifier_config.get(key)} but the "
                            f"DDPM has {key}={value}")


# ---------------------------------------------------------------------------------------------
# Data


def load_tumour_slices(args, image_size, in_channels):
    """(images (N, C, H, W), masks (N, H, W) bool, labels (N,), names) of the evaluated tumour slices.

    The tumour images of the split that have a mask, in sorted order, then fold `--fold` of them,
    then at most `--max_images` of them, evenly spaced.
    """
    from guided_diffusion.datasets import SliceDataset, list_slices, select_fold

    tumours = SliceDataset(args.src_dir, args.split, files=list_slices(args.src_dir, args.split, classes=("tumor",)))
    with_masks = [item for item, mask in zip(tumours.items, tumours.mask_paths) if mask is not None]
    if not with_masks:
        raise UserError(f"--src_dir {args.src_dir}: no tumour image of the {args.split} split has a mask in seg/")
    if len(with_masks) < len(tumours.items):
        logger.log(f"{len(tumours.items) - len(with_masks)} tumour images without a mask are not evaluated")
    chosen = select_fold(with_masks, args.fold, args.num_folds)
    if args.max_images and len(chosen) > args.max_images:
        # evenly spaced over the sorted slices, so a subset spans subjects instead of the first one
        picks = np.linspace(0, len(chosen) - 1, args.max_images).round().astype(int)
        chosen = [chosen[i] for i in picks]
    dataset = SliceDataset(args.src_dir, args.split, image_size=image_size, in_channels=in_channels,
                           require_masks=True, files=chosen)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([item["image"] for item in items])
    masks = torch.stack([item["mask"][0] > 0.5 for item in items]).numpy()
    labels = torch.stack([item["label"] for item in items])
    return images, masks, labels, [item["name"] for item in items]


# ---------------------------------------------------------------------------------------------
# Saliency over the whole set


def compute_maps(method, args, taus, images, labels, model, diffusion, classifier, device):
    """{variant name: maps (N, H, W)} and the seconds spent; one variant per tau for CDM methods."""
    cond_fn = None
    if classifier is not None and method in METHODS and args.classifier_scale != 0:
        cond_fn = make_classifier_cond_fn(classifier, args.classifier_scale)
    settings = dict(noise_level=args.noise_level, steps=args.steps, stride=args.stride,
                    healthy_label=args.healthy_label, cond_fn=cond_fn, clip_denoised=args.clip_denoised)
    uses_tau = method in METHODS and METHODS[method].uses_tau
    names = [f"tau_{tau:g}" for tau in taus] if uses_tau and len(taus) > 1 else [""]
    collected = {name: [] for name in names}
    generator = torch.Generator().manual_seed(args.seed)
    elapsed = 0.0
    batches = range(0, len(images), args.batch_size)
    for start in tqdm(batches, desc=f"{method} batches", unit="batch"):
        x0 = images[start:start + args.batch_size].to(device)
        y1 = labels[start:start + args.batch_size].to(device)
        indices = range(start, start + len(x0))
        began = time.perf_counter()
        if method in CAM_METHODS:
            batch_maps = [cam_saliency(classifier, x0, y1, method)]
        elif uses_tau:
            noise = per_image_noise(x0.shape[1:], args.seed, indices, device=device)
            by_tau = cdm_saliency_multi(model, diffusion, x0, y1, taus=taus, absolute=args.abs_map,
                                        noise=noise, **settings)
            batch_maps = [by_tau[tau] for tau in taus]
        else:
            noise = per_image_noise(x0.shape[1:], args.seed, indices, device=device)
            extra = {"generator": generator, "absolute": args.abs_map} if method == "cg-diff" else {}
            batch_maps = [METHODS[method].function(model, diffusion, x0, y1, noise=noise, **settings, **extra)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - began
        for name, maps in zip(names, batch_maps):
            collected[name].append(np.asarray(maps, dtype=np.float32))
    return {name: np.concatenate(parts) for name, parts in collected.items()}, elapsed


# ---------------------------------------------------------------------------------------------
# Outputs


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        obj = obj.item()
    return _finite_or_none(obj)


def write_json(path, obj):
    atomic_write_text(path, json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n")


def write_metrics_csv(path, names, labels, records, records_lcc):
    fields = ["name", "label", "dice", "iou", "hd95", "pred_pixels", "gt_pixels",
              "dice_lcc", "iou_lcc", "hd95_lcc", "pred_pixels_lcc"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for name, label, rec, lcc in zip(names, labels, records, records_lcc):
        writer.writerow({
            "name": name, "label": int(label), "dice": rec["dice"], "iou": rec["iou"], "hd95": rec["hd95"],
            "pred_pixels": rec["pred_pixels"], "gt_pixels": rec["gt_pixels"], "dice_lcc": lcc["dice"],
            "iou_lcc": lcc["iou"], "hd95_lcc": lcc["hd95"], "pred_pixels_lcc": lcc["pred_pixels"],
        })
    atomic_write_text(path, buffer.getvalue())


def write_mask_pngs(folder, names, masks):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for name, mask in zip(names, masks):
        stem = os.path.splitext(os.path.basename(name))[0]
        with atomic_path(os.path.join(folder, stem + ".png")) as tmp:
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")


def write_saliency_npz(path, names, maps):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, maps=maps.astype(np.float32), names=np.asarray(names))


def write_grid(path, images, gts, maps, preds, names, records, count):
    """image | ground truth | map | prediction, one row per image, for the first `count` images."""
    from matplotlib.figure import Figure

    count = min(count, len(images))
    fig = Figure(figsize=(8, 2.1 * count), dpi=100)
    titles = ("image", "ground truth", "saliency map", "prediction (green: truth)")
    normalised = normalize_map(maps[:count])
    for row in range(count):
        picture = images[row, 0].cpu().numpy()
        panels = (picture, gts[row], normalised[row], preds[row])
        for col, panel in enumerate(panels):
            ax = fig.add_subplot(count, 4, row * 4 + col + 1)
            ax.axis("off")
            cmap = "magma" if col == 2 else "gray"
            vmin, vmax = (-1, 1) if col == 0 else (0, 1)
            ax.imshow(panel, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            header = titles[col] + "\n" if row == 0 else ""
            if col == 0:
                ax.set_title(header + os.path.basename(names[row]), fontsize=7)
            elif col == 3:
                ax.contour(gts[row].astype(float), levels=[0.5], colors="lime", linewidths=0.8)
                dice = records[row]["dice"]
                ax.set_title(header + (f"Dice {dice:.2f}" if math.isfinite(dice) else "Dice n/a"), fontsize=7)
            else:
                ax.set_title(header, fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def paste_volumes(src_dir, split, folder, names, masks_by_kind):
    """Masks back into each subject's source grid; returns per-subject rows with 3-D Dice per mask kind."""
    import nibabel as nib

    from guided_diffusion.volumes import paste_slices, read_manifest

    rows = [r for r in read_manifest(src_dir) if r["split"] == split]
    by_name = {os.path.basename(r["file"]): r for r in rows}
    missing = [n for n in names if os.path.basename(n) not in by_name]
    if missing:
        raise UserError(f"--src_dir {src_dir}: manifest.csv has no row for {missing[0]}")
    settings_path = os.path.join(src_dir, "dataset.json")
    lesion_labels = ()
    if os.path.isfile(settings_path):
        with open(settings_path) as f:
            lesion_labels = tuple(json.load(f).get("options", {}).get("lesion_labels", ()) or ())
    evaluated = {os.path.basename(n): i for i, n in enumerate(names)}
    sources = sorted({by_name[n]["source"] for n in evaluated})
    os.makedirs(folder, exist_ok=True)
    results = []
    for source in tqdm(sources, desc="volumes", unit="subject"):
        subject_rows = [r for r in rows if r["source"] == source]
        seg = np.rint(np.asarray(nib.load(subject_rows[0]["seg_source"]).dataobj)).astype(np.int64)
        gt = np.isin(seg, lesion_labels) if lesion_labels else seg != 0
        subject = subject_rows[0]["subject"]
        result = {"subject": subject,
                  "slices_evaluated": sum(os.path.basename(r["file"]) in evaluated for r in subject_rows)}
        for kind, masks in masks_by_kind.items():
            pasted = paste_slices(subject_rows, {
                r["file"]: masks[evaluated[os.path.basename(r["file"])]].astype(np.float32)
                for r in subject_rows if os.path.basename(r["file"]) in evaluated
            }, nearest=True, source=source)
            prediction = np.asarray(pasted.dataobj) > 0.5
            if prediction.shape != gt.shape:
                raise UserError(f"{subject_rows[0]['seg_source']}: shape {gt.shape} differs from {source} {prediction.shape}")
            result[f"dice_3d{kind}"] = dice_3d(prediction, gt)
            volume = nib.Nifti1Image(prediction.astype(np.uint8), pasted.affine)
            with atomic_path(os.path.join(folder, f"{subject}_pred{kind}.nii.gz")) as tmp:
                with gzip.open(tmp, "wb") as f:  # the temporary name has no .nii.gz for nibabel to go by
                    f.write(volume.to_bytes())
        results.append(result)
    return results


def write_variant(folder, args, method, names, images, gts, labels, maps, seconds, settings):
    """Every output file of one saliency variant; returns its summary."""
    os.makedirs(folder, exist_ok=True)
    masks = saliency_to_mask(maps)
    masks_lcc = saliency_to_mask(maps, keep_largest=True)
    records, records_lcc = evaluate_masks(masks, gts), evaluate_masks(masks_lcc, gts)
    write_metrics_csv(os.path.join(folder, "metrics.csv"), names, labels, records, records_lcc)
    write_saliency_npz(os.path.join(folder, "saliency.npz"), names, maps)
    write_mask_pngs(os.path.join(folder, "masks"), names, masks)
    write_mask_pngs(os.path.join(folder, "masks_lcc"), names, masks_lcc)
    if args.grid_images > 0:
        write_grid(os.path.join(folder, "grid.png"), images, gts, maps, masks, names, records, args.grid_images)
    summary = {
        "method": method,
        "settings": settings,
        "n_images": len(names),
        "seconds_per_image": seconds / len(names),
        "otsu": summarize(records),
        "largest_component": summarize(records_lcc),
    }
    if args.volumes:
        subjects = paste_volumes(args.src_dir, args.split, os.path.join(folder, "volumes"), names,
                                 {"": masks, "_lcc": masks_lcc})
        fields = list(subjects[0])
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(subjects)
        atomic_write_text(os.path.join(folder, "volumes.csv"), buffer.getvalue())
        summary["volumes"] = {
            "n_subjects": len(subjects),
            **{f"{key}_{stat}": float(fn([s[key] for s in subjects if math.isfinite(s[key])] or [np.nan]))
               for key in ("dice_3d", "dice_3d_lcc") for stat, fn in (("mean", np.mean), ("std", np.std))},
        }
    write_json(os.path.join(folder, "summary.json"), summary)
    return summary


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = create_argparser()
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    method = resolve_method(args)
    taus = parse_taus(args.tau)
    check_args(args, method, taus)
    require_dir(args.src_dir, "--src_dir")
    torch.manual_seed(args.seed)
    device = dist_util.dev()

    model = diffusion = config = None
    if method in METHODS:
        model, _, config = load_model_and_diffusion(args.model_path, args, explicit, device)
        if METHODS[method].needs_class_cond and not config["class_cond"]:
            raise UserError(f"--model_path {args.model_path}: the DDPM is not class-conditional (class_cond False); "
                            f"--method {method} needs one trained with --class_cond True")
        if METHODS[method].needs_class_cond:
            require_class_conditional(model, method)
        # The segmentation methods choose their own steps on the full chain.
        diffusion = diffusion_from_config({**config, "timestep_respacing": ""})

    classifier = classifier_path = None
    if needs_classifier(method, args.classifier_scale):
        classifier_path = find_classifier(args, method)
        classifier, classifier_config = load_classifier(classifier_path, args, explicit, device)
        if config is not None:
            check_same_diffusion(classifier_config, config, classifier_path, args.model_path)
            check_classifier_fits(classifier_config, config["image_size"], config["in_channels"],
                                  config["num_classes"], classifier_path)
        else:
            config = {"image_size": classifier_config["image_size"], "in_channels": classifier_config["in_channels"]}

    base = args.save_dir or os.path.dirname(os.path.abspath(args.model_path or classifier_path))
    out_dir = args.out_dir or os.path.join(base, f"seg_{method}")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out_dir {out_dir}: cannot be created ({err.strerror})")
    logger.configure(out_dir, format_strs=["stdout", "log"])

    images, gts, labels, names = load_tumour_slices(args, config["image_size"], config["in_channels"])
    if method not in CAM_METHODS and config.get("num_classes") is not None and int(labels.max()) >= config["num_classes"]:
        raise UserError(f"--src_dir {args.src_dir}: label {int(labels.max())} is not a class of the DDPM")
    logger.log(f"{method}: {len(names)} tumour images from {args.src_dir} ({args.split}, fold {args.fold}/{args.num_folds})")
    settings = {
        "model_path": args.model_path, "classifier_path": classifier_path, "src_dir": args.src_dir,
        "split": args.split, "fold": args.fold, "num_folds": args.num_folds, "seed": args.seed,
    }
    if method in METHODS:
        settings.update(noise_level=args.noise_level, steps=args.steps, stride=args.stride,
                        classifier_scale=args.classifier_scale if classifier is not None else 0.0,
                        healthy_label=args.healthy_label, clip_denoised=args.clip_denoised,
                        abs_map=args.abs_map, diffusion_steps=config["diffusion_steps"])
    if method == "cam" and gap_linear_head(classifier) is None:
        logger.log("cam: the classifier head is not GAP + linear, so CAM is computed in its gradient form (Grad-CAM)")

    maps_by_variant, seconds = compute_maps(method, args, taus, images, labels, model, diffusion, classifier, device)
    summaries = {}
    for variant, maps in maps_by_variant.items():
        variant_settings = dict(settings)
        if method in METHODS and METHODS[method].uses_tau:
            variant_settings["tau"] = taus[list(maps_by_variant).index(variant)]
        folder = os.path.join(out_dir, variant) if variant else out_dir
        summaries[variant or method] = write_variant(folder, args, method, names, images, gts, labels.numpy(),
                                                     maps, seconds, variant_settings)
    if len(summaries) > 1:
        write_json(os.path.join(out_dir, "summary.json"), {"method": method, "variants": summaries})
    for variant, summary in summaries.items():
        otsu, lcc = summary["otsu"], summary["largest_component"]
        logger.log(f"{variant}: Dice {otsu['dice_mean']:.4f} ± {otsu['dice_std']:.4f}, IoU {otsu['iou_mean']:.4f}, "
                   f"HD95 {otsu['hd95_mean']:.2f}; largest component: Dice {lcc['dice_mean']:.4f}, "
                   f"IoU {lcc['iou_mean']:.4f}, HD95 {lcc['hd95_mean']:.2f}; "
                   f"{summary['seconds_per_image']:.3f} s/image")
    logger.log(f"wrote {out_dir}")
    logger.close()


if __name__ == "__main__":
    run_main(main)
