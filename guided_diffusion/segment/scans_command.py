"""`scripts/segment_scans.py`: segment whole scans nobody has outlined; masks in each scan's own grid.

    python scripts/segment_scans.py --input patient_flair.nii.gz --model_path runs/demo/ddpm/model.pt \\
        --classifier_path runs/demo/classifier/model.pt --method cg-cdm --settings runs/demo/selection.json \\
        --out_dir runs/my_scans

    python scripts/segment_scans.py --input patient_flair.nii.gz --model_dir runs/demo --out_dir runs/my_scans

Inputs are NIfTI files, BraTS-style subject folders (the channels by --modality, default the
dataset's) or folders of either. Each scan is prepared exactly as the training data were (from the
prepared dataset's dataset.json: --dataset_json, or a model folder's preprocessing.json, or the one
of the DDPM's training data found through its args.json), its slices detected and segmented by the
pipeline of image_p_seg.py with its method flags, and written to --out_dir (see `segment.scans`);
the folder replaces an earlier one only when every scan is done. A reference segmentation (a
subject folder's *_seg file, or --reference) is used only for metrics.csv, never by the method.
Under torchrun / mpiexec every scan's batches are shared between the processes; rank 0 writes.
"""

import contextlib
import csv
import os
import sys
import time
from dataclasses import replace

from .. import dist_util
from ..checkpoint_util import read_args_json
from ..cli import ArgumentParser, UserError, add_flags, atomic_directory, explicit_flags
from ..layouts import REGIONS
from ..cli import read_json
from ..model_folder import preprocessing_beside
from ..run_lock import folder_lock
from ..volumes import parse_modalities
from .command import HELP, add_model_flags, check_flags, segmentation_defaults
from .run import prepare_run
from .report import clean_json, write_json
from .scan_checks import expectations
from .scan_decision import DECISION_RULES, ScanDecision
from .scan_study import every_slice_pipeline, scan_evidence
from .scans import ScanWriter, dataset_preprocessing, find_scans, prepare_scan, summarise_scans, with_reference

SLICE_FOLDER_FLAGS = ("src_dir", "split", "fold", "num_folds", "fold_size", "max_images", "slices", "volumes",
                      "raw_dir", "grid_images", "save_dir", "out_dir")
SCAN_HELP = {
    "out_dir": "output folder: per scan <name>_pred.nii.gz, <name>_map.nii.gz, <name>_overview.png; metrics.csv "
               "and summary.json (replaced when the run completes)",
    "dataset_json": "dataset.json (or its folder) of the prepared slice dataset the models were trained on: how a "
                    "scan is preprocessed (default: --model_dir's preprocessing.json, else the one in the DDPM's "
                    "training --src_dir, from its args.json, else the preprocessing.json of the model folder the "
                    "DDPM is in)",
    "modality": "BraTS modalities of a subject folder, in the models' channel order: flair, t1, t1ce, t2 (or t2f, "
                "t1n, t1c, t2w), 'all' or a comma list; must be the dataset's when it records them (default: the "
                "dataset's)",
    "region": "the reference's lesion for metrics: wt (whole tumour), tc (tumour core) or et (enhancing tumour), "
              "by the label scheme of the reference's layout (default: the region the training data used, from "
              "dataset.json; for datasets that record none, its raw lesion labels)",
    "reference": "reference segmentation for metrics only: a NIfTI file (one scan) or a folder of "
                 "<name>_seg.nii.gz (default: a subject folder's *_seg.nii.gz)",
    "overview_slices": "slices shown in each <name>_overview.png (those with the most predicted lesion)",
    "detect_threshold": "--scan_rule slices: slices whose tumour probability (classifier at t = 0) is at least "
                        "this are segmented, the others get an empty mask; 0 segments every slice (default: the "
                        "threshold of --settings, chosen on the training split, else 0.5)",
    "min_separability": "--scan_rule slices: a detected slice is segmented only when its map's Otsu separability "
                        "is at least this (0: no check) (default: the minimum of --settings, else 0)",
    "scan_rule": "how a scan's lesion voxels are decided: volume (the scan as one object: confident slices seed a "
                 "lesion that grows along z into less confident neighbours, stricter at the brain's ends, 3-D "
                 "components that no seed reaches or too small dropped; thresholds from --settings) or slices "
                 "(each slice behind the detection threshold) (default: the rule of --settings, chosen on the "
                 "training scans, else volume with untuned thresholds)",
}


def create_argparser():
    parser = ArgumentParser(description="Segment whole NIfTI scans with CDM / CG-CDM: masks in each scan's own "
                                        "voxel grid.", allow_abbrev=False)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="NIfTI scans (.nii, .nii.gz; a Decathlon 4-D image holds every channel), BraTS subject "
                             "folders (2020/2021 or 2023+ names), or folders of either")
    defaults = {k: v for k, v in segmentation_defaults().items() if k not in SLICE_FOLDER_FLAGS}
    defaults.update(out_dir="runs/segment_scans", dataset_json="", modality="", region="", reference="",
                    overview_slices=6, scan_rule="")
    add_flags(parser, defaults, help={**HELP, **SCAN_HELP})
    return add_model_flags(parser)


