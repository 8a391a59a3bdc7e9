"""The command lines of `scripts/ablation.py` and `scripts/demo_results.py`.

ablation.py: the paper's Fig. 3 on a fixed subset of training tumour slices (every point on the
same noise draw) and the settings chosen there, with masks (`mask_tuned`) and without
(`label_free`): writes ablation.json, ablation.png and selection.json.

demo_results.py: every method on the validation split with those settings, beside the paper's
Table 1: writes results.md and one image_p_seg output folder per row.
"""

import argparse
import json
import os

from .. import dist_util
from ..cli import UserError, atomic_write_text, require_dir
from .config import OperatingPoint
from .label_free import add_stability
from .pipeline import SliceBatches, load_slice_set, select_slices
from .results import DEFAULT_ROWS, format_table, row_specs, run_rows
from .study import (COST_TOLERANCE, StudyGrid, best_point, choose_detection, choose_label_free_postprocessing,
                    choose_postprocessing, load_models,
                    noise_draw_sweep, run_ablation, save_study, selection)


def _models_paths(models_dir, names=("ddpm", "classifier", "resnet18")):
    paths = {name: os.path.join(models_dir, name, "model.pt") for name in names}
    for path in paths.values():
        if not os.path.isfile(path):
            raise UserError(f"--models {models_dir}: {path} is missing (scripts/train_demo.py makes it)")
    return paths


def _read_rows(path):
    try:
        with open(path) as f:
            rows = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"--reuse_rows {path}: cannot be read ({err})") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and "dice" in r for r in rows):
        raise UserError(f"--reuse_rows {path}: not the ablation.json of scripts/ablation.py")
    return rows


def _numbers(text):
    values = tuple(float(v) for v in text.split(",") if v.strip())
    if not values:
        raise ValueError("empty list")
    return values


