"""The results table: every method on the same validation slices, beside the paper's Table 1.

Each row is one `image_p_seg` run (`command.main`) with the settings chosen on the training split
(`study`, selection.json); its outputs stay in `<out_dir>/<row>/`. Every row uses the same
map-to-mask rule (the one chosen on the training split), except the rows that say otherwise.
"""

import json
import math
import os

from .command import main as segment_main
from .config import OperatingPoint, as_flags
from .postprocess import MaskOptions
from .settings_file import config_of, read_selection

# Table 1 of the paper (BraTS): Dice, mIoU, HD95, seconds per image (hardware not stated).
PAPER_TABLE1 = {
    "gradcam": (0.235, 0.149, 44.4, 3.79), "gradcam++": (0.281, 0.187, 32.6, 3.59),
    "scorecam": (0.303, 0.202, 32.7, 27.0), "layercam": (0.276, 0.184, 30.4, 4.07),
    "cg-diff": (0.456, 0.325, 43.4, 116.0), "cdm": (0.525, 0.407, 26.0, 1.61), "cg-cdm": (0.563, 0.450, 19.2, 2.78),
}
DEFAULT_ROWS = ("cg-cdm", "cg-cdm-default-mask", "cg-cdm-label-free", "cg-cdm-paper", "cdm", "cg-diff", "anomaly",
                "cam", "gradcam", "gradcam++", "layercam")


def row_specs(selection_path, ddpm, classifier, cam_classifier, fast_stride=40, flag="--selection"):
    """{row key: (label, paper key or None, image_p_seg.py flags)}.

    The rows at a chosen point read it from the selection file itself (`--settings`, `--choice`), as a
    user's run does, so they segment exactly as image_p_seg.py and segment_scans.py do with that file;
    every other row takes the post-processing chosen for `mask_tuned`."""
    selection = read_selection(selection_path, flag)
    tuned, free, cdm = (config_of(selection, name, selection_path, flag)
                        for name in ("mask_tuned", "label_free", "mask_tuned_cdm"))
    diffusion = ["--model_path", ddpm, "--classifier_path", classifier]
    mask = as_flags(tuned.postprocessing.as_dict())
    def chosen(name):
        return ["--settings", selection_path, "--choice", name]

    paper = OperatingPoint()
    specs = {
        "cg-cdm": (f"CG-CDM, chosen on training masks ({tuned.point.describe()})", "cg-cdm",
                   ["--method", "cg-cdm", *diffusion, *chosen("mask_tuned")]),
        "cg-cdm-default-mask": ("CG-CDM, same settings, paper's min-max + Otsu", "cg-cdm",
                                ["--method", "cg-cdm", *diffusion, *chosen("mask_tuned"),
                                 *as_flags(MaskOptions().as_dict())]),
        "cg-cdm-label-free": (f"CG-CDM, chosen without masks ({free.point.describe()})", "cg-cdm",
                              ["--method", "cg-cdm", *diffusion, *chosen("label_free")]),
        "cg-cdm-paper": (f"CG-CDM, the paper's settings ({paper.describe()})", "cg-cdm",
                         ["--method", "cg-cdm", *diffusion, *as_flags(paper.as_dict()), *mask]),
        "cdm": (f"CDM, chosen on training masks ({cdm.point.describe()})", "cdm",
                ["--method", "cdm", "--model_path", ddpm, *chosen("mask_tuned_cdm")]),
        "cg-diff": ("CG-Diff (original ancestral variant, Q 0.1 T, 10 steps)", "cg-diff",
                    ["--method", "cg-diff", *diffusion, "--stride", str(fast_stride), *mask]),
        "anomaly": ("Reconstruction baseline (L 0.1 T, 10 + 10 DDIM steps)", None,
                    ["--method", "anomaly", *diffusion, "--stride", str(fast_stride), *mask]),
    }
    for cam in ("cam", "gradcam", "gradcam++", "layercam", "scorecam"):
        specs[cam] = (f"{cam} (ResNet-18, 8 x 8 features)", cam if cam in PAPER_TABLE1 else None,
                      ["--method", cam, "--classifier_path", cam_classifier, *mask])
    return specs


def run_rows(keys, specs, *, src_dir, out_dir, batch_size=32, max_images=0, log=print):
    """Run each row; returns {key: summary.json of its run}."""
    summaries = {}
    for key in keys:
        label, _, flags = specs[key]
        folder = os.path.join(out_dir, key)
        argv = [*flags, "--src_dir", src_dir, "--batch_size", str(batch_size), "--max_images", str(max_images),
                "--grid_images", "8", "--out_dir", folder]
        log("+ image_p_seg.py " + " ".join(argv))
        segment_main(argv)
        with open(os.path.join(folder, "summary.json")) as f:
            summaries[key] = json.load(f)
    return summaries


def _fmt(mean, std=None, digits=3):
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def format_table(keys, specs, summaries, src_dir):
    """The Markdown table: ours (Dice, IoU, HD95 both conventions, Dice after LCC, s/image) and the paper's."""
    first = next(iter(summaries.values()))
    lines = [f"{first['n_images']} validation tumour slices of {src_dir}; per-image metrics, mean ± std; HD95 in "
             f"pixels (boundary to boundary), HD95 seed = the original code's region-to-region convention, which "
             f"Table 1 used; paper = BraTS, Table 1.", "",
             "| method | Dice | IoU | HD95 | HD95 seed | Dice (LCC) | s / image | paper Dice | paper HD95 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        label, paper_key, _ = specs[key]
        (variant,) = summaries[key]["variants"].values()
        otsu, lcc = variant["otsu"], variant["largest_component"]
        paper = PAPER_TABLE1.get(paper_key) if paper_key else None
        lines.append(
            f"| {label} | {_fmt(otsu['dice_mean'], otsu['dice_std'])} | {_fmt(otsu['iou_mean'], otsu['iou_std'])} "
            f"| {_fmt(otsu['hd95_mean'], otsu['hd95_std'], 1)} | {_fmt(otsu.get('hd95_seed_mean'), otsu.get('hd95_seed_std'), 1)} "
            f"| {_fmt(lcc['dice_mean'], lcc['dice_std'])} | {summaries[key]['seconds_per_image']:.3f} "
            f"| {_fmt(paper[0]) if paper else '-'} | {_fmt(paper[2], digits=1) if paper else '-'} |")
    return "\n".join(lines) + "\n"
