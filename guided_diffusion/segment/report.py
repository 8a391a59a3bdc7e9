"""Every output of a segmentation run, written all or nothing.

`evaluate_variant` turns maps into masks (with and without the largest-component step) and
scores them; `write_report` writes, into a temporary folder that replaces `out_dir` only when
everything is written:

    summary.json  one schema whatever the number of variants: method, settings, n_images,
                  seconds_per_image, mask_options and `variants: {name: {settings, otsu,
                  largest_component, map_separability[, volumes]}}`
    metrics.csv, saliency.npz, masks/, masks_lcc/, grid.png[, volumes/, volumes.csv]
                  in out_dir for one variant, in out_dir/<variant>/ for several
"""

import csv
import gzip
import io
import json
import math
import os

import numpy as np

from ..cli import atomic_directory
from ..metrics import dice_3d, evaluate_masks, summarize
from .postprocess import MaskOptions, foreground_mask, normalize_map, otsu_separability, saliency_to_mask



def evaluate_variant(maps, gts, images, options=MaskOptions()):
    """Masks and per-image records of one variant: {"otsu": (masks, records), "largest_component": ...}."""
    results = {}
    for key, keep in (("otsu", False), ("largest_component", True)):
        variant_options = MaskOptions(smooth_sigma=options.smooth_sigma, foreground_only=options.foreground_only,
                                      keep_largest=keep)
        masks = saliency_to_mask(maps, options=variant_options, images=images)
        results[key] = (masks, evaluate_masks(masks, gts))
    return results


def _scores(evaluated, maps, images, options):
    """Summaries of both mask kinds and the label-free map separability (see `postprocess`)."""
    region = foreground_mask(images) if options.foreground_only else None
    scores = {key: summarize(records) for key, (_, records) in evaluated.items()}
    scores["map_separability"] = float(np.mean(otsu_separability(maps, region, options.smooth_sigma)))
    return scores


def variant_summary(maps, gts, images, options=MaskOptions()):
    """Summary of one variant without writing anything (for choosing settings on the training split)."""
    return _scores(evaluate_variant(maps, gts, images, options), maps, images, options)


def _clean(obj):
    """JSON-ready: numpy scalars to Python, NaN and infinities to null."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write_json(path, obj):
    with open(path, "w") as f:
        f.write(json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n")


def _write_csv(path, rows, fields):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with open(path, "w") as f:
        f.write(buffer.getvalue())


def _metric_rows(names, labels, records, records_lcc):
    columns = [c for c in records[0] if c not in ("pred_empty", "gt_empty", "intersection")] if records else []
    rows = []
    for name, label, rec, lcc in zip(names, labels, records, records_lcc):
        row = {"name": name, "label": int(label), **{c: rec[c] for c in columns}}
        row.update({f"{c}_lcc": lcc[c] for c in columns if c != "gt_pixels"})
        rows.append(row)
    fields = ["name", "label", *columns, *[f"{c}_lcc" for c in columns if c != "gt_pixels"]]
    return rows, fields


def _write_masks(folder, names, masks):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for name, mask in zip(names, masks):
        stem = os.path.splitext(os.path.basename(name))[0]
        Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(folder, stem + ".png"), format="PNG")


def write_grid(path, images, gts, maps, preds, names, records, count):
    """image | ground truth | map | prediction, one row per image, for the first `count` images."""
    from matplotlib.figure import Figure

    count = min(count, len(images))
    fig = Figure(figsize=(8, 2.1 * count), dpi=100)
    titles = ("image", "ground truth", "saliency map", "prediction (green: truth)")
    normalised = normalize_map(maps[:count])
    for row in range(count):
        panels = (np.asarray(images[row, 0]), gts[row], normalised[row], preds[row])
        for col, panel in enumerate(panels):
            ax = fig.add_subplot(count, 4, row * 4 + col + 1)
            ax.axis("off")
            vmin, vmax = (-1, 1) if col == 0 else (0, 1)
            ax.imshow(panel, cmap="magma" if col == 2 else "gray", vmin=vmin, vmax=vmax, interpolation="nearest")
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
    fig.savefig(path, format="png")


def check_volumes_possible(src_dir, split, names):
    """Raise ValueError (naming src_dir) unless masks of `names` can be pasted back into volumes."""
    from ..volumes import read_manifest

    if not os.path.isfile(os.path.join(src_dir, "manifest.csv")):
        raise ValueError(f"src_dir {src_dir}: no manifest.csv, so masks cannot be pasted back into volumes "
                         f"(a layout from prepare_brats.py or make_demo_data.py has one)")
    rows = {os.path.basename(r["file"]) for r in read_manifest(src_dir) if r["split"] == split}
    missing = [n for n in names if os.path.basename(n) not in rows]
    if missing:
        raise ValueError(f"src_dir {src_dir}: manifest.csv has no row for {missing[0]}")


def paste_volumes(src_dir, split, folder, names, masks_by_kind):
    """Masks back into each subject's source grid; per-subject rows with 3-D Dice per mask kind."""
    import nibabel as nib

    from ..volumes import paste_slices, read_manifest

    rows = [r for r in read_manifest(src_dir) if r["split"] == split]
    settings_path = os.path.join(src_dir, "dataset.json")
    lesion_labels = ()
    if os.path.isfile(settings_path):
        with open(settings_path) as f:
            lesion_labels = tuple(json.load(f).get("options", {}).get("lesion_labels", ()) or ())
    evaluated = {os.path.basename(n): i for i, n in enumerate(names)}
    by_name = {os.path.basename(r["file"]): r for r in rows}
    os.makedirs(folder, exist_ok=True)
    results = []
    for source in sorted({by_name[n]["source"] for n in evaluated}):
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
                raise ValueError(f"{subject_rows[0]['seg_source']}: shape {gt.shape} differs from {source} "
                                 f"{prediction.shape}")
            result[f"dice_3d{kind}"] = dice_3d(prediction, gt)
            volume = nib.Nifti1Image(prediction.astype(np.uint8), pasted.affine)
            with gzip.open(os.path.join(folder, f"{subject}_pred{kind}.nii.gz"), "wb") as f:
                f.write(volume.to_bytes())
        results.append(result)
    return results