def ablation_main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], allow_abbrev=False)
    parser.add_argument("--models", default="runs/demo",
                        help="folder with ddpm/ and classifier/ model.pt, used where --model_path or "
                             "--classifier_path is not given (default: %(default)s)")
    parser.add_argument("--model_path", default="", help="DDPM checkpoint with its args.json (default: <models>/ddpm/model.pt)")
    parser.add_argument("--classifier_path", default="",
                        help="noise-conditioned classifier checkpoint with its args.json; it guides CG-CDM and "
                             "detects lesions at t = 0 (default: <models>/classifier/model.pt)")
    parser.add_argument("--src_dir", default="data/demo/slices", help="slice dataset (default: %(default)s)")
    parser.add_argument("--split", default="training", help="split the settings are chosen on (default: %(default)s)")
    parser.add_argument("--max_images", type=int, default=32,
                        help="tumour slices of the split, evenly spaced, every point measured on (default: %(default)s)")
    parser.add_argument("--detect_images", type=int, default=512,
                        help="slices of the split (normal and tumour, evenly spaced) the detection threshold is "
                             "chosen on, from their image labels (0: no detection threshold) (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per batch (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise draws (default: %(default)s)")
    parser.add_argument("--out_dir", default="runs/demo_study", help="where the study goes (default: %(default)s)")
    parser.add_argument("--max_steps", type=int, default=10,
                        help="the chosen settings use at most this many DDIM steps R: a time budget, since "
                             "segmentation time grows linearly with R (0: no cap) (default: %(default)s)")
    parser.add_argument("--reuse_rows", default="",
                        help="ablation.json of an earlier run with the same models, data and --max_images: its "
                             "rows are taken instead of measuring the sweeps again, and only the post-processing, "
                             "the detection threshold and the choices are made anew; rows measured without the "
                             "label-free criteria leave separability the only one (default: measure)")
    parser.add_argument("--scan_subjects", type=int, default=16,
                        help="training subjects (evenly spaced) whose whole raw scans choose the whole-scan decision "
                             "of segment_scans.py: the 3-D rule's thresholds against the slice gate, scored by "
                             "whole-volume Dice (mask_tuned) or by slice labels alone (label_free) (0: none) "
                             "(default: %(default)s)")
    parser.add_argument("--scan_extra_src_dirs", default="",
                        help="comma list of further prepared slice datasets whose every training scan also scores "
                             "the whole-scan decisions (harder data: small, multiple, edge tumours and healthy "
                             "subjects, e.g. make_demo_data.py --profile stress) (default: none)")
    parser.add_argument("--tolerance", default=COST_TOLERANCE,
                        help="the cheapest point (fewest passes, R x noise draws) within this much training "
                             "Dice of the best is chosen: a number (0: the best), or 'se', one standard error of "
                             "the best point's mean Dice on the subset (default: %(default)s)")
    grid = StudyGrid()
    for name, help_text in (("noise_levels", "noise levels Q of the R sweep, fractions of T"),
                            ("record_steps", "step counts R recorded in the R sweep (one run of the largest)"),
                            ("taus", "taus of the tau sweep"), ("scales", "classifier scales s of the s sweep"),
                            ("noise_draws", "noise draws K of the noise-draw sweep (0: none)"),
                            ("draw_steps", "step counts R of the noise-draw sweep")):
        parser.add_argument(f"--{name}", default=",".join(f"{v:g}" for v in getattr(grid, name)),
                            help=f"{help_text} (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        grid = StudyGrid(noise_levels=_numbers(args.noise_levels), record_steps=tuple(int(v) for v in _numbers(args.record_steps)),
                         taus=_numbers(args.taus), scales=_numbers(args.scales),
                         noise_draws=tuple(int(v) for v in _numbers(args.noise_draws) if v),
                         draw_steps=tuple(int(v) for v in _numbers(args.draw_steps)))
    except ValueError as err:
        raise UserError(f"--noise_levels, --record_steps, --taus, --scales, --noise_draws and --draw_steps take "
                        f"comma lists of numbers ({err})")
    if args.max_images < 1 or args.batch_size < 1 or args.detect_images < 0 or args.scan_subjects < 0:
        raise UserError("--max_images and --batch_size must be at least 1, --detect_images and --scan_subjects at "
                        "least 0")
    if args.tolerance != "se":
        try:
            args.tolerance = float(args.tolerance)
        except ValueError:
            args.tolerance = -1.0
        if not args.tolerance >= 0:
            raise UserError(f"--tolerance {args.tolerance}: must be 'se' or a number at least 0")
    require_dir(args.src_dir, "--src_dir")
    ddpm_path = args.model_path or _models_paths(args.models, ("ddpm",))["ddpm"]
    classifier_path = args.classifier_path or _models_paths(args.models, ("classifier",))["classifier"]
    device = dist_util.dev()
    models = load_models(ddpm_path, classifier_path, device)
    size, channels = models[0].image_size, models[0].in_channels
    try:
        slices = load_slice_set(args.src_dir, args.split, image_size=size, in_channels=channels,
                                max_images=args.max_images)
    except ValueError as err:
        raise UserError(f"--src_dir {err}")
    max_steps = args.max_steps or None
    if args.reuse_rows:
        rows = _read_rows(args.reuse_rows)
    else:
        masks = {}  # each point's Otsu masks, for the label-free criterion `stability`
        rows = run_ablation(models, slices, grid, batch_size=args.batch_size, seed=args.seed, criteria=True,
                            masks=masks)
        rows += noise_draw_sweep(models, slices, best_point(rows, "dice", "cg-cdm", max_steps), grid,
                                 batch_size=args.batch_size, seed=args.seed, criteria=True, masks=masks)
        add_stability(rows, masks)
    point = OperatingPoint.from_dict(best_point(rows, "dice", "cg-cdm", max_steps, args.tolerance))
    options, option_rows = choose_postprocessing(models, slices, point, batch_size=args.batch_size, seed=args.seed)
    detection = None
    if args.detect_images:
        every = select_slices(args.src_dir, args.split, image_size=size, in_channels=channels, slices="all",
                              max_images=args.detect_images)
        detection = choose_detection(models, SliceBatches(every, args.batch_size), device, point, options,
                                     seed=args.seed)
    chosen = selection(rows, options, option_rows, len(slices), max_steps, args.tolerance, detection)
    label_free_options, label_free_rows, rho = choose_label_free_postprocessing(
        models, slices, OperatingPoint.from_dict(chosen["label_free"]), batch_size=args.batch_size, seed=args.seed)
    chosen["label_free"]["postprocessing"] = label_free_options.as_dict()
    chosen["label_free_postprocessing"] = {"criterion": "compact_agreement", "candidates": label_free_rows,
                                           "spearman_with_dice": rho if rho == rho else None}
    if args.scan_subjects:
        from .scan_study import add_scan_decisions

        extra = [d.strip() for d in args.scan_extra_src_dirs.split(",") if d.strip()]
        for folder in extra:
            require_dir(folder, "--scan_extra_src_dirs")
        add_scan_decisions(chosen, models, args.src_dir, args.split, device, max_subjects=args.scan_subjects,
                           extra_src_dirs=extra, batch_size=args.batch_size, seed=args.seed)
    chosen.update(model_path=os.path.abspath(ddpm_path), classifier_path=os.path.abspath(classifier_path),
                  src_dir=os.path.abspath(args.src_dir), split=args.split)
    candidates = chosen.get("scan_decisions", {}).pop("candidates", None)
    save_study(args.out_dir, rows, chosen)
    if candidates is not None:  # every candidate's training scores: a table beside the selection, not in it
        atomic_write_text(os.path.join(args.out_dir, "scan_decisions.json"), json.dumps(candidates, indent=1) + "\n")
    print(json.dumps({k: v for k, v in chosen.items() if k != "postprocessing_candidates"}, indent=1))
    print("label-free criteria, Spearman rho with training Dice across the CG-CDM points: "
          + ", ".join(f"{name} {'-' if rho is None else format(rho, '.3f')}"
                    for name, rho in chosen["label_free_criteria"].items())
          + f"; label_free uses {chosen['label_free']['criterion']}")
    print(f"wrote {args.out_dir}/ablation.json, ablation.png, selection.json"
          + (" and scan_decisions.json" if candidates is not None else ""))


