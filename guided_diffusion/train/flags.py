"""Flags of the training commands: their defaults, help text and choices, and the checks that
name the first flag that cannot work (before anything is read or written)."""

import math
import sys

from ..cli import ArgumentParser, UserError, add_flags
from ..script_util import FLAG_ALIASES, FLAG_HELP, classifier_and_diffusion_defaults, model_and_diffusion_defaults
from ..volumes import parse_int_list
from .loop import parse_ema_rates
from .precision import AMP_CHOICES

DATASETS = ("brats", "demo", "synapse")
# Image size used when --image_size is not given and the data do not give it (train_cli.default_image_size).
DATASET_IMAGE_SIZE = {"brats": 224, "demo": 64, "synapse": 128}
# At 224 px the feature maps are 224,112,56,28,14,7, so the usual "16,8" / "32,16,8" never occur;
# these are the same depths in the network (downsampling by 8, 16, 32).
SIZE_DEFAULTS = {224: {"attention_resolutions": "28,14", "classifier_attention_resolutions": "28,14,7"}}

TRAIN_HELP = {
    "src_dir": "dataset root holding training/{normal,tumor} (and validation/) slice folders",
    "save_dir": "where checkpoints, args.json, log.txt, progress.csv and loss_curve.png go",
    "dataset": "brats, demo or synapse; when --image_size is not typed it is the side of the --src_dir images "
               "(square, a size with a default channel_mult), else this dataset's size (224, 64, 128)",
    "split": "subfolder of --src_dir to train on",
    "schedule_sampler": "how training timesteps are drawn: uniform or loss-second-moment",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "lr_anneal_steps": "decay the learning rate linearly to 0 over this many steps and stop there (0: constant)",
    "max_steps": "stop after this many steps (0: at --lr_anneal_steps, or never)",
    "batch_size": "images per step on each process",
    "microbatch": "split each batch into pieces of this size to save memory (-1: no split); same gradient",
    "ema_rate": "comma-separated EMA rates, one ema_{rate}_{step}.pt per rate (empty: no EMA)",
    "log_interval": "write the averaged losses to progress.csv every this many steps",
    "save_interval": "write a checkpoint every this many steps (and always at the end)",
    "resume_checkpoint": "model{step}.pt to resume from, or 'auto' for the newest complete one in --save_dir",
    "amp": "mixed precision: auto (bf16/fp16 on GPU, none on CPU), none, fp16 (CUDA, loss scaling) or bf16",
    "fp16_scale_growth": "log2 loss-scale growth per good step with float16 (the scale doubles after 1/x good steps)",
    "seed": "seed of the data order, timesteps and noise (a resumed run continues the same sequence)",
    "workers": "data-loading worker processes per training process",
    "channels_last": "channels-last memory format (can be faster on GPU)",
    "dump_final_params": "diagnostics: every process writes its final parameters to DIR/params-rank{r}.pt",
    "noised": "train on images noised to a random diffusion timestep (False: clean images, t=0)",
    "anneal_lr": "decay the learning rate linearly to 0 over --iterations",
    "eval_interval": "validate every this many steps (0: never)",
    "val_split": "subfolder of --src_dir used for validation",
    "val_max_images": "validate on at most this many images (a fixed random subset)",
    "max_noise_level": "train (and validate) on timesteps t < this fraction of T only (1: the whole chain); "
    "CDM / CG-CDM only evaluate the models at t <= --noise_level, so 0.25 of T = 4000 covers Q = 400 with margin; "
    "a DDPM trained so cannot sample from pure noise",
    "diffusion_config": "the DDPM's args.json: its diffusion, image size, channels and classes are used",
    "class_index": "for a --src_dir of .npy volumes (Z, 2, H, W): organ label(s) that make a slice positive, "
                   "comma-separated (2,3 = both kidneys)",
}


def train_defaults():
    """Training flags of the DDPM scripts (the seed's names, safer values where the seed's lost work)."""
    return dict(
        src_dir="",
        save_dir="runs/ddpm",
        dataset="brats",
        split="training",
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        max_steps=0,
        batch_size=8,
        microbatch=-1,
        ema_rate="0.9999",
        log_interval=10,
        save_interval=1000,
        resume_checkpoint="",
        amp="auto",
        fp16_scale_growth=1e-3,
        seed=0,
        workers=2,
        channels_last=False,
        max_noise_level=1.0,
        dump_final_params="",
    )


def classifier_train_defaults():
    """Training flags of the classifier script."""
    defaults = train_defaults()
    for key in ("lr_anneal_steps", "fp16_scale_growth"):
        defaults.pop(key)
    defaults.update(
        save_dir="runs/classifier",
        diffusion_config="",
        noised=True,
        max_steps=150000,
        lr=3e-4,
        anneal_lr=False,
        batch_size=16,
        ema_rate="",
        eval_interval=100,
        val_split="validation",
        val_max_images=512,
    )
    return defaults


