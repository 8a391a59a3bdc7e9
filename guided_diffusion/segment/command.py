"""`scripts/image_p_seg.py`: weakly supervised tumour segmentation with CDM / CG-CDM or a baseline.

Example (the paper's CG-CDM with its defaults: Q = 0.1 T, R = 10, tau = 0.95, s = 10):
    python scripts/image_p_seg.py --src_dir data/demo/slices --model_path runs/ddpm/model010000.pt \\
        --classifier_path runs/cls/model005000.pt --method cg-cdm

The tumour slices of the split (--slices tumor, the paper's protocol; optionally one fold, or an
evenly spaced subset) or every slice (--slices all: a classifier decides which slices hold a
lesion, the others get an empty mask) are segmented with --method. Slices with a mask in seg/ are
scored, the others only segmented: a folder without masks is a normal, prediction-only run. The
outputs (see `segment.report`) are written batch by batch into a temporary folder that replaces
--out_dir only once every file is written. Several taus (--tau 0.95,0.5,0) run in one pass: every
tau shares branch A, and each gets its own sub-folder tau_<value>/. Under torchrun or mpiexec the
batches are shared between the processes and rank 0 writes the outputs. --settings applies the
settings the ablation chose (selection.json); --model_dir takes the models, the settings and the
method from a model folder (`model_folder`); typed flags win.

With `run.py` (the models, detector and pipeline both front ends build from the checked flags), this
is where segmentation speaks in flags: library errors (ValueError naming a parameter) are reported
here as one line naming the flag.
"""

import contextlib
import os
import sys

from .. import dist_util
from ..cli import ArgumentParser, UserError, add_flags, explicit_flags, require_dir
from ..datasets import check_fold_size
from ..implicit_inputs import original_data_dir
from ..inference import add_inference_flags
from ..model_folder import apply_model_dir
from ..run_lock import folder_lock
from ..script_util import FLAG_ALIASES, FLAG_HELP, classifier_defaults, model_and_diffusion_defaults
from .methods import METHODS, SaliencySettings, tau_variant
from .pipeline import SliceBatches, select_slices
from .postprocess import MaskOptions
from .report import SliceReport, check_volumes_possible
from .run import flag_error, prepare_run
from .settings_file import apply_settings_file



def segmentation_defaults():
    return dict(
        model_path="", src_dir="", save_dir="", out_dir="", classifier_path="", method="cdm",
        split="validation", fold=0, num_folds=1, fold_size=0, batch_size=8, max_images=0,
        noise_level=0.1, steps=10, stride=1, tau="0.95", classifier_scale=10.0, healthy_label=0,
        clip_denoised=True, abs_map=False, smooth_sigma=0.0, foreground_only=False, positive_part=False,
        keep_largest=False,
        seed=0, grid_images=8, volumes=False, raw_dir="", slices="tumor", detect_threshold=-1.0,
        detector_path="", min_separability=-1.0, noise_draws=1, settings="", choice="mask_tuned", model_dir="",
    )


