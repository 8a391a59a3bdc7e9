"""Command-line front ends of the training loops, shared by the training scripts.

`ddpm_main` serves `train_tumor_ddfm.py` (BraTS / demo) and `train_2d_ddfm.py` (abdominal), which
differ only in their defaults; `classifier_main` serves `classifier_tumor_train.py`. Both read the
slice layout `SRC_DIR/{training,validation}/{normal,tumor,seg}`, write `args.json` (the complete
model and diffusion configuration plus the training flags) next to the checkpoints, and resume
with the configuration saved there: a typed flag that disagrees with it is a one-line error naming
the flag.
"""

import argparse
import os
import tempfile

import torch

from . import dist_util, logger
from .checkpoint_util import ARGS_FILE, explicit_flags, merge_config, read_args_json, write_args_json
from .cli import UserError, require_dir
from .classifier_util import ClassifierTrainLoop
from .resample import create_named_schedule_sampler
from .script_util import (
    add_dict_to_argparser,
    classifier_and_diffusion_defaults,
    create_classifier,
    create_gaussian_diffusion,
    create_model_and_diffusion,
    diffusion_defaults,
    model_and_diffusion_defaults,
    str2bool,
)
from .train_util import AMP_CHOICES, TrainLoop, parse_ema_rates, resolve_resume_checkpoint

DATASETS = ("brats", "demo", "synapse")
# Image size used when --image_size is not given.
DATASET_IMAGE_SIZE = {"brats": 224, "demo": 64, "synapse": 128}
# At 224 px the feature maps are 224,112,56,28,14,7, so the usual "16,8" / "32,16,8" never occur;
# these are the same depths in the network (downsampling by 8, 16, 32).
SIZE_DEFAULTS = {224: {"attention_resolutions": "28,14", "classifier_attention_resolutions": "28,14,7"}}

TRAIN_HELP = {
    "src_dir": "dataset root holding training/{normal,tumor} (and validation/) slice folders",
    "save_dir": "where checkpoints, args.json, log.txt, progress.csv and loss_curve.png go",
    "dataset": "brats, demo or synapse; sets the default --image_size (224, 64, 128)",
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
    "fp16_scale_growth": "log2 loss-scale growth per good step with --use_fp16",
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


def add_train_flags(parser, defaults, aliases=None, helps=None):
    """Add `--key` for each training default, with help text; booleans parse True/False."""
    aliases = aliases or {}
    helps = {**TRAIN_HELP, **(helps or {})}
    for key, value in defaults.items():
        kind = str2bool if isinstance(value, bool) else type(value)
        names = [f"--{key}"] + aliases.get(key, [])
        choices = {"dataset": DATASETS, "amp": AMP_CHOICES}.get(key)
        parser.add_argument(*names, dest=key, default=value, type=kind, choices=choices,
                            help=f"{helps[key]} (default: {value!r})")


def ddpm_parser(description, **overrides):
    parser = argparse.ArgumentParser(description=description)
    add_train_flags(parser, {**train_defaults(), **overrides})
    add_dict_to_argparser(parser, model_and_diffusion_defaults())
    return parser


def classifier_parser(description, **overrides):
    parser = argparse.ArgumentParser(description=description)
    add_train_flags(parser, {**classifier_train_defaults(), **overrides}, aliases={"max_steps": ["--iterations"]},
                    helps={"max_steps": "number of training steps (also --iterations)"})
    add_dict_to_argparser(parser, classifier_and_diffusion_defaults())
    return parser


# ---------------------------------------------------------------------------------------------
# Shared setup


def prepare_save_dir(save_dir, resuming):
    """Create `save_dir` and check it is writable; refuse to overwrite another run's checkpoints."""
    if not save_dir:
        raise UserError("--save_dir is required")
    try:
        os.makedirs(save_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=save_dir):
            pass
    except OSError as err:
        raise UserError(f"--save_dir {save_dir}: not writable ({err.strerror or err})")
    existing = sorted(n for n in os.listdir(save_dir) if n.startswith("model") and n.endswith(".pt"))
    if existing and not resuming:
        raise UserError(
            f"--save_dir {save_dir} already holds checkpoints ({existing[-1]}); continue that run with "
            f"--resume_checkpoint auto, or choose another --save_dir"
        )


def config_from_flags(args, explicit, keys):
    """The flags in `keys`, with the dataset's image size when --image_size is not typed."""
    config = {k: getattr(args, k) for k in keys}
    if "image_size" not in explicit:
        config["image_size"] = DATASET_IMAGE_SIZE[args.dataset]
    return config


def with_size_defaults(config, explicit):
    """Attention resolutions that exist at the configured image size, unless typed."""
    for key, value in SIZE_DEFAULTS.get(config["image_size"], {}).items():
        if key in config and key not in explicit:
            config[key] = value
    return config


def resumed_config(config, resume_path, args, explicit, keys):
    """On resume, the configuration saved beside the checkpoint (typed flags must agree with it)."""
    if resume_path is None:
        return config
    args_file = os.path.join(os.path.dirname(resume_path), ARGS_FILE)
    if not os.path.isfile(args_file):
        logger.log(f"warning: no {ARGS_FILE} beside {resume_path}; using the flags as given")
        return config
    saved = read_args_json(resume_path, "--resume_checkpoint")
    return merge_config({**config, **saved}, args, explicit, keys, args_file)


def build_data(args, config, split, class_cond):
    """The training stream over `split` of --src_dir, after checking the labels it holds.

    With `--class_index` (the abdominal script) a --src_dir of the original code's `.npy` volumes
    (Z, 2, H, W) is read too: a slice is labelled 1 when one of those organ labels is present.
    """
    from .datasets import SliceDataset, VolumeSliceDataset, list_slices, resolve_split_dir
    from .train_util import ShuffledBatches

    require_dir(args.src_dir, "--src_dir")
    if getattr(args, "class_index", "") and _holds_volumes(args.src_dir):
        indices = tuple(int(c) for c in str(args.class_index).split(",") if c.strip())
        dataset = VolumeSliceDataset(args.src_dir, image_size=config["image_size"], class_indices=indices)
        labels, where = set(dataset.labels()), f"no slice of {args.src_dir} with --class_index {args.class_index}"
    else:
        files = list_slices(args.src_dir, split)
        dataset = SliceDataset(args.src_dir, split=split, image_size=config["image_size"],
                               in_channels=config["in_channels"], files=files)
        labels = {label for _, label in files}
        where = os.path.join(resolve_split_dir(args.src_dir, split), "tumor" if 1 not in labels else "normal")
        where = f"{where} holds no images"
    if class_cond and len(labels) < 2:
        raise UserError(f"--src_dir {args.src_dir}: {where}, but a class-conditional model needs both classes "
                        f"(or pass --class_cond False)")
    if max(labels) >= config["num_classes"]:
        raise UserError(f"--num_classes {config['num_classes']}: the data has label {max(labels)}")
    return ShuffledBatches(dataset, args.batch_size, seed=args.seed, num_workers=args.workers,
                           class_cond=class_cond, pin_memory=torch.cuda.is_available())


def _holds_volumes(src_dir):
    return not os.path.isdir(os.path.join(src_dir, "training")) and any(
        f.endswith(".npy") for f in os.listdir(src_dir))


def _train_flags(args, keys):
    return {k: getattr(args, k) for k in keys if k not in ("dump_final_params",)}


def _dump_params(model, directory):
    """Diagnostics for data-parallel runs: each process writes the parameters it ended with."""
    if directory:
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(directory, f"params-rank{dist_util.get_rank()}.pt"))


