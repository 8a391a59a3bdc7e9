"""What the recipe checks and says before it starts: it refuses data too small to train on
(`check_raw_subjects`, `check_prepared`) and estimates each stage's time from one training step of each
network and one guided pass measured on this machine (`estimate_lines`)."""

import os
import time

from .cli import UserError, str2bool

MIN_SUBJECTS = 4  # the smallest data set the recipe trains on: at least 3 to learn from and 1 to check on


def _too_small(where, counts, val_fraction=None):
    total = sum(counts.values())
    training, validation = counts.get("training", 0), counts.get("validation", 0)
    if total >= MIN_SUBJECTS and validation >= 1 and training >= MIN_SUBJECTS - 1:
        return
    split = f" with --val_fraction {val_fraction:g}" if val_fraction is not None else ""
    raise UserError(f"{where}: {total} subject(s), {training} for training and {validation} for validation{split}; "
                    f"the recipe needs at least {MIN_SUBJECTS} subjects, {MIN_SUBJECTS - 1} to train on and 1 to "
                    f"validate on")


def check_raw_subjects(input_dir, modalities, val_fraction, seed):
    """Refuse raw data too small to train on, before anything runs. Folders that are not BraTS-style
    subjects (another layout prepare_brats.py reads) are counted after the prepare stage instead."""
    from .volumes import find_brats_cases, split_subjects

    if not os.path.isdir(input_dir):
        raise UserError(f"--input_dir {input_dir}: no such directory")
    folders = [d for d in os.listdir(input_dir) if not d.startswith(".") and os.path.isdir(os.path.join(input_dir, d))]
    if not folders:
        raise UserError(f"--input_dir {input_dir}: no subjects (expected one folder per subject, as "
                        f"scripts/prepare_brats.py reads); the recipe needs at least {MIN_SUBJECTS}")
    try:
        cases = find_brats_cases(input_dir, modalities)
    except UserError:
        return None  # not (only) BraTS-style subject folders: prepare_brats.py reads or refuses them
    split = split_subjects([c.subject for c in cases], val_fraction, seed)
    counts = {s: sum(v == s for v in split.values()) for s in ("training", "validation")}
    _too_small(f"--input_dir {input_dir}", counts, val_fraction)
    return counts


def check_prepared(slices, where):
    """Refuse a prepared dataset too small to train on (from its dataset.json's subjects); `where` names
    it in the message. Returns the subjects per split and the validation tumour slices, or None."""
    from .volumes import read_settings

    settings = read_settings(slices)
    subjects = settings.get("subjects")
    if not isinstance(subjects, dict):
        return None  # a hand-made layout: the training scripts check its images
    counts = {s: len(v) for s, v in subjects.items()}
    _too_small(where, counts)
    validation = (settings.get("counts") or {}).get("validation") or {}
    return {**counts, "validation_tumor_slices": validation.get("tumor", 0)}


def _typed(defaults, flags):
    """The flags that are network or diffusion settings, with the type of their default."""
    typed = {}
    for key, value in flags.items():
        if key not in defaults or value is None or isinstance(value, list):
            continue
        default = defaults[key]
        if isinstance(default, bool):
            typed[key] = str2bool(value) if isinstance(value, str) else bool(value)
        elif isinstance(default, (int, float)) and not isinstance(value, (int, float)):
            typed[key] = type(default)(float(value)) if isinstance(default, int) else float(value)
        else:
            typed[key] = value
    return typed


def _timed(step, device, repeats=1):
    import torch

    step()  # warm-up: allocation, kernel choice
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - began) / repeats


def measure_throughput(ddpm_flags, classifier_flags):
    """Measured on this machine with random inputs, after one warm-up step: images per second of a DDPM
    and a classifier training step, and seconds per image of one guided denoising pass (the UNet on both
    branches, the classifier's gradient). Returns (rates, device name, batch sizes used)."""
    import torch
    import torch.nn.functional as F

    from .script_util import (classifier_and_diffusion_defaults, classifier_defaults, create_classifier,
                              create_model_and_diffusion, model_and_diffusion_defaults)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ddpm_config = {**model_and_diffusion_defaults(), **_typed(model_and_diffusion_defaults(), ddpm_flags)}
    classifier_config = {**classifier_and_diffusion_defaults(),
                         **_typed(classifier_and_diffusion_defaults(), classifier_flags),
                         **{k: ddpm_config[k] for k in ("image_size", "in_channels", "num_classes")}}
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**ddpm_config)
    classifier = create_classifier(**{k: classifier_config[k] for k in classifier_defaults()})
    model.to(device).train()
    classifier.to(device).train()
    # full batches on a GPU (small ones leave it idle); on a CPU the time grows with the images, so fewer do
    ddpm_batch = int(float(ddpm_flags.get("batch_size", 8)))
    classifier_batch = int(float(classifier_flags.get("batch_size", 8)))
    if device.type == "cpu":
        ddpm_batch, classifier_batch = min(ddpm_batch, 2), min(classifier_batch, 2)
    size, channels = ddpm_config["image_size"], ddpm_config["in_channels"]
    t_max = max(1, int(diffusion.num_timesteps * float(ddpm_flags.get("max_noise_level", 1.0))))

    def batch(n):
        x = torch.randn(n, channels, size, size, device=device)
        return x, torch.randint(0, 2, (n,), device=device), torch.randint(0, t_max, (n,), device=device)

    ddpm_opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    classifier_opt = torch.optim.AdamW(classifier.parameters(), lr=1e-4)
    x, y, t = batch(ddpm_batch)

    def ddpm_step():
        ddpm_opt.zero_grad()
        diffusion.training_losses(model, x, t, model_kwargs={"y": y})["loss"].mean().backward()
        ddpm_opt.step()

    xc, yc, tc = batch(classifier_batch)

    def classifier_step():
        classifier_opt.zero_grad()
        F.cross_entropy(classifier(diffusion.q_sample(xc, tc), tc), yc).backward()
        classifier_opt.step()

    model.eval()
    classifier.eval()
    xg, yg, tg = batch(ddpm_batch)

    def guided_pass():
        with torch.no_grad():
            model(torch.cat([xg, xg]), torch.cat([tg, tg]), y=torch.cat([yg, 1 - yg]))
        inputs = xg.detach().requires_grad_(True)
        log_probs = F.log_softmax(classifier(inputs, tg), dim=-1)
        torch.autograd.grad(log_probs[range(len(yg)), yg].sum(), inputs)

    model.train()
    classifier.train()
    rates = {"ddpm_images_per_s": ddpm_batch / _timed(ddpm_step, device),
             "classifier_images_per_s": classifier_batch / _timed(classifier_step, device)}
    model.eval()
    classifier.eval()
    rates["guided_pass_s_per_image"] = _timed(guided_pass, device) / ddpm_batch
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return rates, name, (ddpm_batch, classifier_batch)