HELP = {
    "model_path": "(required for the diffusion methods) class-conditional DDPM checkpoint with its args.json beside it",
    "src_dir": "slice dataset root holding training/ and validation/ (validate/ also accepted); default: the "
               "original README's data/brats_patch/flair/flair (or data/brats_patch/flair) when it exists",
    "save_dir": "classifier folder (the original code's meaning): its newest model*.pt is the classifier "
                "when --classifier_path is empty; also the default parent of --out_dir",
    "out_dir": "output folder, replaced when the run completes (default: <save_dir, else the model's folder>/seg_<method>; "
               "with --model_dir FOLDER: runs/<FOLDER name>_seg/seg_<method>)",
    "classifier_path": "classifier checkpoint (args.json beside it): the noise-conditioned one that guides cg-cdm, "
                       "cg-diff and anomaly (unless --classifier_scale 0), or the plain one of a CAM method",
    "method": "; ".join(f"{name}: {m.description}" for name, m in METHODS.items()),
    "split": "which split's slices to segment",
    "slices": "tumor: the split's tumour slices (the paper's protocol); all: every slice, normal and tumour, "
              "each segmented only when the classifier detects a lesion in it (--detect_threshold)",
    "detect_threshold": "with --slices all: slices whose tumour probability (classifier at t = 0) is at "
                        "least this are segmented, the others get an empty mask; in [0, 1] (default: the "
                        "threshold of --settings, chosen on the training split, else 0.5)",
    "detector_path": "classifier whose tumour probability decides which slices are segmented (default: "
                     "--classifier_path)",
    "min_separability": "with detection: a detected slice is segmented only when its map is clearly two-class, "
                        "Otsu's effectiveness at least this (a label-free check against false detections; 0: "
                        "off) (default: the value of --settings, chosen on the training split, else 0)",
    "noise_draws": "K: each map is the mean of the maps from K noise draws (draw k of a slice depends only "
                   "on --seed, the slice's name and k)",
    "settings": "selection.json of scripts/ablation.py: its --choice sets Q, R, tau, s, the post-processing "
                "and the detection threshold; typed flags override it",
    "choice": "which choice of --settings: mask_tuned (best Dice on the training masks), label_free "
              "(chosen without masks) or mask_tuned_cdm",
    "model_dir": "model folder of scripts/export_model.py or train_recipe.py: its weights, configuration, "
                 "preprocessing, selection.json, method and choice, each unless its flag is typed (--model_path, "
                 "--classifier_path, --dataset_json, --settings, --choice, --method and the method flags win)",
    "raw_dir": "with --volumes: where the raw NIfTI volumes of the dataset are now, if they moved since "
               "the dataset was prepared (default: where dataset.json says)",
    "fold": "evaluate fold k (also -f): part k of --num_folds contiguous parts of the sorted tumour slices, "
            "or block k of --fold_size slices",
    "num_folds": "number of folds (default 1: every tumour slice is evaluated)",
    "fold_size": "folds as fixed blocks of this many sorted tumour slices instead: 500 gives the original "
                 "code's folds, -f 0 = slices 0..499, -f 1 = 500..999, ... (0: off, use --num_folds)",
    "batch_size": "images per batch (CDM runs both branches and every tau of a batch in one UNet call per step)",
    "max_images": "evaluate at most this many images, evenly spaced over the sorted tumour slices (0: all)",
    "noise_level": "noise level Q: a fraction of the diffusion steps T in (0, 1) (0.1 = step 400 of 4000), "
                   "or an integer step; for anomaly it is the encoding depth L",
    "steps": "R, the number of DDIM steps from Q (CDM / CG-CDM)",
    "stride": "timesteps per DDIM / ancestral step (1: every step of the chain, as in the paper)",
    "tau": "soft-label weight of the image's label in branch B (paper 0.95); a comma list runs them all in one pass",
    "classifier_scale": "classifier guidance scale s (paper 10); 0 disables guidance",
    "healthy_label": "the class index of healthy images, y0",
    "clip_denoised": "clip the predicted x0 to [-1, 1] in each step",
    "abs_map": "sum |a| over channels instead of the signed a; the signed map (paper) marks lesions the tumour "
               "label makes brighter, |a| also darker ones (modalities where lesions are dark)",
    "smooth_sigma": "Gaussian blur of the map in pixels before Otsu (0: none, the paper)",
    "positive_part": "threshold only the positive part of the map, max(a, 0): what the tumour label raises "
                     "(the signed map's negative rim around a lesion can otherwise pull Otsu's split)",
    "foreground_only": "compute Otsu's threshold over the foreground (brain) pixels only and keep the mask there",
    "keep_largest": "keep only the largest connected component of each slice's mask (image_p_seg.py writes "
                    "the largest component's masks to masks_lcc/ in any case)",
    "seed": "seed of the noise draw (each image's noise depends only on the seed and the image's name)",
    "grid_images": "images shown in grid.png (0: no grid)",
    "volumes": "paste masks back into NIfTI volumes (needs manifest.csv in --src_dir) and report 3-D Dice "
               "where the label maps are found",
    "guided": "the original code's switch: same as --method cg-cdm",
}


