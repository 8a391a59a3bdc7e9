"""Every output of a slice segmentation run, written batch by batch and all or nothing.

`SliceReport` consumes the pipeline's `BatchResult`s as they come (memory does not grow with the
number of images) into a temporary folder that replaces `out_dir` only when `finish` succeeds:

    summary.json  one schema whatever the number of variants: method, settings, n_images, n_scored,
                  n_segmented, seconds_per_image, mask_options[, detection] and `variants: {name:
                  {settings, otsu, largest_component, map_separability[, all_slices][, volumes]}}`
    metrics.csv, saliency.npz, masks/, masks_lcc/, grid.png[, volumes/, volumes.csv]
                  in out_dir for one variant, in out_dir/<variant>/ for several

Slices with a reference mask are scored; the others get maps, masks and rows with empty metric
cells. `otsu` / `largest_component` summarise the scored tumour slices (the paper's protocol: a
missed tumour slice counts with Dice 0); with healthy slices among the scored ones, `all_slices`
summarises every scored slice, so false positives on healthy slices count (`dice_pooled`).
"""

import csv
import io
import json
import math
import os
import zipfile
from dataclasses import replace

import numpy as np

from ..files import atomic_directory
from ..metrics import evaluate_masks, summarize
from .detect import detection_scores
from .postprocess import MaskOptions, foreground_mask, normalize_map, otsu_separability, saliency_to_mask

# (summary key, keep largest, file suffix): the run's own masks (the largest component only with
# MaskOptions.keep_largest) and, beside them, always those of the largest component
MASK_KINDS = (("otsu", False, ""), ("largest_component", True, "_lcc"))
METRIC_COLUMNS = ("dice", "iou", "hd95", "hd95_seed", "surface_dice", "pred_pixels", "gt_pixels")


def masks_of(maps, images, options=MaskOptions()):
    """{"otsu": masks, "largest_component": masks} of one variant's maps (an all-zero map gives an empty mask)."""
    return {key: saliency_to_mask(maps, options=replace(options, keep_largest=keep or options.keep_largest),
                                  images=images)
            for key, keep, _ in MASK_KINDS}


def separability(maps, images, options):
    """Per-image label-free map separability (see `postprocess.otsu_separability`)."""
    region = foreground_mask(images) if options.foreground_only else None
    return otsu_separability(maps, region, options.smooth_sigma, options.positive_part)


def variant_summary(maps, gts, images, options=MaskOptions()):
    """Scores of one variant's in-memory maps without writing anything (for choosing settings on the
    training split): {"otsu", "largest_component", "map_separability"}."""
    masks = masks_of(maps, images, options)
    scores = {key: summarize(evaluate_masks(masks[key], gts)) for key, _, _ in MASK_KINDS}
    per_image = separability(maps, images, options)
    scores["map_separability"], scores["map_separability_std"] = float(np.mean(per_image)), float(np.std(per_image))
    return scores


def clean_json(obj):
    """JSON-ready: numpy scalars to Python, NaN and infinities to null."""
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path, obj):
    with open(path, "w") as f:
        f.write(json.dumps(clean_json(obj), indent=2, sort_keys=True) + "\n")


def write_csv(path, rows, fields):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with open(path, "w") as f:
        f.write(buffer.getvalue())


class StreamingNpz:
    """An .npz holding `maps` (N, H, W) float32, written batch by batch, and `names`, added on close:
    `np.load` reads it like `np.savez_compressed`'s."""

    def __init__(self, path, shape):
        self.shape, self.rows = tuple(int(s) for s in shape), 0
        self.zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True)
        self.member = self.zip.open("maps.npy", "w", force_zip64=True)
        np.lib.format.write_array_header_2_0(
            self.member, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                          "shape": self.shape})

    def write(self, maps):
        maps = np.ascontiguousarray(maps, dtype=np.float32)
        self.member.write(maps.tobytes())
        self.rows += len(maps)

    def close(self, names):
        if self.rows != self.shape[0]:
            raise RuntimeError(f"saliency.npz: {self.rows} maps written, {self.shape[0]} announced")
        self.member.close()
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(names))
        self.zip.writestr("names.npy", buffer.getvalue())
        self.zip.close()


def save_mask_png(path, mask):
    from PIL import Image

    Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255).save(path, format="PNG")