def ablation_passes(flags):
    """Guided passes per image of scripts/ablation.py's grid (an upper bound: CDM points skip the classifier)."""
    from .segment.study import StudyGrid

    grid = StudyGrid()

    def numbers(key, default):
        value = flags.get(key)
        return tuple(float(v) for v in str(value).split(",") if v.strip()) if value is not None else default

    levels, record = numbers("noise_levels", grid.noise_levels), numbers("record_steps", grid.record_steps)
    taus_scales = numbers("scales", grid.scales)
    draws, draw_steps = numbers("noise_draws", grid.noise_draws), numbers("draw_steps", grid.draw_steps)
    max_steps = float(flags.get("max_steps", 10)) or max(record)
    sweeps = 2 * len(levels) * max(record) + 2 * grid.paper_steps
    sweeps += sum(1 for s in taus_scales if s not in (0.0, grid.paper_scale)) * grid.paper_steps
    sweeps += sum(d for d in draws if d) * max(draw_steps)
    return sweeps + min(max_steps, max(record))  # and the chosen point once more, for the post-processing


def duration_text(seconds):
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def steps_done(stage):
    from .train.checkpoints import latest_complete_checkpoint, parse_step

    latest = latest_complete_checkpoint(stage.flags["save_dir"], stage.details["rates"]) \
        if os.path.isdir(stage.flags["save_dir"]) else None
    return parse_step(latest) if latest else 0


def estimate_lines(stages, counts, done, log=print):
    """One line per stage with its estimated time, from a measurement on this machine."""
    by_name = {s.name: s for s in stages}
    log("estimate: measuring one training step of each network and one guided pass on this machine ...")
    rates, device, (ddpm_batch, classifier_batch) = measure_throughput(by_name["ddpm"].flags,
                                                                       by_name["classifier"].flags)
    log(f"  measured on {device} (random inputs, batch {ddpm_batch} / {classifier_batch}, after a warm-up): DDPM "
        f"{rates['ddpm_images_per_s']:.2f} img/s, classifier {rates['classifier_images_per_s']:.2f} img/s, guided "
        f"pass {rates['guided_pass_s_per_image'] * 1000:.0f} ms per image")
    total = 0.0
    for stage in stages:
        if done[stage.name]:
            log(f"  {stage.name}: complete, skipped")
            continue
        if stage.name == "prepare":
            n = counts.get("training", 0) + counts.get("validation", 0) if counts else None
            log(f"  {stage.name}: {n if n is not None else 'the'} subjects read and sliced (stated: typically "
                f"1-3 s per subject and modality on one core, BraTS-sized volumes; not included below)")
            continue
        if stage.name in ("ddpm", "classifier"):
            rate = rates[f"{stage.name}_images_per_s"]
            remaining = stage.details["steps"] - steps_done(stage)
            seconds = remaining * stage.details["batch"] / rate
            log(f"  {stage.name}: {remaining} steps x {stage.details['batch']} images at {rate:.2f} img/s "
                f"(measured) = {duration_text(seconds)}")
        elif stage.name == "ablation":
            images = int(float(stage.flags.get("max_images", 32)))
            detect = int(float(stage.flags.get("detect_images", 512)))
            passes = ablation_passes(stage.flags)
            seconds = (images * passes + 2 * detect) * rates["guided_pass_s_per_image"]
            log(f"  ablation: about {images} slices x {passes:.0f} guided passes and {detect} slices for the "
                f"detection threshold, at the measured pass time = about {duration_text(seconds)}")
        elif stage.name == "validate":
            n = "the"
            seconds = 0.0
            if counts and counts.get("validation_tumor_slices"):
                n = counts["validation_tumor_slices"]
                seconds = n * 2 * rates["guided_pass_s_per_image"]
            log(f"  validate: {n} validation tumour slices x the chosen point's passes (R x noise draws, at most "
                f"the ablation's --max_steps) = " + (f"about {duration_text(seconds)} for 2 passes" if seconds else
                                                      "known after the ablation"))
        else:
            seconds = 0.0
            log(f"  {stage.name}: seconds")
        total += seconds
    log(f"  in all about {duration_text(total)} besides preparing the data")
