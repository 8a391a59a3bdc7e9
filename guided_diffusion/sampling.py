"""Sampling images from a trained DDPM, unguided or steered by a noise-conditioned classifier.

`sample_images` draws images from Gaussian noise with the ancestral (DDPM) or
DDIM sampler; every process draws its own contiguous share of the samples with
a seed derived from (seed, rank), and the shares are gathered in rank order, so
a run is reproducible for a given number of processes. `sample_main` is the
command line shared by `scripts/image_tumor_sample.py` and
`scripts/classifier_tumor_sample.py`: it rebuilds the model (and classifier)
from the `args.json` beside each checkpoint and writes
`samples_{N}x{H}x{W}x{C}.npz` plus a labelled PNG grid; `--precision` and `--compile` go to
`inference.prepare_for_inference`.
"""

import json
import math
import os
import sys
import warnings

import numpy as np
import torch
from tqdm import tqdm

from . import dist_util, logger
from .checkpoint_util import (
    check_same_diffusion,
    load_classifier,
    load_model_and_diffusion,
    read_args_json,
)
from .cli import ArgumentParser, UserError, add_flags, atomic_path, explicit_flags, removed_on_failure
from .guidance import label_model, make_classifier_cond_fn
from .implicit_inputs import CLASSIFIER_DIRS, DDPM_DIRS, checkpoint_in, newest_checkpoint
from .inference import add_inference_flags, prepare_for_inference
from .run_lock import folder_lock
from .script_util import FLAG_ALIASES, FLAG_HELP, classifier_defaults, model_and_diffusion_defaults
from .sample_files import samples_filename, save_sample_grid, save_samples_npz
from .volumes import to_uint8



def images_to_uint8(x):
    """Images in [-1, 1] as an (N, C, H, W) tensor → uint8 NHWC numpy array in 0..255 (rounded, clipped)."""
    return to_uint8(x.detach().float().permute(0, 2, 3, 1).cpu().numpy(), low=-1.0, high=1.0)


def balanced_labels(num_samples, num_classes, seed):
    """`num_samples` labels with (almost) equal counts per class, shuffled reproducibly by `seed`.

    Counts differ by at most one; the first `num_samples % num_classes` classes get the extra sample.
    """
    labels = np.arange(num_samples, dtype=np.int64) % num_classes
    np.random.default_rng([seed, num_samples]).shuffle(labels)
    return labels


def rank_share(num_samples, rank, world_size):
    """(start, stop) of the samples process `rank` draws: contiguous slices whose sizes differ by at most one."""
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def rank_seed(seed, rank):
    """An independent 32-bit seed for each (seed, rank) pair."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def sample_images(
    model,
    diffusion,
    *,
    num_samples,
    batch_size,
    image_shape,
    class_label=None,
    num_classes=2,
    class_cond=True,
    use_ddim=False,
    eta=0.0,
    clip_denoised=True,
    cond_fn=None,
    seed=0,
    device=None,
    progress=False,
):
    """Draw `num_samples` images of `image_shape` (C, H, W) from noise; returns (uint8 NHWC images, labels).

    Labels are `class_label` for every sample, or balanced random labels when it is None; they condition a
    class-conditional model (`class_cond`) and are the guidance target of `cond_fn`. Without either the
    labels are meaningless and None is returned in their place. Under several processes each draws its
    share (`rank_share`) with the seed `rank_seed(seed, rank)` and every process receives the gathered
    result. The global torch RNG state is restored afterwards.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples ({num_samples}) and batch_size ({batch_size}) must be at least 1")
    if class_label is not None and not 0 <= class_label < num_classes:
        raise ValueError(f"class_label {class_label} is not a class in 0..{num_classes - 1}")
    device = torch.device(device) if device is not None else dist_util.dev()
    rank, world_size = dist_util.get_rank(), dist_util.get_world_size()
    uses_labels = class_cond or cond_fn is not None
    if uses_labels:
        if class_label is None:
            all_labels = balanced_labels(num_samples, num_classes, seed)
        else:
            all_labels = np.full(num_samples, int(class_label), dtype=np.int64)
    model_fn = label_model(model, conditional=class_cond)  # an unconditional model guided toward a class takes no `y`
    loop = diffusion.ddim_sample_loop_progressive if use_ddim else diffusion.p_sample_loop_progressive
    extra = {"eta": eta} if use_ddim else {}

    start, stop = rank_share(num_samples, rank, world_size)
    batches = [(b, min(b + batch_size, stop)) for b in range(start, stop, batch_size)]
    images = [np.zeros((0, image_shape[1], image_shape[2], image_shape[0]), dtype=np.uint8)]
    bar = tqdm(total=len(batches) * diffusion.num_timesteps, unit="step", desc="sampling",
               disable=not progress or rank != 0)
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(rank_seed(seed, rank))
            for lo, hi in batches:
                model_kwargs = {}
                if uses_labels:
                    model_kwargs["y"] = torch.as_tensor(all_labels[lo:hi], device=device)
                noise = torch.randn((hi - lo, *image_shape), device=device)
                out = None
                for out in loop(model_fn, noise.shape, noise=noise, clip_denoised=clip_denoised, cond_fn=cond_fn,
                                model_kwargs=model_kwargs, device=device, **extra):
                    bar.update(1)
                images.append(images_to_uint8(out["sample"]))
    except BaseException:
        bar.leave = False  # erase the bar: the error (or the stop) is the line the user sees
        raise
    finally:
        bar.close()

    shares = dist_util.all_gather_objects(np.concatenate(images))
    return np.concatenate(shares), (all_labels if uses_labels else None)


