"""Whole-scan decisions side by side on scans with references (`scripts/compare_scan_decisions.py`).

Each scan is prepared once; for each choice of a selection.json (`mask_tuned`, `label_free`) its
evidence (every kept slice's map and tumour probability) is computed once, and every decision is
applied to the same evidence: the slice gate (the choice's detection threshold and map check) and
the choice's 3-D rule. Masks are pasted back into the scan's own grid and scored there, so the table
holds what `segment_scans.py` would write.

Per decision: tumour-slice Dice (the paper's protocol: slices whose reference holds lesion), whole-
volume Dice (mean and min over scans with a tumour), BraTS 2023 lesion-wise Dice, scans whose tumour
was missed (no reference lesion touched), the volume marked on healthy scans (% of brain voxels, mean
and max) and seconds per scan (evidence and decision).
"""

import time

import nibabel as nib
import numpy as np

from ..lesion_metrics import lesion_wise_scores
from ..metrics import dice_3d, evaluate_masks
from .scan_decision import decide
from .scan_study import scan_evidence
from .scans import paste_masks, prepare_scan


def compare_decisions(scans, preprocessing, choices, *, batch_size=64, log=print):
    """Per-scan rows for every (choice, decision).

    choices: {choice: (pipeline, mask options, {decision name: ScanDecision})}, pipelines computing every
    slice (`scan_study.every_slice_pipeline`). Each scan needs a reference.
    """
    rows = []
    for scan in scans:
        prepared = prepare_scan(scan, preprocessing, preprocessing.lesion_labels)
        if prepared.reference is None:
            raise ValueError(f"{scan.name}: no reference segmentation to score against")
        image = nib.load(scan.channels[0])
        spacing = tuple(float(v) for v in image.header.get_zooms()[:3])
        brain_voxels = int(np.count_nonzero(np.asarray(image.dataobj)))
        reference = prepared.reference.astype(bool)
        tumour_slices = prepared.labels == 1
        by_pipeline = {}  # choices at one operating point share its evidence
        for choice, (pipeline, options, decisions) in choices.items():
            if id(pipeline) not in by_pipeline:
                began = time.perf_counter()
                by_pipeline[id(pipeline)] = (scan_evidence(pipeline, prepared, batch_size), time.perf_counter() - began)
            evidence, evidence_seconds = by_pipeline[id(pipeline)]
            for name, decision in decisions.items():
                began = time.perf_counter()
                masks, _ = decide(evidence, decision, options)
                prediction = paste_masks(prepared, masks)
                seconds = evidence_seconds + time.perf_counter() - began
                records = evaluate_masks(masks[tumour_slices], prepared.masks[tumour_slices]) if tumour_slices.any() else []
                lesions = lesion_wise_scores(prediction, reference, spacing)
                rows.append({"scan": scan.name, "choice": choice, "decision": name, "tumour": bool(reference.any()),
                             "reference_voxels": int(reference.sum()), "predicted_voxels": int(prediction.sum()),
                             "dice_3d": dice_3d(prediction, reference) if reference.any() else float("nan"),
                             "lesion_dice": lesions["dice"],
                             "missed": bool(reference.any() and not (prediction & reference).any()),
                             "marked_percent": 100.0 * prediction.sum() / max(brain_voxels, 1),
                             "tumour_slice_dice": [r["dice"] for r in records], "seconds": seconds})
        log(f"{scan.name}: " + ", ".join(f"{r['choice']}/{r['decision']} {r['dice_3d']:.3f}" for r in rows
                                         if r["scan"] == scan.name and r["tumour"]))
    return rows


def summarise_comparison(rows):
    """One line per (choice, decision), in the rows' order."""
    lines = []
    for key in dict.fromkeys((r["choice"], r["decision"]) for r in rows):
        part = [r for r in rows if (r["choice"], r["decision"]) == key]
        tumour = [r for r in part if r["tumour"]]
        healthy = [r for r in part if not r["tumour"]]
        slice_dice = [d for r in tumour for d in r["tumour_slice_dice"] if d == d]
        lines.append({"choice": key[0], "decision": key[1], "n_scans": len(part), "n_tumour": len(tumour),
                      "n_healthy": len(healthy),
                      "tumour_slice_dice": float(np.mean(slice_dice)) if slice_dice else float("nan"),
                      "dice_3d_mean": _mean([r["dice_3d"] for r in tumour]),
                      "dice_3d_min": float(min(r["dice_3d"] for r in tumour)) if tumour else float("nan"),
                      "lesion_dice_mean": _mean([r["lesion_dice"] for r in part]),
                      "missed": sum(r["missed"] for r in tumour),
                      "healthy_marked_percent_mean": _mean([r["marked_percent"] for r in healthy]),
                      "healthy_marked_percent_max": float(max(r["marked_percent"] for r in healthy)) if healthy
                      else float("nan"),
                      "seconds_per_scan": _mean([r["seconds"] for r in part])})
    return lines


def _mean(values):
    return float(np.mean(values)) if len(values) else float("nan")


def format_comparison(lines, title):
    """A Markdown table of `summarise_comparison` lines."""
    def number(value, digits=3):
        return "n/a" if value != value else f"{value:.{digits}f}"

    text = [title, "",
            "| settings | decision | tumour-slice Dice | whole-volume Dice mean (min) | lesion-wise Dice | tumours "
            "missed | healthy scans: % of brain marked, mean (max) | s per scan |",
            "|---|---|---|---|---|---|---|---|"]
    for line in lines:
        text.append(f"| {line['choice']} | {line['decision']} | {number(line['tumour_slice_dice'])} | "
                    f"{number(line['dice_3d_mean'])} ({number(line['dice_3d_min'])}) | "
                    f"{number(line['lesion_dice_mean'])} | {line['missed']} of {line['n_tumour']} | "
                    f"{number(line['healthy_marked_percent_mean'], 2)} ({number(line['healthy_marked_percent_max'], 2)})"
                    f" of {line['n_healthy']} | {number(line['seconds_per_scan'], 1)} |")
    return "\n".join(text) + "\n"