def _start(args, ema_rates):
    """Distributed setup, output folder and logger; returns the checkpoint to resume from (or None)."""
    if not 0 < args.max_noise_level <= 1:
        raise UserError(f"--max_noise_level {args.max_noise_level}: expected a fraction in (0, 1]")
    dist_util.setup_dist()
    require_dir(args.src_dir, "--src_dir")
    resume_path = None
    if args.resume_checkpoint:
        resume_path = resolve_resume_checkpoint(args.resume_checkpoint, args.save_dir, ema_rates)
    prepare_save_dir(args.save_dir, resuming=bool(args.resume_checkpoint))
    dist_util.barrier()
    logger.configure(dir=args.save_dir)
    return resume_path


# ---------------------------------------------------------------------------------------------
# The DDPM


def ddpm_main(argv=None, *, description, **overrides):
    """Train the class-conditional DDPM from the command line `argv` (see `ddpm_parser`)."""
    parser = ddpm_parser(description, **overrides)
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    ema_rates = parse_ema_rates(args.ema_rate)
    resume_path = _start(args, ema_rates)
    keys = list(model_and_diffusion_defaults())
    config = with_size_defaults(config_from_flags(args, explicit, keys), explicit)
    config = resumed_config(config, resume_path, args, explicit, keys)
    if dist_util.is_main_process():
        write_args_json(args.save_dir, {**config, **_train_flags(args, {**train_defaults(), **overrides})})
    logger.log(f"training a DDPM on {args.src_dir} with {dist_util.get_world_size()} process(es)")

    data = build_data(args, config, args.split, config["class_cond"])
    torch.manual_seed(args.seed)  # the same initial weights for the same --seed
    model, diffusion = create_model_and_diffusion(**config)
    loop = TrainLoop(
        model=model, diffusion=diffusion, data=data,
        schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion, args.max_noise_level),
        batch_size=args.batch_size, microbatch=args.microbatch, lr=args.lr, ema_rate=args.ema_rate,
        log_interval=args.log_interval, save_interval=args.save_interval, resume_checkpoint=resume_path or "",
        save_dir=args.save_dir, use_fp16=config["use_fp16"], amp=args.amp,
        fp16_scale_growth=args.fp16_scale_growth, weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps, max_steps=args.max_steps, seed=args.seed,
        channels_last=args.channels_last,
    )
    loop.run_loop()
    _dump_params(loop.model, args.dump_final_params)
    dist_util.barrier()
    return loop


