"""`scripts/image_p_seg.py`: weakly supervised tumour segmentation with CDM / CG-CDM or a baseline.

Example (the paper's CG-CDM with its defaults: Q = 0.1 T, R = 10, tau = 0.95, s = 10):
    python scripts/image_p_seg.py --src_dir data/demo/slices --model_path runs/ddpm/model010000.pt \\
        --classifier_path runs/cls/model005000.pt --method cg-cdm

The tumour slices of the split that have masks (optionally one fold, or an evenly spaced subset)
are segmented with --method; the outputs (see `segment.report`) go to --out_dir, which is
replaced only once every file is written. Several taus (--tau 0.95,0.5,0) run in one pass: every
tau shares branch A, and each gets its own sub-folder tau_<value>/. Under torchrun or mpiexec the
batches are shared between the processes and rank 0 writes the outputs.

This is the only segmentation module that speaks in flags: library errors (ValueError naming a
parameter) are reported here as one line naming the flag.
"""

import os
import sys

import torch

from .. import dist_util
from ..checkpoint_util import check_same_diffusion, load_classifier, load_model_and_diffusion
from ..cli import ArgumentParser, UserError, add_flags, explicit_flags, require_dir
from ..datasets import check_fold_size
from ..implicit_inputs import checkpoint_from_dir, original_data_dir
from ..script_util import FLAG_ALIASES, FLAG_HELP, classifier_defaults, diffusion_from_config, model_and_diffusion_defaults
from .cam import gap_linear_head
from .methods import METHODS, SaliencySettings, check_steps_fit, create_method, tau_variant
from .pipeline import compute_maps, select_slices
from .postprocess import MaskOptions
from .report import check_volumes_possible, write_report


def segmentation_defaults():
    return dict(
        model_path="", src_dir="", save_dir="", out_dir="", classifier_path="", method="cdm",
        split="validation", fold=0, num_folds=1, fold_size=0, batch_size=8, max_images=0,
        noise_level=0.1, steps=10, stride=1, tau="0.95", classifier_scale=10.0, healthy_label=0,
        clip_denoised=True, abs_map=False, smooth_sigma=0.0, foreground_only=False,
        seed=0, grid_images=8, volumes=False,
    )


HELP = {
    "model_path": "(required for the diffusion methods) class-conditional DDPM checkpoint with its args.json beside it",
    "src_dir": "slice dataset root holding training/ and validation/ (validate/ also accepted); default: the "
               "original README's data/brats_patch/flair/flair (or data/brats_patch/flair) when it exists",
    "save_dir": "classifier folder (the original code's meaning): its newest model*.pt is the classifier "
                "when --classifier_path is empty; also the default parent of --out_dir",
    "out_dir": "output folder, replaced when the run completes (default: <save_dir, else the model's folder>/seg_<method>)",
    "classifier_path": "classifier checkpoint (args.json beside it): the noise-conditioned one that guides cg-cdm, "
                       "cg-diff and anomaly (unless --classifier_scale 0), or the plain one of a CAM method",
    "method": "; ".join(f"{name}: {m.description}" for name, m in METHODS.items()),
    "split": "which split's tumour slices to segment",
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
    "foreground_only": "compute Otsu's threshold over the foreground (brain) pixels only and keep the mask there",
    "seed": "seed of the noise draw (each image's noise depends only on the seed and its position)",
    "grid_images": "images shown in grid.png (0: no grid)",
    "volumes": "paste masks back into NIfTI volumes (needs manifest.csv in --src_dir) and report 3-D Dice",
    "guided": "the original code's switch: same as --method cg-cdm",
}


def create_argparser():
    parser = ArgumentParser(
        description="Segment tumour slices from image-level labels with CDM / CG-CDM or a baseline.",
        allow_abbrev=False,
    )
    add_flags(parser, {**segmentation_defaults(), "guided": False}, help=HELP, aliases={"fold": ["-f"]},
              switches=("guided",))
    checked = parser.add_argument_group(
        "checkpoint configuration", "Read from args.json beside each checkpoint; typing one only checks that it agrees.")
    flags = dict(model_and_diffusion_defaults())
    flags.update({k: v for k, v in classifier_defaults().items() if k not in flags})
    add_flags(checked, flags, help=FLAG_HELP, aliases=FLAG_ALIASES)
    return parser


def _flag_error(flag, err):
    """The library's ValueError ('param value: why') as one line naming `flag`."""
    text = str(err)
    if text.startswith("--"):  # already names its flag
        return UserError(text)
    param = flag.lstrip("-")
    return UserError(f"{flag}{text[len(param):]}" if text.startswith(param) else f"{flag}: {text}")


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
    taus = parse_taus(args.tau)
    if len(taus) > 1 and not METHODS[args.method].uses_tau:
        raise UserError(f"--tau lists several values but --method {args.method} does not use tau")
    values = dict(noise_level=args.noise_level, steps=args.steps, stride=args.stride, taus=taus,
                  classifier_scale=args.classifier_scale, healthy_label=args.healthy_label,
                  clip_denoised=args.clip_denoised, abs_map=args.abs_map, seed=args.seed)
    try:
        settings = SaliencySettings(**values)
    except ValueError as err:
        raise _flag_error("--" + str(err).split()[0].replace("taus", "tau"), err)
    try:
        options = MaskOptions(smooth_sigma=args.smooth_sigma, foreground_only=args.foreground_only)
    except ValueError as err:
        raise _flag_error("--smooth_sigma", err)
    return settings, options


def find_classifier(args):
    if args.classifier_path:
        return args.classifier_path
    if args.save_dir:
        return checkpoint_from_dir(args.save_dir, "--save_dir", "classifier")
    raise UserError(f"--classifier_path is required for --method {args.method} (or --save_dir, the classifier's folder)")