def _settings_path(path):
    return os.path.join(path, "dataset.json") if os.path.isdir(path) else path


def find_dataset_settings(args):
    """(path, SliceOptions, modalities, its JSON dict) of the dataset.json that says how scans are preprocessed (see
    --dataset_json)."""
    recorded = None
    if getattr(args, "model_dir", ""):  # the folder carries its preprocessing: nothing looked up elsewhere
        recorded = preprocessing_beside(os.path.join(args.model_dir, "ddpm", "model.pt"))
    else:
        src_dir = read_args_json(args.model_path).get("src_dir") if args.model_path else None
        if src_dir:
            for base in ("", os.path.dirname(os.path.abspath(args.model_path))):
                candidate = os.path.join(base, src_dir, "dataset.json")
                if os.path.isfile(candidate):
                    recorded = candidate
                    break
        if recorded is None and args.model_path:  # a model folder's DDPM, the training data elsewhere
            recorded = preprocessing_beside(args.model_path)
    path = _settings_path(args.dataset_json) if args.dataset_json else recorded
    if not path:
        raise UserError("--dataset_json is required: the DDPM's args.json names no training --src_dir with a "
                        "dataset.json, and it is in no model folder with a preprocessing.json (--model_dir)")
    if not os.path.isfile(path):
        raise UserError(f"--dataset_json {args.dataset_json}: no such file")
    settings = read_json(path, "--dataset_json")
    options, modalities = dataset_preprocessing(settings, path)
    if recorded and os.path.abspath(recorded) != os.path.abspath(path):
        trained = dataset_preprocessing(read_json(recorded, "--dataset_json"), recorded)[0]
        differing = [k for k in ("intensity", "crop", "image_size", "clip_percentiles", "ct_window")
                     if getattr(trained, k) != getattr(options, k)]
        if differing:
            key = differing[0]
            raise UserError(f"--dataset_json {path}: {key} {getattr(options, key)!r} differs from the DDPM's "
                            f"training data {recorded} ({getattr(trained, key)!r}): another kind of data")
    return path, options, modalities, settings


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = create_argparser()
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    for key, value in {**segmentation_defaults(), "guided": False}.items():  # the shared checks read these
        if not hasattr(args, key):
            setattr(args, key, value)
    if args.overview_slices < 0:
        raise UserError(f"--overview_slices {args.overview_slices}: must be at least 0")
    checked = check_flags(args, explicit)
    if len(checked[0].taus) > 1:
        raise UserError(f"--tau {args.tau}: segment_scans.py writes one mask per scan, so it takes one tau "
                        f"(image_p_seg.py runs a tau ablation)")
    dist_util.setup_dist()
    main_process = dist_util.is_main_process()
    log = print if main_process else (lambda *a: None)
    run = prepare_run(args, explicit, checked, detect=True, log=log)
    if not run.settings_file:
        log(untuned_notice(args, run.threshold))
    dataset_json, options, modalities, dataset_settings = find_dataset_settings(args)
    expected = expectations(dataset_settings)
    if args.modality:
        modalities = parse_modalities(args.modality)
        if expected.modalities and modalities != expected.modalities:
            raise UserError(f"--modality {args.modality}: the models were trained on {', '.join(expected.modalities)} "
                            f"({dataset_json})")
    if args.region:
        if args.region not in REGIONS:
            raise UserError(f"--region {args.region}: expected wt (whole tumour), tc (tumour core) or et (enhancing "
                            f"tumour)")
        expected = replace(expected, region=args.region)
    config = run.config
    if options.image_size != config["image_size"]:
        raise UserError(f"--dataset_json {dataset_json}: image_size {options.image_size} but the models take "
                        f"{config['image_size']}")
    if len(modalities) != config["in_channels"]:
        raise UserError(f"--modality {','.join(modalities)}: {len(modalities)} channel(s) but the models take "
                        f"in_channels={config['in_channels']}")
    scans = with_reference(find_scans(args.input, modalities), args.reference)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UserError(f"--out_dir {args.out_dir}: exists and is not a folder")
    log(f"{args.method}: {len(scans)} scan(s), preprocessed as {dataset_json} ({options.intensity} intensities, "
        f"{options.image_size} px, channels {', '.join(modalities)}); detection threshold {run.threshold:.3g}, "
        f"minimum map separability {run.pipeline.map_gate.minimum if run.pipeline.map_gate else 0:.3g}")
    decision = scan_decision(args, explicit, run)
    log(f"scan decision: {describe_decision(decision)}")
    pipeline = every_slice_pipeline(run.pipeline.method, run.pipeline.detector, seed=args.seed,
                                    noise_draws=args.noise_draws, device=run.pipeline.device, progress=True)
    rows, slice_records = [], []
    try:
        with folder_lock(args.out_dir, "--out_dir"), \
                atomic_directory(args.out_dir) if main_process else contextlib.nullcontext() as folder:
            writer = ScanWriter(folder, run.options, decision, overview_slices=args.overview_slices)
            for scan in scans:
                began = time.perf_counter()
                prepared = prepare_scan(scan, options, options.lesion_labels, expected)
                for warning in prepared.warnings:
                    log(f"warning: {warning}")
                evidence = scan_evidence(pipeline, prepared, args.batch_size)
                if main_process:
                    row, records = writer.write(prepared, evidence)
                    row["seconds"] = time.perf_counter() - began
                    rows.append(row)
                    if records is not None:
                        slice_records.append(records)
                    log(scan_line(row))
            if main_process:
                summary = {"method": args.method, "dataset_json": os.path.abspath(dataset_json),
                           "preprocessing": options.__dict__, "modalities": list(modalities),
                           "mask_options": run.options.as_dict(), "scan_decision": decision.as_dict(),
                           "settings": run.summary_settings(args, settings_file=run.settings_file),
                           **summarise_scans(rows, slice_records, run.threshold), "scans": rows}
                fields = list(dict.fromkeys(k for row in rows for k in row))
                with open(os.path.join(folder, "metrics.csv"), "w", newline="") as f:
                    table = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
                    table.writeheader()
                    table.writerows(clean_json(rows))
                write_json(os.path.join(folder, "summary.json"), summary)
    except OSError as err:
        raise UserError(f"--out_dir {args.out_dir}: cannot be written ({err.strerror or err})")
    if main_process:
        if "dice_3d_mean" in summary:
            log(f"{summary['n_with_reference']} scan(s) with a reference: whole-volume Dice "
                f"{summary['dice_3d_mean']:.4f}, HD95 {summary['hd95_mm_mean']:.2f} mm")
        log(f"wrote {args.out_dir}")
    dist_util.barrier()