def create_argparser():
    parser = ArgumentParser(
        description="Segment tumour slices from image-level labels with CDM / CG-CDM or a baseline.",
        allow_abbrev=False,
    )
    add_flags(parser, {**segmentation_defaults(), "guided": False}, help=HELP, aliases={"fold": ["-f"]},
              switches=("guided",), choices={"slices": ("tumor", "all")})
    return add_model_flags(parser)


def add_model_flags(parser):
    """--precision, --compile and the checkpoint configuration flags (checked against args.json)."""
    add_inference_flags(parser)
    checked = parser.add_argument_group(
        "checkpoint configuration", "Read from args.json beside each checkpoint; typing one only checks that it agrees.")
    flags = dict(model_and_diffusion_defaults())
    flags.update({k: v for k, v in classifier_defaults().items() if k not in flags})
    add_flags(checked, flags, help=FLAG_HELP, aliases=FLAG_ALIASES)
    return parser


def parse_taus(text):
    try:
        taus = tuple(float(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise UserError(f"--tau {text!r}: expected a number or a comma list such as 0.95,0.5,0")
    if not taus:
        raise UserError("--tau is empty")
    return taus


def build_settings(args):
    """SaliencySettings and MaskOptions from the flags, each check in the library, reported by flag."""
    if args.method not in METHODS:
        raise UserError(f"--method {args.method!r}: unknown; choose one of {', '.join(METHODS)}")
    if args.guided:
        if args.method not in ("cdm", "cg-cdm"):
            raise UserError(f"--guided is the original switch for --method cg-cdm; it does not combine with "
                            f"--method {args.method}")
        args.method = "cg-cdm"
    for flag in ("batch_size", "num_folds"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    check_fold_size(args.fold_size, args.num_folds)  # before any model is loaded
    if args.fold < 0 or (not args.fold_size and args.fold >= args.num_folds):
        raise UserError(f"--fold {args.fold}: must lie in 0..{args.num_folds - 1} (--num_folds {args.num_folds})")
    if args.max_images < 0:
        raise UserError(f"--max_images {args.max_images}: must be 0 (all) or positive")
    if args.noise_draws < 1:
        raise UserError(f"--noise_draws {args.noise_draws}: must be at least 1")
    for flag in ("detect_threshold", "min_separability"):
        value = getattr(args, flag)
        if value != -1.0 and not 0.0 <= value <= 1.0:
            raise UserError(f"--{flag} {value}: must lie in [0, 1]")
    taus = parse_taus(args.tau)
    if len(taus) > 1 and not METHODS[args.method].uses_tau:
        raise UserError(f"--tau lists several values but --method {args.method} does not use tau")
    values = dict(noise_level=args.noise_level, steps=args.steps, stride=args.stride, taus=taus,
                  classifier_scale=args.classifier_scale, healthy_label=args.healthy_label,
                  clip_denoised=args.clip_denoised, abs_map=args.abs_map, seed=args.seed)
    try:
        settings = SaliencySettings(**values)
    except ValueError as err:
        raise flag_error("--" + str(err).split()[0].replace("taus", "tau"), err)
    try:
        options = MaskOptions(smooth_sigma=args.smooth_sigma, foreground_only=args.foreground_only,
                              positive_part=args.positive_part, keep_largest=args.keep_largest)
    except ValueError as err:
        raise flag_error("--smooth_sigma", err)
    return settings, options


def check_flags(args, explicit):
    """--model_dir and --settings applied, then every flag checked, before any input is read:
    (settings, options, applied, file_config). `applied` also says where the settings came from (`source`);
    file_config is the `SegmentationConfig` of --settings (None without it)."""
    from_folder = apply_model_dir(args, explicit)
    applied, file_config = apply_settings_file(args, explicit)
    if applied:
        applied["source"] = (f"--model_dir {args.model_dir}" if "settings" in from_folder else "--settings")
    return (*build_settings(args), applied, file_config)


def variant_settings(args, settings):
    return {tau_variant(t): {"tau": t} for t in settings.taus} if METHODS[args.method].uses_tau else {}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = create_argparser()
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    checked = check_flags(args, explicit)
    dist_util.setup_dist()
    log = print if dist_util.is_main_process() else (lambda *a: None)
    if not args.src_dir:
        args.src_dir = original_data_dir(log=log)
    require_dir(args.src_dir, "--src_dir")
    run = prepare_run(args, explicit, checked, detect=args.slices == "all", log=log)
    config = run.config
    try:
        dataset = select_slices(args.src_dir, args.split, image_size=config["image_size"],
                                in_channels=config["in_channels"], slices=args.slices, fold=args.fold,
                                num_folds=args.num_folds, fold_size=args.fold_size, max_images=args.max_images)
        if args.volumes:
            check_volumes_possible(args.src_dir, args.split, dataset.names)
    except ValueError as err:
        raise flag_error("--src_dir", err)
    base = args.save_dir or os.path.dirname(os.path.abspath(args.model_path or run.classifier_path))
    if getattr(args, "model_dir", ""):  # a model folder is what users copy around: outputs go beside it, not in it
        base = os.path.join("runs", os.path.basename(os.path.normpath(args.model_dir)) + "_seg")
    out_dir = args.out_dir or os.path.join(base, f"seg_{args.method}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir}: exists and is not a folder")

    n_masks = sum(m is not None for m in dataset.mask_paths)
    folds = f"block {args.fold} of {args.fold_size}" if args.fold_size else f"fold {args.fold}/{args.num_folds}"
    kind = "tumour images" if args.slices == "tumor" else "images (normal and tumour)"
    log(f"{args.method}: {len(dataset)} {kind} from {args.src_dir} ({args.split}, {folds}); {n_masks} have a mask "
        f"and are scored" + ("" if n_masks else ": predictions only"))
    batches = SliceBatches(dataset, args.batch_size)
    report = SliceReport(out_dir, variants=run.method.variants(), n_images=len(dataset),
                         shape=(config["image_size"],) * 2, options=run.options, grid_images=args.grid_images)
    main_process = dist_util.is_main_process()
    try:
        with folder_lock(out_dir, "--out_dir"), report if main_process else contextlib.nullcontext():
            for result in run.pipeline.run(batches):
                report.add(result)
            if main_process:
                summary = report.finish(
                    method=args.method, seconds=run.pipeline.seconds, variant_settings=variant_settings(args, run.settings),
                    threshold=run.threshold if run.pipeline.detector is not None else None,
                    settings=run.summary_settings(args, src_dir=args.src_dir, split=args.split, slices=args.slices,
                                                  fold=args.fold, num_folds=args.num_folds, fold_size=args.fold_size,
                                                  settings_file=run.settings_file),
                    volumes_from=(args.src_dir, args.split, args.raw_dir or None) if args.volumes else None)
    except OSError as err:
        raise UserError(f"--out_dir {out_dir}: cannot be written ({err.strerror or err})")
    if main_process:
        log_summary(summary, log)
        log(f"wrote {out_dir}")
    dist_util.barrier()


def _fmt(value, digits=4):
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def log_summary(summary, log):
    """The console lines of a run: scored counts, Dice per variant, detection."""
    log(f"{summary['n_images']} images, {summary['n_segmented']} segmented, {summary['n_scored']} scored; "
        f"{summary['seconds_per_image']:.3f} s/image")
    if "detection" in summary:
        d = summary["detection"]
        log(f"detection (threshold {d['threshold']:.3g}): sensitivity {_fmt(d['sensitivity'], 3)}, specificity "
            f"{_fmt(d['specificity'], 3)}, AUROC {_fmt(d['auroc'], 3)}")
    for variant, result in summary["variants"].items():
        otsu, lcc = result["otsu"], result["largest_component"]
        line = (f"{variant}: tumour slices ({otsu['n']}): Dice {_fmt(otsu['dice_mean'])} ± {_fmt(otsu['dice_std'])}, "
                f"IoU {_fmt(otsu['iou_mean'])}, HD95 {_fmt(otsu['hd95_mean'], 2)}; largest component: Dice "
                f"{_fmt(lcc['dice_mean'])}")
        if "all_slices" in result:
            every = result["all_slices"]["otsu"]
            line += f"; all {every['n']} scored slices: pooled Dice {_fmt(every['dice_pooled'])}"
        if "volumes" in result:
            line += f"; 3-D Dice {_fmt(result['volumes']['dice_3d_mean'])}"
        log(line)