TRAIN_CHOICES = {"dataset": DATASETS, "amp": AMP_CHOICES}


def ddpm_parser(description, **overrides):
    parser = ArgumentParser(description=description, allow_abbrev=False)
    add_flags(parser, {**train_defaults(), **overrides}, help=TRAIN_HELP, choices=TRAIN_CHOICES)
    add_flags(parser, model_and_diffusion_defaults(), help=FLAG_HELP, aliases=FLAG_ALIASES)
    return parser


def classifier_parser(description, **overrides):
    parser = ArgumentParser(description=description, allow_abbrev=False)
    helps = {**TRAIN_HELP, "max_steps": "number of training steps (also --iterations; 0: never stop)",
             "val_max_images": "validate on at most this many images (a fixed random subset; 0: all)"}
    add_flags(parser, {**classifier_train_defaults(), **overrides}, help=helps, choices=TRAIN_CHOICES,
              aliases={"max_steps": ["--iterations"]})
    add_flags(parser, classifier_and_diffusion_defaults(), help=FLAG_HELP, aliases=FLAG_ALIASES)
    return parser


# ---------------------------------------------------------------------------------------------
# Checks


def check_train_flags(args, argv=None):
    """UserError naming the first training flag that cannot work; nothing has been read or written yet.

    `argv` tells which spelling of an aliased flag was typed (--iterations or --max_steps).
    """
    typed = {t.split("=", 1)[0] for t in (sys.argv[1:] if argv is None else argv) if t.startswith("--")}
    names = {"max_steps": "--iterations"} if "--iterations" in typed else {}

    def require(ok, flag, value, what):
        if not ok:
            raise UserError(f"{flag} {value}: {what}")

    def number(name, low, what, strict=False):
        value = getattr(args, name)
        good = math.isfinite(value) and (value > low if strict else value >= low)
        require(good, names.get(name, f"--{name}"), value, what)

    number("batch_size", 1, "must be at least 1")
    mb = args.microbatch
    require(mb == -1 or mb >= 1, "--microbatch", mb, "must be positive, or -1 for no split")
    if mb != -1:
        require(mb <= args.batch_size and args.batch_size % mb == 0, "--microbatch", mb,
                f"must divide --batch_size {args.batch_size} (or -1 for no split)")
    number("lr", 0, "the learning rate must be a positive number", strict=True)
    number("weight_decay", 0, "must be a non-negative number")
    number("max_steps", 0, "must be a non-negative number of steps (0: no limit)")
    number("log_interval", 1, "must be at least 1")
    number("save_interval", 1, "must be at least 1")
    number("seed", 0, "must be a non-negative integer")
    require(args.seed < 2**63, "--seed", args.seed, "must be below 2**63")
    number("workers", 0, "must be 0 (load in the main process) or a number of worker processes")
    require(0 < args.max_noise_level <= 1, "--max_noise_level", args.max_noise_level, "expected a fraction in (0, 1]")
    require(args.split in SPLIT_NAMES, "--split", repr(args.split), f"expected one of {', '.join(SPLIT_NAMES)}")
    require(args.schedule_sampler in SAMPLERS, "--schedule_sampler", repr(args.schedule_sampler),
            f"expected one of {', '.join(SAMPLERS)}")
    if hasattr(args, "lr_anneal_steps"):
        number("lr_anneal_steps", 0, "must be a non-negative number of steps (0: constant learning rate)")
    if hasattr(args, "fp16_scale_growth"):
        number("fp16_scale_growth", 0, "must be a non-negative number")
    if hasattr(args, "eval_interval"):
        number("eval_interval", 0, "must be a non-negative number of steps (0: never validate)")
        number("val_max_images", 0, "must be a non-negative number of images (0: all)")
        require(args.val_split in SPLIT_NAMES, "--val_split", repr(args.val_split),
                f"expected one of {', '.join(SPLIT_NAMES)}")
        require(not (args.anneal_lr and args.max_steps == 0), "--anneal_lr", True,
                "needs a number of steps to anneal over: pass --iterations N with N > 0")
    if getattr(args, "class_index", ""):
        indices = parse_int_list(str(args.class_index), "--class_index")
        require(indices and min(indices) >= 1, "--class_index", repr(args.class_index),
                "expected organ labels >= 1, e.g. 1 or 2,3")
    return parse_ema_rates(args.ema_rate)


SPLIT_NAMES = ("training", "validation")
SAMPLERS = ("uniform", "loss-second-moment")