# ---------------------------------------------------------------------------------------------
# Command line shared by the two sampling scripts


def sampling_defaults(guided=False):
    """Flags of the sampling scripts themselves (the model flags come from the checkpoint's args.json)."""
    flags = dict(
        model_path="",
        save_dir="",
        num_samples=16,
        batch_size=8,
        src_dir="",
        class_label=-1,
        use_ddim=False,
        eta=0.0,
        clip_denoised=True,
        seed=0,
    )
    if guided:
        flags.update(classifier_path="", classifier_scale=1.0)
    return flags


SAMPLING_HELP = {
    "model_path": "DDPM checkpoint (model*.pt or ema_*.pt) with its args.json in the same folder; default: the "
                  "newest checkpoint in --save_dir (unguided sampling), else in " + " or ".join(DDPM_DIRS),
    "save_dir": "output folder (default: a samples/ folder next to --model_path). A folder holding checkpoints "
                "is, as in the original code, the model's folder: the DDPM (unguided) or the classifier (guided) "
                "is its newest model*.pt unless given, and the outputs go to its samples/ subfolder",
    "src_dir": "a slice dataset the models were trained on (optional): checks that the DDPM and the classifier "
               "take its images' channels, and reports their size; sampling itself reads no data",
    "num_samples": "number of images to draw in total (split across processes under mpiexec)",
    "batch_size": "images per sampler call on each process",
    "class_label": "class of every sample (0 normal, 1 tumor); -1 draws balanced random labels",
    "use_ddim": "DDIM sampler instead of ancestral DDPM sampling",
    "eta": "DDIM noise: 0 is deterministic DDIM, 1 matches the DDPM posterior variance",
    "clip_denoised": "clip the predicted x0 to [-1, 1] at every step",
    "seed": "random seed; the same seed and number of processes give identical samples",
    "classifier_path": "noise-conditioned classifier checkpoint with its args.json in the same folder; default: the "
                       "newest checkpoint in --save_dir, else in " + " or ".join(CLASSIFIER_DIRS),
    "classifier_scale": "guidance scale s: the sampler follows s * grad log p(y | x_t, t)",
}


