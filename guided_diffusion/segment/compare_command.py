"""`scripts/compare_scan_decisions.py`: the whole-scan decisions side by side on scans with references.

    python scripts/compare_scan_decisions.py --model_dir runs/demo --input data/stress/raw \\
        --subjects validation:data/stress/slices --out runs/stress_compare

For each choice of the model folder's selection.json (mask_tuned, label_free) and each decision (the
slice gate and the choice's 3-D rule), every scan is segmented as `segment_scans.py` would and scored
in its own grid (see `segment.scan_compare`). Writes comparison.md and comparison.json (per scan).
"""

import argparse
import json
import os

from .. import dist_util
from ..cli import UserError, atomic_directory, read_json
from ..model_folder import DDPM_WEIGHTS, CLASSIFIER_WEIGHTS, PREPROCESSING, SELECTION, read_model_card
from .report import clean_json
from .scan_compare import compare_decisions, format_comparison, summarise_comparison
from .scan_decision import ScanDecision
from .scan_study import point_pipelines
from .scans import dataset_preprocessing, find_scans, slice_stem, with_reference
from .settings_file import read_selection
from .study import load_models


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model_dir", required=True, help="model folder (scripts/export_model.py, e.g. runs/demo)")
    parser.add_argument("--settings", default="",
                        help="selection.json whose choices are compared (default: the model folder's)")
    parser.add_argument("--choices", default="mask_tuned,label_free",
                        help="comma list of the selection's choices to compare (default: %(default)s)")
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="NIfTI scans, BraTS subject folders or folders of either, each with a reference")
    parser.add_argument("--reference", default="",
                        help="reference segmentations: a file or a folder of <name>_seg.nii.gz (default: a subject "
                             "folder's own)")
    parser.add_argument("--subjects", default="",
                        help="SPLIT:SLICE_DATASET: only the subjects of that split of a prepared slice dataset (e.g. "
                             "validation:data/stress/slices, so that nothing tuned on is reported) (default: every "
                             "scan of --input)")
    parser.add_argument("--batch_size", type=int, default=64, help="slices per batch (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise draws (default: %(default)s)")
    parser.add_argument("--title", default="", help="the table's heading line (default: the inputs)")
    parser.add_argument("--out", default="runs/compare_scan_decisions",
                        help="output folder: comparison.md, comparison.json (default: %(default)s)")
    return parser


def _split_subjects(text):
    split, _, root = text.partition(":")
    path = os.path.join(root, "dataset.json")
    if not split or not os.path.isfile(path):
        raise UserError(f"--subjects {text}: expected SPLIT:SLICE_DATASET with SLICE_DATASET/dataset.json")
    subjects = read_json(path, "--subjects").get("subjects", {}).get(split)
    if not subjects:
        raise UserError(f"--subjects {text}: {path} lists no subject of the {split} split")
    return set(subjects)


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be at least 1")
    folder = args.model_dir
    read_model_card(folder)
    selection = read_selection(args.settings or os.path.join(folder, SELECTION))
    preprocessing_path = os.path.join(folder, PREPROCESSING)
    options, modalities = dataset_preprocessing(read_json(preprocessing_path, "--model_dir"), preprocessing_path)
    device = dist_util.dev()
    models = load_models(os.path.join(folder, DDPM_WEIGHTS), os.path.join(folder, CLASSIFIER_WEIGHTS), device)
    scans = with_reference(find_scans(args.input, modalities), args.reference)
    if args.subjects:
        keep = _split_subjects(args.subjects)
        scans = [s for s in scans if slice_stem(s) in keep]  # the subject, however the scan was given
    missing = [s.name for s in scans if not s.reference]
    if not scans or missing:
        raise UserError(f"--input: {'no scan' if not scans else missing[0] + ' has no reference'} to compare on")
    detection = selection.get("detection") or {}
    points = {}
    for name in [c.strip() for c in args.choices.split(",") if c.strip()]:
        points[name] = selection.get(name)
        if not isinstance(points[name], dict) or "noise_level" not in points[name]:
            raise UserError(f"--choices {name}: not a choice of the selection")
    pipelines = point_pipelines(models, points, device, seed=args.seed)
    choices = {}
    for name, point in points.items():
        decisions = {"slices": ScanDecision(rule="slices", threshold=float(detection.get("threshold", 0.5)),
                                            min_separability=float(detection.get("min_separability") or 0.0))}
        if point.get("scan_decision"):
            decisions["volume"] = ScanDecision.from_dict(point["scan_decision"])
        choices[name] = (*pipelines[name], decisions)
    rows = compare_decisions(scans, options, choices, batch_size=args.batch_size)
    lines = summarise_comparison(rows)
    title = args.title or f"Whole-scan decisions on {len(scans)} scans ({', '.join(args.input)})"
    with atomic_directory(args.out) as out:
        with open(os.path.join(out, "comparison.md"), "w") as f:
            f.write(format_comparison(lines, title))
        with open(os.path.join(out, "comparison.json"), "w") as f:
            json.dump(clean_json({"summary": lines, "scans": rows}), f, indent=1)
            f.write("\n")
    print(format_comparison(lines, title))
    print(f"wrote {args.out}/comparison.md and comparison.json")