# ---------------------------------------------------------------------------------------------
# The classifier

# What a guiding classifier must share with its DDPM.
DDPM_SHARED_KEYS = list(diffusion_defaults()) + ["image_size", "in_channels", "num_classes"]


def classifier_config(args, explicit, resume_path):
    """Classifier + diffusion configuration: flags, the DDPM's args.json, and a resumed run's args.json."""
    keys = list(classifier_and_diffusion_defaults())
    config = config_from_flags(args, explicit, keys)
    ddpm = None
    if args.diffusion_config:
        source = args.diffusion_config
        if os.path.isdir(source):
            source = os.path.join(source, ARGS_FILE)
        if not os.path.isfile(source):
            raise UserError(f"--diffusion_config {args.diffusion_config}: no such file (expected the DDPM's {ARGS_FILE})")
        ddpm = read_args_json(source, "--diffusion_config")
        shared = [k for k in DDPM_SHARED_KEYS if k in ddpm]
        config.update(merge_config(ddpm, args, explicit, shared, source))
    config = with_size_defaults(config, explicit)
    resumed = resumed_config(config, resume_path, args, explicit, keys)
    if ddpm is not None:
        for key in DDPM_SHARED_KEYS:
            if key in ddpm and resumed[key] != config[key]:
                raise UserError(
                    f"--resume_checkpoint {resume_path}: the classifier was trained with {key}={resumed[key]} but "
                    f"--diffusion_config {args.diffusion_config} has {key}={config[key]}"
                )
    # Training noises with the full chain; respacing is a sampling-time choice.
    return {**resumed, "timestep_respacing": ""}


def classifier_main(argv=None, *, description, **overrides):
    """Train the noise-conditioned classifier from the command line `argv` (see `classifier_parser`)."""
    parser = classifier_parser(description, **overrides)
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    ema_rates = parse_ema_rates(args.ema_rate)
    resume_path = _start(args, ema_rates)
    config = classifier_config(args, explicit, resume_path)
    if dist_util.is_main_process():
        flags = _train_flags(args, {**classifier_train_defaults(), **overrides})
        write_args_json(args.save_dir, {**config, **flags})
    logger.log(f"training a {config['model_type']} classifier on {args.src_dir} "
               f"with {dist_util.get_world_size()} process(es)")

    data = build_data(args, config, args.split, class_cond=True)
    val_dataset = None
    if args.eval_interval > 0:
        from .datasets import SliceDataset

        val_dataset = SliceDataset(args.src_dir, split=args.val_split, image_size=config["image_size"],
                                   in_channels=config["in_channels"])
    classifier_keys = [k for k in classifier_and_diffusion_defaults() if k not in diffusion_defaults()]
    torch.manual_seed(args.seed)
    model = create_classifier(**{k: config[k] for k in classifier_keys})
    diffusion = create_gaussian_diffusion(
        steps=config["diffusion_steps"], learn_sigma=config["learn_sigma"], noise_schedule=config["noise_schedule"],
        use_kl=config["use_kl"], predict_xstart=config["predict_xstart"],
        rescale_timesteps=config["rescale_timesteps"], rescale_learned_sigmas=config["rescale_learned_sigmas"],
    )
    loop = ClassifierTrainLoop(
        model=model, diffusion=diffusion, data=data, noised=args.noised,
        schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion, args.max_noise_level),
        val_dataset=val_dataset, eval_interval=args.eval_interval, val_max_images=args.val_max_images,
        max_noise_level=args.max_noise_level,
        batch_size=args.batch_size, microbatch=args.microbatch, lr=args.lr, ema_rate=args.ema_rate,
        log_interval=args.log_interval, save_interval=args.save_interval, resume_checkpoint=resume_path or "",
        save_dir=args.save_dir, use_fp16=config["classifier_use_fp16"], amp=args.amp,
        initial_lg_loss_scale=16.0, weight_decay=args.weight_decay,
        lr_anneal_steps=args.max_steps if args.anneal_lr else 0, max_steps=args.max_steps, seed=args.seed,
        channels_last=args.channels_last,
    )
    loop.run_loop()
    _dump_params(loop.model, args.dump_final_params)
    dist_util.barrier()
    return loop