def create_argparser(guided=False):
    """Parser of the sampling scripts; `guided` adds the classifier flags."""
    description = (
        "Draw images from a trained DDPM with classifier guidance." if guided
        else "Draw images from a trained DDPM (ancestral DDPM or DDIM)."
    )
    parser = ArgumentParser(description=description, allow_abbrev=False)
    add_flags(parser, sampling_defaults(guided), help=SAMPLING_HELP)
    add_inference_flags(parser)
    checked = parser.add_argument_group(
        "checkpoint configuration",
        "These are read from args.json beside the checkpoint. Typing one only checks that it agrees, "
        "except --timestep_respacing (and other sampling-only settings), which override it.",
    )
    flags = dict(model_and_diffusion_defaults())
    if guided:
        flags.update(classifier_defaults())
    add_flags(checked, flags, help=FLAG_HELP, aliases=FLAG_ALIASES)
    return parser


def _check_sampling_args(args, guided):
    if args.num_samples < 1:
        raise UserError(f"--num_samples {args.num_samples}: must be at least 1")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be at least 1")
    if not (math.isfinite(args.eta) and args.eta >= 0):
        raise UserError(f"--eta {args.eta}: must be a non-negative number")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed {args.seed}: must be in 0..{2**32 - 1}")
    if guided and not math.isfinite(args.classifier_scale):
        raise UserError(f"--classifier_scale {args.classifier_scale}: must be a finite number")
    if args.save_dir and os.path.exists(args.save_dir) and not os.path.isdir(args.save_dir):
        raise UserError(f"--save_dir {args.save_dir}: is a file, not a folder")


def _check_classifier_fits(classifier_config, model_config, classifier_path):
    for key in ("image_size", "in_channels", "num_classes"):
        if classifier_config[key] != model_config[key]:
            raise UserError(
                f"--classifier_path {classifier_path}: classifier has {key}={classifier_config[key]} "
                f"but the DDPM has {key}={model_config[key]}"
            )


def check_data_fits(src_dir, model_config, classifier_config=None):
    """One line on how the images of a slice dataset fit the DDPM (and classifier); an error if their channels
    cannot feed the networks (the loaders' rules: one channel repeated, RGB averaged to grey, extra ones dropped)."""
    from .datasets import image_shape, list_slices, read_image

    first = list_slices(src_dir, "training")[0][0]
    channels, height, width = image_shape(first)
    for what, config in (("DDPM", model_config), ("classifier", classifier_config)):
        if config is not None:
            try:
                read_image(first, config["in_channels"])
            except UserError:
                raise UserError(f"--src_dir {src_dir}: its images have {channels} channels ({first}) but the {what} "
                                f"takes in_channels={config['in_channels']}") from None
    size, in_channels = model_config["image_size"], model_config["in_channels"]
    resized = "" if (height, width) == (size, size) else "; the loaders resize them"
    return (f"--src_dir {src_dir}: {height} x {width} images with {channels} channel(s); the models take "
            f"{size} x {size} with {in_channels} channel(s){resized}")


def _implied_checkpoint(saved_checkpoint, default_dirs, flag, what, log):
    """`saved_checkpoint` (the newest one in --save_dir), else the newest one the training scripts wrote to
    their default folders."""
    if saved_checkpoint is None:
        return newest_checkpoint(default_dirs, flag, what, log=log)
    log(f"{flag} not given: using {saved_checkpoint}, the newest checkpoint in --save_dir")
    return saved_checkpoint