def scan_decision(args, explicit, run):
    """The run's whole-scan decision: --scan_rule; else the slice gate when --detect_threshold or
    --min_separability is typed; else the rule --settings recorded for the choice (chosen on the training scans
    by scripts/ablation.py); else the slice gate for a settings file older than the 3-D rule; else the 3-D rule
    with untuned thresholds. The slice gate takes the run's detection threshold and map check."""
    decision = run.file_config.scan_decision if run.file_config is not None else None
    gate_typed = bool({"detect_threshold", "min_separability"} & set(explicit))
    rule = args.scan_rule or ("slices" if gate_typed else decision.rule if decision else
                              "slices" if args.settings else "volume")
    if rule not in DECISION_RULES:
        raise UserError(f"--scan_rule {args.scan_rule}: choose one of {', '.join(DECISION_RULES)}")
    if rule == "volume":
        return decision if decision and decision.rule == "volume" else ScanDecision(rule="volume")
    min_separability = run.pipeline.map_gate.minimum if run.pipeline.map_gate else 0.0
    return ScanDecision(rule="slices", threshold=run.threshold, min_separability=min_separability)


def describe_decision(decision):
    """One line saying what the decision does."""
    if decision.rule == "slices":
        return (f"slices: each slice with tumour probability >= {decision.threshold:.3g}"
                + (f" and map separability >= {decision.min_separability:.3g}" if decision.min_separability else "")
                + " is segmented on its own")
    return (f"volume: slices with tumour probability >= {decision.seed_probability:g} (>= "
            f"{decision.edge_seed_probability:g} where the brain is under {decision.edge_fraction:g} of its largest "
            f"area) seed a lesion, grown along z into neighbours >= {decision.grow_probability:g}; 3-D components "
            f"under {decision.min_lesion_fraction:g} of the brain or reached by no seed are dropped")


def untuned_notice(args, threshold):
    """The line a run without a settings file prints: which settings it uses and what is better."""
    return (f"note: no --settings and no --model_dir selection: running untuned defaults (the paper's Q = 0.1 T, "
            f"R = 10, tau = 0.95, s = 10 and the 3-D scan decision's default thresholds, except typed flags: here "
            f"Q {args.noise_level}, R {args.steps}, tau {args.tau}, s {args.classifier_scale}); settings chosen on "
            f"the training data are recommended: --settings selection.json (scripts/ablation.py) or --model_dir "
            f"FOLDER")


def scan_line(row):
    """One console line per scan."""
    line = (f"{row['scan']}: {row['segmented_slices']} of {row['slices']} slices segmented, "
            f"{row['predicted_voxels']} voxels predicted, {row['seconds']:.1f} s")
    if "dice_3d" in row:
        hd95 = row["hd95_mm"]
        line += f"; Dice {row['dice_3d']:.4f}, HD95 " + (f"{hd95:.2f} mm" if hd95 == hd95 else "n/a")
    return line