def _write_variant(folder, slices, maps, options, grid_images, volumes_from):
    """Files of one variant in `folder`; returns its summary (without settings)."""
    os.makedirs(folder, exist_ok=True)
    evaluated = evaluate_variant(maps, slices.masks, slices.images, options)
    (masks, records), (masks_lcc, records_lcc) = evaluated["otsu"], evaluated["largest_component"]
    rows, fields = _metric_rows(slices.names, slices.labels.numpy(), records, records_lcc)
    _write_csv(os.path.join(folder, "metrics.csv"), rows, fields)
    with open(os.path.join(folder, "saliency.npz"), "wb") as f:
        np.savez_compressed(f, maps=maps.astype(np.float32), names=np.asarray(slices.names))
    _write_masks(os.path.join(folder, "masks"), slices.names, masks)
    _write_masks(os.path.join(folder, "masks_lcc"), slices.names, masks_lcc)
    if grid_images > 0:
        write_grid(os.path.join(folder, "grid.png"), slices.images.numpy(), slices.masks, maps, masks, slices.names,
                   records, grid_images)
    summary = _scores(evaluated, maps, slices.images, options)
    if volumes_from is not None:
        src_dir, split = volumes_from
        subjects = paste_volumes(src_dir, split, os.path.join(folder, "volumes"), slices.names,
                                 {"": masks, "_lcc": masks_lcc})
        _write_csv(os.path.join(folder, "volumes.csv"), subjects, list(subjects[0]))
        summary["volumes"] = {"n_subjects": len(subjects)}
        for key in ("dice_3d", "dice_3d_lcc"):
            values = [s[key] for s in subjects if math.isfinite(s[key])] or [np.nan]
            summary["volumes"].update({f"{key}_mean": float(np.mean(values)), f"{key}_std": float(np.std(values))})
    return summary


def write_report(out_dir, *, method, settings, slices, maps_by_variant, seconds, variant_settings=None,
                 options=MaskOptions(), grid_images=8, volumes_from=None):
    """Write every output of a run to `out_dir` (replacing an earlier run there only on success).

    `variant_settings` maps a variant to its own settings (e.g. its tau); `volumes_from` is
    (src_dir, split) to paste masks back into NIfTI volumes. Returns the summary written.
    """
    variant_settings = variant_settings or {}
    several = len(maps_by_variant) > 1
    summary = {"method": method, "settings": settings, "n_images": len(slices),
               "seconds_per_image": seconds / max(len(slices), 1), "mask_options": options.as_dict(), "variants": {}}
    with atomic_directory(out_dir) as tmp:
        for variant, maps in maps_by_variant.items():
            folder = os.path.join(tmp, variant) if several else tmp
            result = _write_variant(folder, slices, maps, options, grid_images, volumes_from)
            summary["variants"][variant] = {"settings": variant_settings.get(variant, {}), **result}
        _write_json(os.path.join(tmp, "summary.json"), summary)
    return summary