def sample_main(argv=None, guided=False):
    """Entry point of `image_tumor_sample.py` (`guided=False`) and `classifier_tumor_sample.py` (`guided=True`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = create_argparser(guided)
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    _check_sampling_args(args, guided)
    dist_util.setup_dist()
    device = dist_util.dev()
    log = print if dist_util.is_main_process() else (lambda *a: None)
    # A --save_dir holding checkpoints is the model's folder (the original code's meaning).
    saved_checkpoint = checkpoint_in(args.save_dir) if args.save_dir else None
    if not args.model_path:
        args.model_path = _implied_checkpoint(None if guided else saved_checkpoint, DDPM_DIRS, "--model_path",
                                              "DDPM", log)
    if guided and not args.classifier_path:
        args.classifier_path = _implied_checkpoint(saved_checkpoint, CLASSIFIER_DIRS, "--classifier_path",
                                                   "classifier", log)
    if saved_checkpoint is not None:  # a model's folder: its log.txt and checkpoints stay apart from the samples
        save_dir = os.path.join(args.save_dir, "samples")
    else:
        save_dir = args.save_dir or os.path.join(os.path.dirname(os.path.abspath(args.model_path)), "samples")
    # One run per output folder: a second one stops here, before loading anything.
    with folder_lock(save_dir, "--save_dir"):
        _load_and_sample(args, explicit, guided, save_dir, device, log)


def _load_and_sample(args, explicit, guided, save_dir, device, log):
    model, diffusion, config = load_model_and_diffusion(args.model_path, args, explicit, device)
    trained_range = float(read_args_json(args.model_path).get("max_noise_level", 1.0))
    if trained_range < 1:
        warnings.warn(f"--model_path {args.model_path} was trained on t < {trained_range:g} T only (--max_noise_level); "
                      f"sampling starts from pure noise at t = T, where it has never been trained", stacklevel=1)
    num_classes = config["num_classes"]
    classifier = cond_fn = classifier_config = None
    if guided:
        classifier, classifier_config = load_classifier(args.classifier_path, args, explicit, device)
        check_same_diffusion(classifier_config, config, args.classifier_path, args.model_path)
        _check_classifier_fits(classifier_config, config, args.classifier_path)
    setup = prepare_for_inference(model, classifier, precision=args.precision, compile=args.compile, device=device)
    model = setup.model
    if guided:
        cond_fn = make_classifier_cond_fn(setup.classifier, args.classifier_scale)
    if args.class_label != -1:
        if not (config["class_cond"] or guided):
            raise UserError(f"--class_label {args.class_label}: the model {args.model_path} is not class-conditional")
        if not 0 <= args.class_label < num_classes:
            raise UserError(f"--class_label {args.class_label}: must be -1 or a class in 0..{num_classes - 1}")

    # The classifier's own settings as its args.json has them (not the untyped flags' defaults).
    classifier_settings = {k: classifier_config[k] for k in classifier_defaults() if k not in config} \
        if classifier_config else {}
    if args.src_dir:
        log(check_data_fits(args.src_dir, config, classifier_config))
    if dist_util.is_main_process():
        # Stopped or failed before the samples are written: nothing of this run is left in save_dir.
        with removed_on_failure(save_dir, flag="--save_dir"):
            _sample_and_save(args, model, diffusion, config, cond_fn, save_dir, device, classifier_settings)
    else:
        _sample_and_save(args, model, diffusion, config, cond_fn, save_dir, device, classifier_settings)
    dist_util.barrier()
    logger.close()
    dist_util.cleanup()


def _sample_and_save(args, model, diffusion, config, cond_fn, save_dir, device, classifier_settings):
    try:
        logger.configure(save_dir, format_strs=["stdout", "log"])
    except OSError as err:
        raise UserError(f"--save_dir {save_dir}: cannot be created ({err.strerror})")
    logger.log("sampling with " + json.dumps({**vars(args), **config, **classifier_settings}, sort_keys=True))
    num_classes = config["num_classes"]

    images, labels = sample_images(
        model,
        diffusion,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        image_shape=(config["in_channels"], config["image_size"], config["image_size"]),
        class_label=None if args.class_label == -1 else args.class_label,
        num_classes=num_classes,
        class_cond=config["class_cond"],
        use_ddim=args.use_ddim,
        eta=args.eta,
        clip_denoised=args.clip_denoised,
        cond_fn=cond_fn,
        seed=args.seed,
        device=device,
        progress=True,
    )
    if dist_util.is_main_process():
        # The grid is drawn first and both files appear together: no npz without its picture.
        png_path = os.path.join(save_dir, samples_filename(images, "png"))
        with atomic_path(png_path) as png_tmp:
            save_sample_grid(images, labels, png_tmp)
            npz_path = save_samples_npz(images, labels, save_dir)
        logger.log(f"wrote {npz_path} and {png_path}")