def write_grid(path, images, gts, maps, preds, names, dices, has_mask=None):
    """image | ground truth | map | prediction, one row per image."""
    from matplotlib.figure import Figure

    count = len(images)
    has_mask = np.ones(count, bool) if has_mask is None else has_mask
    fig = Figure(figsize=(8, 2.1 * count), dpi=100)
    titles = ("image", "ground truth", "saliency map", "prediction (green: truth)")
    normalised = normalize_map(maps)
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
            elif col == 1 and not has_mask[row]:
                ax.set_title(header + "no mask", fontsize=7)
            elif col == 3:
                if has_mask[row]:
                    ax.contour(gts[row].astype(float), levels=[0.5], colors="lime", linewidths=0.8)
                dice = dices[row]
                ax.set_title(header + (f"Dice {dice:.2f}" if math.isfinite(dice) else "Dice n/a"), fontsize=7)
            else:
                ax.set_title(header, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")


class VariantWriter:
    """The files of one variant in `folder`, batch by batch."""

    def __init__(self, folder, n_images, shape, options, grid_images):
        self.folder, self.options, self.grid_images = folder, options, grid_images
        for _, _, suffix in MASK_KINDS:
            os.makedirs(os.path.join(folder, "masks" + suffix), exist_ok=True)
        self.fields = ["name", "label", "has_mask", "segmented", "tumour_probability", *METRIC_COLUMNS,
                       *[f"{c}_lcc" for c in METRIC_COLUMNS if c != "gt_pixels"]]
        self.csv_file = open(os.path.join(folder, "metrics.csv"), "w", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=self.fields, lineterminator="\n", extrasaction="ignore")
        self.csv.writeheader()
        self.npz = StreamingNpz(os.path.join(folder, "saliency.npz"), (n_images, *shape))
        self.records = {key: [] for key, _, _ in MASK_KINDS}  # of the scored slices
        self.scored_labels, self.separability, self.names = [], [], []
        self.by_subject, self.worst = {}, None  # grid candidates: each subject's largest lesion, the lowest Dice

    def _offer_to_grid(self, entry):
        """Keep, per subject, its slice with the largest reference lesion (or its first slice), and the scored
        slice of lowest Dice: the grid shows several subjects and a failure, not the first slices read."""
        subject = os.path.splitext(os.path.basename(entry[4]))[0].rsplit("_z", 1)[0]
        kept = self.by_subject.get(subject)
        if kept is None or entry[1].sum() > kept[1].sum():
            self.by_subject[subject] = entry
        if entry[6] and entry[5] == entry[5] and (self.worst is None or entry[5] < self.worst[5]):
            self.worst = entry

    @property
    def grid(self):
        """The grid's rows: evenly spaced subjects, then the lowest-Dice slice (when it is not among them)."""
        subjects = list(self.by_subject.values())
        room = self.grid_images - (self.worst is not None)
        chosen = ([subjects[k] for k in np.linspace(0, len(subjects) - 1, room).round().astype(int)]
                  if len(subjects) > room else subjects)
        chosen = list({entry[4]: entry for entry in chosen}.values())
        if self.worst is not None and self.worst[4] not in {entry[4] for entry in chosen}:
            chosen.append(self.worst)
        return chosen[:self.grid_images]

    def add(self, result, maps):
        batch = result.batch
        images = batch.images.numpy()
        masks = masks_of(maps, images, self.options)
        scored = np.flatnonzero(batch.has_mask)
        records = {key: iter(evaluate_masks(masks[key][scored], batch.masks[scored])) for key, _, _ in MASK_KINDS}
        if result.segmented.any():
            self.separability.extend(separability(maps[result.segmented], images[result.segmented], self.options))
        for i, name in enumerate(batch.names):
            stem = os.path.splitext(os.path.basename(name))[0]
            for key, _, suffix in MASK_KINDS:
                save_mask_png(os.path.join(self.folder, "masks" + suffix, stem + ".png"), masks[key][i])
            row = {"name": name, "label": int(batch.labels[i]), "has_mask": bool(batch.has_mask[i]),
                   "segmented": bool(result.segmented[i]),
                   "tumour_probability": "" if result.tumour_probability is None else
                   f"{result.tumour_probability[i]:.6g}"}
            if batch.has_mask[i]:
                for key, _, suffix in MASK_KINDS:
                    record = next(records[key])
                    self.records[key].append(record)
                    row.update({c + suffix: record[c] for c in METRIC_COLUMNS if not (suffix and c == "gt_pixels")})
                self.scored_labels.append(int(batch.labels[i]))
            self.csv.writerow(row)
            if self.grid_images:
                dice = row.get("dice", float("nan"))
                self._offer_to_grid((images[i], batch.masks[i], maps[i], masks["otsu"][i], name,
                                     float(dice) if dice != "" else float("nan"), bool(batch.has_mask[i])))
        self.npz.write(maps)
        self.names.extend(batch.names)

    def finish(self):
        """Close the files, draw the grid; returns the variant's scores."""
        self.csv_file.close()
        self.npz.close(self.names)
        grid = self.grid if self.grid_images else []
        if grid:
            images, gts, maps, preds, names, dices, has_mask = (np.stack(c) if k < 4 else list(c)
                                                                for k, c in enumerate(zip(*grid)))
            write_grid(os.path.join(self.folder, "grid.png"), images, gts, maps, preds, names, dices,
                       np.array(has_mask))
        labels = np.array(self.scored_labels)
        tumour = labels != 0
        scores = {key: summarize([r for r, t in zip(records, tumour) if t]) for key, records in self.records.items()}
        scores["map_separability"] = float(np.mean(self.separability)) if self.separability else float("nan")
        if (labels == 0).any():
            scores["all_slices"] = {key: summarize(records) for key, records in self.records.items()}
        return scores


class SliceReport:
    """All outputs of a run, from the pipeline's results in order (see the module docstring).

    Use as a context manager around the run: the temporary folder replaces `out_dir` only when
    `finish` was called and the block ended without an error.
    """

    def __init__(self, out_dir, *, variants, n_images, shape, options=MaskOptions(), grid_images=8):
        self.out_dir, self.variants, self.n_images = out_dir, list(variants), n_images
        self.shape, self.options, self.grid_images = tuple(shape), options, grid_images
        self.n_scored = self.n_segmented = 0
        self.probabilities, self.labels, self.segmented = [], [], []

    def __enter__(self):
        self._atomic = atomic_directory(self.out_dir)
        self.tmp = self._atomic.__enter__()
        several = len(self.variants) > 1
        self.folders = {v: os.path.join(self.tmp, v) if several else self.tmp for v in self.variants}
        self.writers = {v: VariantWriter(self.folders[v], self.n_images, self.shape, self.options, self.grid_images)
                        for v in self.variants}
        return self

    def __exit__(self, *exc):
        for writer in self.writers.values():
            writer.csv_file.close()
        return self._atomic.__exit__(*exc)

    def add(self, result):
        for variant, writer in self.writers.items():
            writer.add(result, result.maps[variant])
        self.n_scored += int(result.batch.has_mask.sum())
        self.n_segmented += int(result.segmented.sum())
        if result.tumour_probability is not None:
            self.probabilities.extend(result.tumour_probability)
            self.labels.extend(result.batch.labels)
            self.segmented.extend(result.segmented)

    def finish(self, *, method, settings, seconds, variant_settings=None, threshold=None, volumes_from=None):
        """Close every file, paste volumes (`volumes_from`: (src_dir, split, raw_dir)), write summary.json;
        returns the summary."""
        variant_settings = variant_settings or {}
        summary = {"method": method, "settings": settings, "n_images": self.n_images, "n_scored": self.n_scored,
                   "n_segmented": self.n_segmented, "seconds_per_image": seconds / max(self.n_images, 1),
                   "mask_options": self.options.as_dict(), "variants": {}}
        if threshold is not None:
            summary["detection"] = detection_scores(self.probabilities, self.labels, threshold, self.segmented)
        for variant, writer in self.writers.items():
            result = {"settings": variant_settings.get(variant, {}), **writer.finish()}
            if volumes_from is not None:
                result["volumes"] = write_volumes(self.folders[variant], writer.names, volumes_from)
            summary["variants"][variant] = result
        write_json(os.path.join(self.tmp, "summary.json"), summary)
        return summary


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


def write_volumes(folder, names, volumes_from):
    """Paste the masks written in `folder` back into each subject's source grid; writes volumes/ and
    volumes.csv (3-D Dice where the subject's label map is found) and returns the summary part."""
    from PIL import Image

    from ..volumes import paste_subject_masks

    src_dir, split, raw_dir = volumes_from

    def read_mask(name, suffix):
        stem = os.path.splitext(os.path.basename(name))[0]
        with Image.open(os.path.join(folder, "masks" + suffix, stem + ".png")) as image:
            return np.asarray(image) > 127

    kinds = {suffix: (lambda name, s=suffix: read_mask(name, s)) for _, _, suffix in MASK_KINDS}
    subjects = paste_subject_masks(src_dir, split, names, kinds, os.path.join(folder, "volumes"), raw_dir=raw_dir)
    write_csv(os.path.join(folder, "volumes.csv"), subjects, list(subjects[0]))
    result = {"n_subjects": len(subjects)}
    for _, _, suffix in MASK_KINDS:
        key = f"dice_3d{suffix}"
        values = [s[key] for s in subjects if s.get(key) is not None and math.isfinite(s[key])] or [np.nan]
        result.update({f"{key}_mean": float(np.mean(values)), f"{key}_std": float(np.std(values))})
    return result

