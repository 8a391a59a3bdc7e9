"""A segmentation front end's run, shared by image_p_seg.py and segment_scans.py: the models that --method
needs, loaded and checked against each other, the detector, and the pipeline (`prepare_run`), from the
flags that `command.check_flags` has checked."""

import os
from dataclasses import dataclass

import torch

from .. import dist_util
from ..checkpoint_util import check_same_diffusion, load_classifier, load_model_and_diffusion
from ..cli import UserError
from ..implicit_inputs import checkpoint_from_dir
from ..inference import prepare_for_inference
from ..script_util import diffusion_from_config
from .cam import gap_linear_head
from .detect import SeparabilityGate, TumourDetector
from .methods import METHODS, SaliencySettings, check_steps_fit, create_method
from .pipeline import Pipeline
from .postprocess import MaskOptions

DEFAULT_DETECT_THRESHOLD = 0.5  # when neither --detect_threshold nor --settings gives one


def flag_error(flag, err):
    """The library's ValueError ('param value: why') as one line naming `flag`."""
    text = str(err)
    if text.startswith("--"):  # already names its flag
        return UserError(text)
    param = flag.lstrip("-")
    return UserError(f"{flag}{text[len(param):]}" if text.startswith(param) else f"{flag}: {text}")


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


def load_detector(args, device, config, classifier, classifier_path):
    """The TumourDetector of --detector_path (default: the guiding classifier), checked against the models."""
    flag = "--detector_path" if args.detector_path else "--classifier_path"
    path = args.detector_path or classifier_path or args.classifier_path
    if not path:
        raise UserError("detecting lesions needs a classifier: pass --detector_path (or --classifier_path)")
    if path != classifier_path:
        classifier, detector_config = load_classifier(path, device=device, flag=flag)
        for key in ("image_size", "in_channels", "num_classes"):
            if detector_config.get(key) != config[key]:
                raise UserError(f"{flag} {path}: classifier has {key}={detector_config.get(key)} but "
                                f"the segmentation models have {key}={config[key]}")
    return TumourDetector(classifier), path


@dataclass
class SegmentationRun:
    """What a front end needs to segment: the pipeline (method, detection, noise) and the checkpoints."""

    pipeline: Pipeline
    config: dict
    settings: SaliencySettings
    options: MaskOptions
    classifier_path: str
    detector_path: str
    threshold: float
    settings_file: dict  # what --settings applied ({} without it)
    file_config: object = None  # the SegmentationConfig of --settings (None without it)

    @property
    def method(self):
        return self.pipeline.method

    def summary_settings(self, args, **extra):
        """The settings summary.json records."""
        values = {"model_dir": os.path.abspath(args.model_dir) if getattr(args, "model_dir", "") else "",
                  "model_path": args.model_path, "classifier_path": self.classifier_path, "seed": args.seed,
                  "noise_draws": args.noise_draws, "precision": args.precision, "compile": args.compile,
                  "world_size": dist_util.get_world_size(), **extra}
        if METHODS[args.method].uses_ddpm:
            values.update(noise_level=args.noise_level, steps=args.steps, stride=args.stride,
                          classifier_scale=args.classifier_scale if self.classifier_path else 0.0,
                          healthy_label=args.healthy_label, clip_denoised=args.clip_denoised,
                          abs_map=args.abs_map, diffusion_steps=self.config["diffusion_steps"])
        if self.pipeline.detector is not None:
            gate = self.pipeline.map_gate
            values.update(detector_path=self.detector_path, detect_threshold=self.threshold,
                          min_separability=gate.minimum if gate is not None else 0.0)
        return values


def prepare_run(args, explicit, checked, *, detect, log=print):
    """Models, method and pipeline from the checked flags (`check_flags`), shared by image_p_seg.py and
    segment_scans.py. `detect`: whether a classifier decides which slices are segmented."""
    settings, options, applied, file_config = checked
    device = dist_util.dev()
    model, diffusion, classifier, classifier_path, config = load_models(args, explicit, device)
    if diffusion is not None and METHODS[args.method].uses_tau:
        try:
            check_steps_fit(settings, diffusion.num_timesteps)
        except ValueError as err:
            raise flag_error("--" + str(err).split()[0], err)
    if not 0 <= args.healthy_label < config["num_classes"]:
        raise UserError(f"--healthy_label {args.healthy_label}: the model has classes 0..{config['num_classes'] - 1}")
    detector, detector_path = (load_detector(args, device, config, classifier, classifier_path)
                               if detect else (None, ""))
    threshold = DEFAULT_DETECT_THRESHOLD if args.detect_threshold == -1.0 else args.detect_threshold
    min_separability = 0.0 if args.min_separability == -1.0 else args.min_separability
    map_gate = SeparabilityGate(min_separability, options) if detect and min_separability > 0 else None
    if args.method == "cam" and gap_linear_head(classifier) is None:
        log("cam: the classifier head is not GAP + linear, so CAM is computed in its gradient form (Grad-CAM)")
    if applied:
        source = "" if applied.get("source", "--settings") == "--settings" else f" from {applied['source']}"
        log(f"--settings {args.settings} ({args.choice}){source}: " +
            ", ".join(f"{k} {v}" for k, v in applied["applied"].items()))
    if model is not None:  # a CAM method hooks the raw classifier's layers, so only the diffusion methods change
        setup = prepare_for_inference(model, classifier, precision=args.precision, compile=args.compile, device=device)
        model, classifier = setup.model, setup.classifier
    torch.manual_seed(args.seed)
    method = create_method(args.method, settings, model=model, diffusion=diffusion, classifier=classifier)
    pipeline = Pipeline(method, seed=args.seed, noise_draws=args.noise_draws, detector=detector,
                        threshold=threshold, map_gate=map_gate, device=device)
    return SegmentationRun(pipeline=pipeline, config=config, settings=settings, options=options,
                           classifier_path=classifier_path or "", detector_path=detector_path, threshold=threshold,
                           settings_file=applied, file_config=file_config)
