"""Command-line front ends of the training loops, shared by the training scripts.

`ddpm_main` serves `train_tumor_ddfm.py` (BraTS / demo) and `train_2d_ddfm.py` (abdominal), which
differ only in their defaults; `classifier_main` serves `classifier_tumor_train.py`. Both read the
slice layout `SRC_DIR/{training,validation}/{normal,tumor,seg}`, write `args.json` (the complete
model and diffusion configuration plus the training flags) next to the checkpoints, and resume
with the configuration saved there: a typed flag that disagrees with it is a one-line error naming
the flag.

The flags and their checks are in `train.flags`. Every flag, the data and the network are
checked before anything is written: a mistake is one line `error: ...` naming the flag or path,
exit status 2, and a new --save_dir is not even created. A run that fails before its first
checkpoint removes what it wrote.

One run per folder: training holds the lock of --save_dir (`run_lock.folder_lock`, rank 0) from
before it looks at the folder until it ends; a second run on it stops with one line naming the
holder, exit status 2, having written nothing. A checkpoint that cannot be written (full disk,
quota, file-size limit) stops the run with one line naming the file, the cause and the last
complete checkpoint, exit status 74; `--resume_checkpoint auto` continues from that checkpoint.

Stopping: SIGTERM (`timeout`, `kill`, SLURM's scancel or preemption, Kubernetes) or Ctrl-C (SIGINT),
sent to the main process or to the whole process group, finishes the current step, writes a complete
checkpoint of it, prints one line `stopped by SIGTERM at step N: saved ...` and exits with status
128 + the signal number: 143 for SIGTERM, 130 for Ctrl-C. `--resume_checkpoint auto` then continues
exactly where it stopped (bit for bit on CPU). A second Ctrl-C aborts at once (status 130, without
saving). Status 0 means the run reached --max_steps.
"""

import contextlib
import os
import tempfile

import torch

from . import dist_util, logger
from .checkpoint_util import ARGS_FILE, merge_config, read_args_json, write_args_json
from .cli import (Stopped, UserError, atomic_torch_save, explicit_flags, flag_names, removed_on_failure, require_dir,
                  signal_name)
from .classifier_util import ClassifierTrainLoop
from .resample import create_named_schedule_sampler
from .run_lock import folder_lock
from .script_util import (
    DEFAULT_CHANNEL_MULT,
    classifier_and_diffusion_defaults,
    create_classifier,
    create_model_and_diffusion,
    diffusion_defaults,
    diffusion_from_config,
    model_and_diffusion_defaults,
)
from .train.checkpoints import checkpoint_files, resolve_resume_checkpoint, step_files
from .train.flags import (
    DATASET_IMAGE_SIZE,
    SIZE_DEFAULTS,
    check_train_flags,
    classifier_parser,
    classifier_train_defaults,
    ddpm_parser,
    train_defaults,
)
from .train.loop import TrainLoop
from .train.precision import resolve_amp
from .volumes import parse_int_list