def noise_range_main(argv=None):
    """The equal-compute comparison of DDPM training ranges (scripts/noise_range_study.py)."""
    parser = argparse.ArgumentParser(description="Compare DDPMs trained for the same steps on t < f T for several f: "
                                     "eps-MSE at t = Q on validation images and CG-CDM Dice on training slices.",
                                     allow_abbrev=False)
    parser.add_argument("--checkpoints", default="f=1:runs/demo_train/ddpm_noise1/model000300.pt,"
                        "f=0.25:runs/demo_train/ddpm/model000300.pt,f=0.1:runs/demo_train/ddpm_noise0.1/model000300.pt",
                        help="comma list of name:path (default: the 300-step runs of train_demo.py --noise_range_study)")
    parser.add_argument("--classifier_path", default="runs/demo/classifier/model.pt",
                        help="the guiding classifier for the Dice (default: %(default)s)")
    parser.add_argument("--src_dir", default="data/demo/slices", help="slice dataset (default: %(default)s)")
    parser.add_argument("--max_images", type=int, default=32, help="training tumour slices for the Dice (default: %(default)s)")
    parser.add_argument("--val_images", type=int, default=256, help="validation images for the eps-MSE (default: %(default)s)")
    parser.add_argument("--out", default="runs/demo_study/noise_range.md", help="Markdown table written (default: %(default)s)")
    args = parser.parse_args(argv)
    checkpoints = {}
    for item in args.checkpoints.split(","):
        name, _, path = item.partition(":")
        if not os.path.isfile(path):
            raise UserError(f"--checkpoints: {path or item} is no checkpoint file")
        checkpoints[name] = path
    require_dir(args.src_dir, "--src_dir")
    import torch

    from ..checkpoint_util import load_classifier
    from ..datasets import SliceDataset
    from .pipeline import evenly_spaced
    from .study import noise_range_rows

    classifier, config = load_classifier(args.classifier_path, device=dist_util.dev())
    val = SliceDataset(args.src_dir, "validation", image_size=config["image_size"], in_channels=config["in_channels"])
    items = [val[i] for i in evenly_spaced(list(range(len(val))), args.val_images)]
    train = load_slice_set(args.src_dir, "training", image_size=config["image_size"], in_channels=config["in_channels"],
                           max_images=args.max_images)
    rows = noise_range_rows(checkpoints, classifier, torch.stack([i["image"] for i in items]),
                            torch.stack([i["label"] for i in items]), train)
    taus = [k for k in rows[0] if k.startswith("dice_tau_")]
    lines = [f"Equal compute (same steps, batch and seed); eps-MSE at t = Q = 0.1 T on {len(items)} validation images; "
             f"CG-CDM Dice (Q 0.1 T, R 10, s 10) on {len(train)} training tumour slices.", "",
             "| run | trained on t < | eps-MSE at Q | " + " | ".join(f"Dice tau {k[9:]}" for k in taus) + " |",
             "|---" * (3 + len(taus)) + "|"]
    for row in rows:
        lines.append(f"| {row['run']} | {row['max_noise_level']:g} T | {row['eps_mse_at_q']:.4f} | "
                     + " | ".join(f"{row[k]:.3f}" for k in taus) + " |")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


def results_main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[2], allow_abbrev=False)
    parser.add_argument("--models", default="runs/demo", help="folder with ddpm/, classifier/, resnet18/ (default: %(default)s)")
    parser.add_argument("--selection", default="runs/demo_study/selection.json",
                        help="settings chosen on the training split by ablation.py (default: %(default)s)")
    parser.add_argument("--src_dir", default="data/demo/slices", help="slice dataset (default: %(default)s)")
    parser.add_argument("--out_dir", default="runs/demo_results", help="where every run and results.md go (default: %(default)s)")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                        help="rows of the table, in order; scorecam is available too (one ResNet pass per feature "
                             "channel, 512 per image) (default: %(default)s)")
    parser.add_argument("--max_images", type=int, default=0, help="validation tumour slices per row (0: all)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per batch (default: %(default)s)")
    parser.add_argument("--fast_stride", type=int, default=40,
                        help="chain steps per step of CG-Diff and the reconstruction baseline (40: 10 steps from "
                             "Q = 400) (default: %(default)s)")
    args = parser.parse_args(argv)
    paths = _models_paths(args.models)
    specs = row_specs(args.selection, paths["ddpm"], paths["classifier"], paths["resnet18"], args.fast_stride)
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = [k for k in keys if k not in specs]
    if unknown:
        raise UserError(f"--rows: unknown row {unknown[0]!r} (choose from {', '.join(specs)})")
    summaries = run_rows(keys, specs, src_dir=args.src_dir, out_dir=args.out_dir, batch_size=args.batch_size,
                         max_images=args.max_images)
    table = format_table(keys, specs, summaries, args.src_dir)
    atomic_write_text(os.path.join(args.out_dir, "results.md"), table)
    print(table)
