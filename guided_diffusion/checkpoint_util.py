"""Checkpoints together with their configuration.

Every training run writes `args.json` (the complete model and diffusion flags)
next to its checkpoints. Loaders read it back, so a checkpoint is always rebuilt
with the architecture and diffusion it was trained with; flags given on the
command line may only repeat what the file says for anything that defines
shapes or the diffusion, and a disagreement is a one-line error naming the flag.
"""

import json
import os

from . import dist_util
from .cli import UserError, atomic_write_text
from .script_util import (
    classifier_and_diffusion_defaults,
    create_classifier,
    create_model_and_diffusion,
    diffusion_defaults,
    model_and_diffusion_defaults,
)
from .weights import latest_checkpoint, load_weights, parse_step, read_checkpoint  # noqa: F401 (re-exported)

ARGS_FILE = "args.json"

# Flags that may differ between training and use: they change sampling, not the network or the
# trained diffusion.
SAMPLING_ONLY_KEYS = {"timestep_respacing", "use_fp16", "classifier_use_fp16", "use_checkpoint", "dropout"}


def write_args_json(save_dir, config):
    """Write the run's configuration (a flat dict of flags) as `save_dir/args.json`, atomically."""
    atomic_write_text(os.path.join(save_dir, ARGS_FILE), json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_args_json(checkpoint_path, what="--model_path"):
    """The `args.json` beside a checkpoint file (or inside a run directory)."""
    directory = checkpoint_path if os.path.isdir(checkpoint_path) else os.path.dirname(checkpoint_path)
    path = os.path.join(directory or ".", ARGS_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{what} {checkpoint_path}: no {ARGS_FILE} beside it, so its configuration is unknown")
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as err:
        raise UserError(f"{path}: unreadable configuration ({err.strerror or err})") from None
    except ValueError as err:  # JSONDecodeError, or bytes that are not text
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: unreadable configuration (not JSON: {first_line})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: unreadable configuration (expected a JSON object of flags, "
                        f"found {type(config).__name__})")
    return config


def merge_config(saved, args, explicit, keys, source):
    """Configuration for `keys`: the saved value, unless a typed flag differs where that is allowed.

    `args` is the argparse namespace, `explicit` the typed flag names. A typed flag that disagrees with
    the saved value of a shape- or diffusion-defining key is a UserError naming both.
    """
    merged = {}
    for key in keys:
        typed = key in explicit and hasattr(args, key)
        if key in saved:
            value = saved[key]
            if typed and getattr(args, key) != value:
                if key not in SAMPLING_ONLY_KEYS:
                    raise UserError(
                        f"--{key} {getattr(args, key)} disagrees with {source} ({key}={value}); "
                        f"drop the flag or use a matching checkpoint"
                    )
                value = getattr(args, key)
        else:
            value = getattr(args, key) if hasattr(args, key) else None
        merged[key] = value
    return merged


# The diffusion settings that define the noised images x_t (and the t) a classifier sees; the others
# (learn_sigma, use_kl, predict_xstart, ...) concern the DDPM's output only.
NOISING_KEYS = ("diffusion_steps", "noise_schedule", "rescale_timesteps")


def check_same_diffusion(classifier_config, ddpm_config, classifier_source, ddpm_source):
    """A guiding classifier must have been trained on the DDPM's noise levels."""
    for key in NOISING_KEYS:
        a, b = classifier_config.get(key), ddpm_config.get(key)
        if a is not None and b is not None and a != b:
            raise UserError(
                f"classifier {classifier_source} was trained with {key}={a} but the DDPM {ddpm_source} "
                f"uses {key}={b}; train the classifier with --diffusion_config pointing at the DDPM's args.json"
            )


def load_model_and_diffusion(model_path, args=None, explicit=(), device=None, flag="--model_path"):
    """Rebuild the DDPM saved at `model_path` from its args.json and load its weights (eval mode).

    Returns (model, diffusion, config). `args` / `explicit` carry command-line flags that may override
    sampling-only settings such as `--timestep_respacing`.
    """
    if not model_path or not os.path.isfile(model_path):
        raise UserError(f"{flag} {model_path or '(empty)'}: no such checkpoint file")
    saved = read_args_json(model_path, flag)
    keys = list(model_and_diffusion_defaults())
    defaults = model_and_diffusion_defaults()
    config = merge_config({**defaults, **saved}, args, set(explicit), keys, os.path.join(os.path.dirname(model_path), ARGS_FILE))
    model, diffusion = create_model_and_diffusion(**config)
    load_weights(model, model_path, flag)
    if config.get("use_fp16"):
        model.convert_to_fp16()
    model.to(device or dist_util.dev()).eval()
    return model, diffusion, config


def load_classifier(classifier_path, args=None, explicit=(), device=None, flag="--classifier_path"):
    """Rebuild the classifier saved at `classifier_path` from its args.json; returns (classifier, config)."""
    if not classifier_path or not os.path.isfile(classifier_path):
        raise UserError(f"{flag} {classifier_path or '(empty)'}: no such checkpoint file")
    saved = read_args_json(classifier_path, flag)
    defaults = classifier_and_diffusion_defaults()
    classifier_keys = [k for k in defaults if k not in diffusion_defaults()]
    # Typed DDPM flags (the original segmentation command's --learn_sigma True) say nothing about the classifier.
    checked = set(explicit) & (set(classifier_keys) | set(NOISING_KEYS))
    config = merge_config({**defaults, **saved}, args, checked, list(defaults),
                          os.path.join(os.path.dirname(classifier_path), ARGS_FILE))
    classifier = create_classifier(**{k: config[k] for k in classifier_keys})
    load_weights(classifier, classifier_path, flag)
    if config.get("classifier_use_fp16") and hasattr(classifier, "convert_to_fp16"):
        classifier.convert_to_fp16()
    classifier.to(device or dist_util.dev()).eval()
    return classifier, config