def load_models(args, explicit, device):
    """(model, diffusion, classifier, classifier_path, config) that --method needs, checked against each other."""
    spec = METHODS[args.method]
    model = diffusion = classifier = classifier_path = config = None
    if spec.uses_ddpm:
        if not args.model_path:
            raise UserError("--model_path is required")
        model, _, config = load_model_and_diffusion(args.model_path, args, explicit, device)
        if spec.uses_tau and not config["class_cond"]:
            raise UserError(f"--model_path {args.model_path}: the DDPM is not class-conditional (class_cond False); "
                            f"--method {args.method} needs one trained with --class_cond True")
        diffusion = diffusion_from_config({**config, "timestep_respacing": ""})  # the methods pick their own steps
    if spec.needs_classifier(args.classifier_scale):
        classifier_path = find_classifier(args)
        classifier, classifier_config = load_classifier(classifier_path, args, explicit, device)
        if config is None:
            config = {k: classifier_config[k] for k in ("image_size", "in_channels", "num_classes")}
        else:
            check_same_diffusion(classifier_config, config, classifier_path, args.model_path)
            for key in ("image_size", "in_channels", "num_classes"):
                if classifier_config.get(key) != config[key]:
                    raise UserError(f"--classifier_path {classifier_path}: classifier has {key}="
                                    f"{classifier_config.get(key)} but the DDPM has {key}={config[key]}")
    return model, diffusion, classifier, classifier_path, config


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = create_argparser()
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    settings, options = build_settings(args)
    dist_util.setup_dist()
    log = print if dist_util.is_main_process() else (lambda *a: None)
    if not args.src_dir:
        args.src_dir = original_data_dir(log=log)
    require_dir(args.src_dir, "--src_dir")
    device = dist_util.dev()
    model, diffusion, classifier, classifier_path, config = load_models(args, explicit, device)
    if diffusion is not None and METHODS[args.method].uses_tau:
        try:
            check_steps_fit(settings, diffusion.num_timesteps)
        except ValueError as err:
            raise _flag_error("--" + str(err).split()[0], err)
    try:
        slices = select_slices(args.src_dir, args.split, image_size=config["image_size"],
                               in_channels=config["in_channels"], fold=args.fold, num_folds=args.num_folds,
                               fold_size=args.fold_size, max_images=args.max_images)
        if args.volumes:
            check_volumes_possible(args.src_dir, args.split, slices.names)
    except ValueError as err:
        raise _flag_error("--src_dir", err)
    if int(slices.labels.max()) >= config["num_classes"]:
        raise UserError(f"--src_dir {args.src_dir}: label {int(slices.labels.max())} is not a class of the model")
    if not 0 <= args.healthy_label < config["num_classes"]:
        raise UserError(f"--healthy_label {args.healthy_label}: the model has classes 0..{config['num_classes'] - 1}")
    base = args.save_dir or os.path.dirname(os.path.abspath(args.model_path or classifier_path))
    out_dir = args.out_dir or os.path.join(base, f"seg_{args.method}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir}: exists and is not a folder")

    folds = f"block {args.fold} of {args.fold_size}" if args.fold_size else f"fold {args.fold}/{args.num_folds}"
    log(f"{args.method}: {len(slices)} tumour images from {args.src_dir} ({args.split}, {folds})")
    if args.method == "cam" and gap_linear_head(classifier) is None:
        log("cam: the classifier head is not GAP + linear, so CAM is computed in its gradient form (Grad-CAM)")
    torch.manual_seed(args.seed)
    method = create_method(args.method, settings, model=model, diffusion=diffusion, classifier=classifier)
    maps, seconds = compute_maps(method, slices.images, slices.labels, batch_size=args.batch_size, seed=args.seed,
                                 device=device)
    if dist_util.is_main_process():
        run_settings = {"model_path": args.model_path, "classifier_path": classifier_path, "src_dir": args.src_dir,
                        "split": args.split, "fold": args.fold, "num_folds": args.num_folds,
                        "fold_size": args.fold_size, "seed": args.seed,
                        "world_size": dist_util.get_world_size()}
        if METHODS[args.method].uses_ddpm:
            run_settings.update(noise_level=args.noise_level, steps=args.steps, stride=args.stride,
                                classifier_scale=args.classifier_scale if classifier is not None else 0.0,
                                healthy_label=args.healthy_label, clip_denoised=args.clip_denoised,
                                abs_map=args.abs_map, diffusion_steps=config["diffusion_steps"])
        variant_settings = {tau_variant(t): {"tau": t} for t in settings.taus} if METHODS[args.method].uses_tau else {}
        try:
            summary = write_report(out_dir, method=args.method, settings=run_settings, slices=slices,
                                   maps_by_variant=maps, seconds=seconds, variant_settings=variant_settings,
                                   options=options, grid_images=args.grid_images,
                                   volumes_from=(args.src_dir, args.split) if args.volumes else None)
        except OSError as err:
            raise UserError(f"--out_dir {out_dir}: cannot be written ({err.strerror or err})")
        for variant, result in summary["variants"].items():
            otsu, lcc = result["otsu"], result["largest_component"]
            log(f"{variant}: Dice {otsu['dice_mean']:.4f} ± {otsu['dice_std']:.4f}, IoU {otsu['iou_mean']:.4f}, "
                f"HD95 {otsu['hd95_mean']:.2f}; largest component: Dice {lcc['dice_mean']:.4f}, "
                f"IoU {lcc['iou_mean']:.4f}, HD95 {lcc['hd95_mean']:.2f}; {summary['seconds_per_image']:.3f} s/image")
        log(f"wrote {out_dir}")
    dist_util.barrier()