def check_save_dir(save_dir):
    """Check that `save_dir` can be created and written, without creating it."""
    if not save_dir:
        raise UserError("--save_dir is required")
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise UserError(f"--save_dir {save_dir}: is a file, not a folder")
    existing_parent = os.path.abspath(save_dir)
    while not os.path.exists(existing_parent):
        existing_parent = os.path.dirname(existing_parent)
    if not os.path.isdir(existing_parent):
        raise UserError(f"--save_dir {save_dir}: cannot be created, {existing_parent} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing_parent):
            pass
    except OSError as err:
        raise UserError(f"--save_dir {save_dir}: not writable ({err.strerror or err})") from None


def refuse_existing_checkpoints(save_dir):
    """A new run must not overwrite the checkpoints of an earlier run in `save_dir`."""
    existing = step_files(save_dir, "model") if os.path.isdir(save_dir) else []
    if existing:
        raise UserError(
            f"--save_dir {save_dir} already holds checkpoints ({os.path.basename(existing[-1])}); continue that run with "
            f"--resume_checkpoint auto, or choose another --save_dir"
        )


def config_from_flags(args, explicit, keys):
    """The flags in `keys`; an untyped --image_size is the data's (see `default_image_size`)."""
    config = {k: getattr(args, k) for k in keys}
    if "image_size" not in explicit:
        config["image_size"] = default_image_size(args, explicit)
    return config


def default_image_size(args, explicit):
    """The side of --src_dir's images when they are square and the network has a default shape for that
    size (or --channel_mult is typed); otherwise the --dataset's size (brats 224, demo 64, synapse 128)."""
    from .datasets import image_shape, list_slices

    fallback = DATASET_IMAGE_SIZE[args.dataset]
    if not os.path.isdir(os.path.join(args.src_dir, "training")):
        return fallback  # e.g. the original code's abdominal .npy volumes; a missing folder is reported later
    _, height, width = image_shape(list_slices(args.src_dir, args.split)[0][0])
    shaped = height in DEFAULT_CHANNEL_MULT or explicit & {"channel_mult", "classifier_channel_mult"}
    if height != width or not shaped:
        return fallback
    if height != fallback and dist_util.is_main_process():
        print(f"--image_size {height}: the side of the images in {args.src_dir} (type --image_size to resize them)")
    return height


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
    from .train.stream import ShuffledBatches

    require_dir(args.src_dir, "--src_dir")
    if getattr(args, "class_index", "") and _holds_volumes(args.src_dir):
        indices = parse_int_list(str(args.class_index), "--class_index")
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
        atomic_torch_save(state, os.path.join(directory, f"params-rank{dist_util.get_rank()}.pt"))


def _parse(parser, argv):
    """The flags (checked), the names of those typed, and the EMA rates."""
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    return args, explicit, check_train_flags(args, argv)


@contextlib.contextmanager
def _training_folder(args, ema_rates):
    """Distributed setup, the checks of --src_dir and --save_dir, and the lock of --save_dir, held while
    the block runs; yields the checkpoint to resume from (or None).

    The lock comes before anything in the folder is looked at: a second run on it stops here, having
    written nothing. A broken checkpoint that `auto` sets aside is renamed under the lock.
    """
    dist_util.setup_dist()
    require_dir(args.src_dir, "--src_dir")
    check_save_dir(args.save_dir)
    with folder_lock(args.save_dir, "--save_dir"):
        if not args.resume_checkpoint:
            refuse_existing_checkpoints(args.save_dir)
        yield resolve_resume_checkpoint(args.resume_checkpoint, args.save_dir, ema_rates)


def _train(args, saved_config, make_loop, message):
    """Create --save_dir, write args.json and the log, build the loop with `make_loop()` and run it.

    Everything the command line can get wrong has been checked by now. Should the run still fail
    before its first checkpoint, what it wrote is removed again (a new --save_dir as well). A run
    stopped by a signal has saved the step it was on; that is reported as `Stopped` (exit 128 + signal).
    """
    loop = None
    main = dist_util.is_main_process()
    guard = removed_on_failure(args.save_dir, keep=lambda: loop is not None and loop.last_saved is not None,
                               flag="--save_dir") if main else _made_dir(args.save_dir)
    with guard:
        dist_util.barrier()
        if main:
            write_args_json(args.save_dir, saved_config)
        logger.configure(dir=args.save_dir)
        logger.log(message)
        loop = make_loop()
        loop.run_loop()
    _dump_params(loop.model, args.dump_final_params)
    dist_util.barrier()
    if loop.stop_requested:
        saved = checkpoint_files(args.save_dir, loop.last_saved, loop.ema_rates)["model"]
        raise Stopped(loop.stop_signal or 15, f"stopped by {signal_name(loop.stop_signal)} at step {loop.step}: "
                                              f"saved {saved}; continue with --resume_checkpoint auto")
    return loop


def _schedule_sampler(args, diffusion):
    """The sampler of --schedule_sampler and --max_noise_level (its errors naming the flag)."""
    with flag_names({"name": "--schedule_sampler"}):
        return create_named_schedule_sampler(args.schedule_sampler, diffusion, args.max_noise_level)


class _made_dir:
    """Other ranks: wait for rank 0 to create the folder (the barrier is inside the block)."""

    def __init__(self, directory):
        self.directory = directory

    def __enter__(self):
        return self.directory

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------
# The DDPM


def ddpm_main(argv=None, *, description, **overrides):
    """Train the class-conditional DDPM from the command line `argv` (see `ddpm_parser`)."""
    args, explicit, ema_rates = _parse(ddpm_parser(description, **overrides), argv)
    with _training_folder(args, ema_rates) as resume_path:
        keys = list(model_and_diffusion_defaults())
        config = with_size_defaults(config_from_flags(args, explicit, keys), explicit)
        config = resumed_config(config, resume_path, args, explicit, keys)

        data = build_data(args, config, args.split, config["class_cond"])
        torch.manual_seed(args.seed)  # the same initial weights for the same --seed
        model, diffusion = create_model_and_diffusion(**config)
        sampler = _schedule_sampler(args, diffusion)
        resolve_amp(args.amp, config["use_fp16"], dist_util.dev())

        def make_loop():
            return TrainLoop(
                model=model, diffusion=diffusion, data=data, schedule_sampler=sampler,
                batch_size=args.batch_size, microbatch=args.microbatch, lr=args.lr, ema_rate=args.ema_rate,
                log_interval=args.log_interval, save_interval=args.save_interval, resume_checkpoint=resume_path or "",
                save_dir=args.save_dir, use_fp16=config["use_fp16"], amp=args.amp,
                fp16_scale_growth=args.fp16_scale_growth, weight_decay=args.weight_decay,
                lr_anneal_steps=args.lr_anneal_steps, max_steps=args.max_steps, seed=args.seed,
                channels_last=args.channels_last,
            )

        saved = {**config, **_train_flags(args, {**train_defaults(), **overrides})}
        return _train(args, saved, make_loop,
                      f"training a DDPM on {args.src_dir} with {dist_util.get_world_size()} process(es)")


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
    args, explicit, ema_rates = _parse(classifier_parser(description, **overrides), argv)
    with _training_folder(args, ema_rates) as resume_path:
        config = classifier_config(args, explicit, resume_path)

        data = build_data(args, config, args.split, class_cond=True)
        val_dataset = None
        if args.eval_interval > 0:
            from .datasets import SliceDataset

            val_dataset = SliceDataset(args.src_dir, split=args.val_split, image_size=config["image_size"],
                                       in_channels=config["in_channels"])
        classifier_keys = [k for k in classifier_and_diffusion_defaults() if k not in diffusion_defaults()]
        torch.manual_seed(args.seed)
        model = create_classifier(**{k: config[k] for k in classifier_keys})
        diffusion = diffusion_from_config(config)  # the full chain: classifier_config clears the respacing
        sampler = _schedule_sampler(args, diffusion)
        resolve_amp(args.amp, config["classifier_use_fp16"], dist_util.dev())

        def make_loop():
            return ClassifierTrainLoop(
                model=model, diffusion=diffusion, data=data, noised=args.noised, schedule_sampler=sampler,
                val_dataset=val_dataset, eval_interval=args.eval_interval, val_max_images=args.val_max_images,
                max_noise_level=args.max_noise_level,
                batch_size=args.batch_size, microbatch=args.microbatch, lr=args.lr, ema_rate=args.ema_rate,
                log_interval=args.log_interval, save_interval=args.save_interval, resume_checkpoint=resume_path or "",
                save_dir=args.save_dir, use_fp16=config["classifier_use_fp16"], amp=args.amp,
                initial_lg_loss_scale=16.0, weight_decay=args.weight_decay,
                lr_anneal_steps=args.max_steps if args.anneal_lr else 0, max_steps=args.max_steps, seed=args.seed,
                channels_last=args.channels_last,
            )

        saved = {**config, **_train_flags(args, {**classifier_train_defaults(), **overrides})}
        return _train(args, saved, make_loop, f"training a {config['model_type']} classifier on {args.src_dir} "
                                              f"with {dist_util.get_world_size()} process(es)")
