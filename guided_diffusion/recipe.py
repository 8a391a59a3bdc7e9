"""`scripts/train_recipe.py`: from a folder of raw subjects to a model folder, one stage after another.

    prepare     scripts/prepare_brats.py          raw subjects -> WORK/slices (the 2-D slice layout)
    ddpm        scripts/train_tumor_ddfm.py       the class-conditional DDPM -> WORK/ddpm
    classifier  scripts/classifier_tumor_train.py the noise-conditioned classifier -> WORK/classifier
    ablation    scripts/ablation.py               the settings, chosen on the training split -> WORK/ablation
    validate    scripts/image_p_seg.py            those settings on the validation split -> WORK/validation
    export      scripts/export_model.py           the model folder (--out_dir, default WORK/model)

Each stage is a subprocess of the existing script; its exact command is printed first, so it can be
rerun by hand. A stage whose output is complete is skipped (the training runs: the completion record
of their last step; the others: their output, made by the same command, recorded in WORK/stages/),
and the training runs continue from their newest complete checkpoint (`--resume_checkpoint auto`),
so rerunning the same recipe command after an interruption resumes it. Ctrl-C or SIGTERM stops the
running stage as that script stops (a training run saves the step it is on) and the recipe exits with
its status.

The presets: `cpu`, the demo recipe of scripts/train_demo.py (64 px, small networks, 1800 + 700 steps;
about an hour in all on 2 CPU cores for 72 demo-sized subjects, see docs/training.md), and `paper`, the paper's 256 px and network widths
(128 channels, 3 residual blocks), for a GPU. Every setting can be changed: the named flags, or any flag of
a stage's script through --prepare_flags, --ddpm_flags, --classifier_flags, --ablation_flags,
--validate_flags (they win over the preset).
"""

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .cli import ArgumentParser, Stopped, Terminated, UserError, atomic_write_text, str2bool
from .recipe_preflight import check_prepared, check_raw_subjects, duration_text, estimate_lines, steps_done

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")

PRESETS = {
    "cpu": {
        "prepare": dict(modality="flair", image_size=64, min_tumor_pixels=5, val_fraction=0.15, seed=0),
        "ddpm": dict(dataset="brats", num_channels=32, num_res_blocks=1, channel_mult="1,2,2,2",
                     attention_resolutions="16,8", num_heads=4, class_cond=True, diffusion_steps=4000,
                     noise_schedule="linear", lr=2e-4, batch_size=16, ema_rate="0.999", log_interval=50, seed=0,
                     max_noise_level=0.25, save_interval=300, max_steps=1800),
        "classifier": dict(dataset="brats", model_type="encoder", classifier_width=32, classifier_depth=1,
                           classifier_attention_resolutions="16,8", classifier_num_head_channels=32,
                           classifier_pool="attention", lr=3e-4, batch_size=32, log_interval=50, eval_interval=200,
                           seed=0, max_noise_level=0.25, max_steps=700),
        "ablation": dict(max_images=16, batch_size=16, record_steps="1,2,5,10,20,30"),
        "validate": dict(batch_size=32, max_images=0),
    },
    "paper": {
        "prepare": dict(modality="flair", image_size=256, min_tumor_pixels=10, val_fraction=0.2, seed=0),
        "ddpm": dict(dataset="brats", num_channels=128, num_res_blocks=3, attention_resolutions="32,16,8",
                     num_heads=4, learn_sigma=True, class_cond=True, diffusion_steps=4000, noise_schedule="linear",
                     lr=1e-4, batch_size=4, ema_rate="0.9999", log_interval=100, seed=0, max_noise_level=0.25,
                     save_interval=5000, max_steps=100000),
        "classifier": dict(dataset="brats", model_type="encoder", classifier_width=128, classifier_depth=2,
                           classifier_attention_resolutions="32,16,8", classifier_num_head_channels=64, lr=3e-4,
                           batch_size=8, anneal_lr=True, log_interval=100, eval_interval=1000, save_interval=5000,
                           seed=0, max_noise_level=0.25, max_steps=20000),
        "ablation": dict(max_images=32, batch_size=16),
        "validate": dict(batch_size=16, max_images=0),
    },
}
FLAG_STAGES = ("prepare", "ddpm", "classifier", "ablation", "validate")


def parse_stage_flags(text, option):
    """'--lr 1e-4 --clip_percentiles 0.5 99.5 --switch' -> {'lr': '1e-4', 'clip_percentiles': ['0.5', '99.5'],
    'switch': None}; UserError naming `option` for anything else."""
    try:
        tokens = shlex.split(text or "")
    except ValueError as err:
        raise UserError(f"{option} {text!r}: {err}") from None
    flags, current = {}, None
    for token in tokens:
        if token.startswith("--") and len(token) > 2:
            name, _, value = token[2:].partition("=")
            current = name.replace("-", "_")
            flags[current] = value if value else None
        elif current is None:
            raise UserError(f"{option} {text!r}: {token!r} follows no --flag")
        elif flags[current] is None:
            flags[current] = token
        else:
            previous = flags[current]
            flags[current] = (previous if isinstance(previous, list) else [previous]) + [token]
    return flags


def flag_tokens(flags):
    tokens = []
    for name, value in flags.items():
        tokens.append(f"--{name}")
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        tokens += [str(v) for v in values]
    return tokens


@dataclass
class Stage:
    name: str
    script: str
    flags: dict
    output: str  # what the stage makes: its folder or file
    complete: object  # () -> bool: the output is there and complete
    recorded: bool = True  # a stage without its own completion record: done when WORK/stages/<name>.json agrees
    details: dict = field(default_factory=dict)  # a training run's steps, EMA rates and batch size

    @property
    def command(self):
        return [sys.executable, os.path.join(SCRIPTS, self.script), *flag_tokens(self.flags)]


def marker_path(work_dir, name):
    return os.path.join(work_dir, "stages", f"{name}.json")


def read_marker(work_dir, name):
    try:
        with open(marker_path(work_dir, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_marker(work_dir, stage):
    record = {"command": stage.command[1:], "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    atomic_write_text(marker_path(work_dir, stage.name), json.dumps(record, indent=1) + "\n")


def record_time(work_dir, name, seconds):
    """Add a stage's wall-clock seconds to WORK/stages/times.json ({stage: seconds}, summed over the runs
    that resumed it), where the measured times of a recipe are read from."""
    times = read_marker(work_dir, "times") or {}
    times[name] = round(times.get(name, 0.0) + seconds, 1)
    atomic_write_text(marker_path(work_dir, "times"), json.dumps(times, indent=1) + "\n")


def stage_done(work_dir, stage):
    if not stage.complete():
        return False
    if not stage.recorded:
        return True
    marker = read_marker(work_dir, stage.name)
    return marker is not None and marker.get("command") == stage.command[1:]


# ---------------------------------------------------------------------------------------------
# The plan


def create_argparser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input_dir", default="",
                        help="raw subjects: whatever scripts/prepare_brats.py reads (one folder per subject)")
    source.add_argument("--prepared_dir", default="",
                        help="a slice dataset prepared already (prepare_brats.py or make_demo_data.py): no "
                             "prepare stage")
    p.add_argument("--work_dir", default="runs/recipe", help="where every stage's output goes (default: %(default)s)")
    p.add_argument("--out_dir", default="", help="the model folder (default: WORK_DIR/model)")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                   help="cpu: the demo recipe (64 px, small networks); paper: 256 px and the paper's network "
                        "widths, for a GPU (default: %(default)s)")
    p.add_argument("--image_size", type=int, default=0, help="slice side in pixels (default: the preset's: 64, 256)")
    p.add_argument("--modality", default="", help="modalities of the slices, as prepare_brats.py (default: flair)")
    p.add_argument("--val_fraction", type=float, default=-1.0,
                   help="fraction of subjects for validation (default: the preset's: 0.15, 0.2)")
    p.add_argument("--ddpm_steps", type=int, default=0,
                   help="DDPM training steps (default: the preset's: 1800, 100000)")
    p.add_argument("--classifier_steps", type=int, default=0,
                   help="classifier training steps (default: the preset's: 700, 20000)")
    p.add_argument("--ddpm_batch_size", type=int, default=0, help="DDPM batch size (default: the preset's: 16, 4)")
    p.add_argument("--classifier_batch_size", type=int, default=0,
                   help="classifier batch size (default: the preset's: 32, 8)")
    for stage, script in zip(FLAG_STAGES, ("prepare_brats.py", "train_tumor_ddfm.py", "classifier_tumor_train.py",
                                           "ablation.py", "image_p_seg.py")):
        p.add_argument(f"--{stage}_flags", default="", metavar="FLAGS",
                       help=f"more flags of scripts/{script}, in quotes; they win over the preset's")
    p.add_argument("--ddpm_weights", default="ema", choices=("ema", "raw"),
                   help="the DDPM weights the model folder gets: its EMA (the first --ema_rate) or the raw ones "
                        "(default: %(default)s)")
    p.add_argument("--validate", type=str2bool, default=True,
                   help="segment the validation split with the chosen settings; the scores go into the model card "
                        "(default: True)")
    p.add_argument("--half", type=str2bool, default=False,
                   help="store the model folder's weights in float16 (default: False)")
    p.add_argument("--estimate", type=str2bool, default=True,
                   help="measure the networks' throughput on this machine and print each stage's time first "
                        "(default: True)")
    p.add_argument("--dry_run", type=str2bool, default=False,
                   help="print the stages' commands (and the estimate) and stop (default: False)")
    return p


def stage_settings(args):
    """{stage: flags} of the preset with the named flags and the --<stage>_flags applied."""
    preset = PRESETS[args.preset]
    settings = {stage: dict(preset[stage]) for stage in FLAG_STAGES}
    named = {"prepare": dict(image_size=args.image_size or None, modality=args.modality or None,
                             val_fraction=args.val_fraction if args.val_fraction >= 0 else None),
             "ddpm": dict(max_steps=args.ddpm_steps or None, batch_size=args.ddpm_batch_size or None),
             "classifier": dict(max_steps=args.classifier_steps or None, batch_size=args.classifier_batch_size or None)}
    for stage, values in named.items():
        settings[stage].update({k: v for k, v in values.items() if v is not None})
    for stage in FLAG_STAGES:
        settings[stage].update(parse_stage_flags(getattr(args, f"{stage}_flags"), f"--{stage}_flags"))
    return settings


def _number(flags, key, stage, kind=int):
    try:
        return kind(flags[key])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"--{stage}_flags: --{key} {flags.get(key)!r} is not a number") from None


def build_stages(args):
    """The stages in order, with their commands and completion checks."""
    from .train.checkpoints import checkpoint_files
    from .train.loop import parse_ema_rates
    from .volumes import parse_modalities

    settings = stage_settings(args)
    work = args.work_dir
    out_dir = args.out_dir or os.path.join(work, "model")
    slices = args.prepared_dir or os.path.join(work, "slices")
    prepare = settings["prepare"]
    modalities = parse_modalities(str(prepare.get("modality", "flair")))
    image_size = _number(prepare, "image_size", "prepare")
    stages = []
    if not args.prepared_dir:
        prepare.update(input_dir=args.input_dir, out_dir=slices)
        stages.append(Stage("prepare", "prepare_brats.py", prepare, slices,
                            complete=lambda: os.path.isfile(os.path.join(slices, "dataset.json"))))
    ddpm_dir, classifier_dir = os.path.join(work, "ddpm"), os.path.join(work, "classifier")
    ddpm = {**settings["ddpm"], "image_size": settings["ddpm"].get("image_size", image_size),
            "in_channels": settings["ddpm"].get("in_channels", len(modalities))}
    ddpm.update(src_dir=slices, save_dir=ddpm_dir, resume_checkpoint="auto")
    classifier = {**settings["classifier"], "src_dir": slices, "save_dir": classifier_dir,
                  "diffusion_config": os.path.join(ddpm_dir, "args.json"), "resume_checkpoint": "auto"}
    ddpm_steps, classifier_steps = _number(ddpm, "max_steps", "ddpm"), _number(classifier, "max_steps", "classifier")
    if ddpm_steps < 1 or classifier_steps < 1:
        raise UserError("--ddpm_steps and --classifier_steps must be at least 1: the recipe trains to a final step")
    ddpm_rates = parse_ema_rates(ddpm.get("ema_rate") or "")
    classifier_rates = parse_ema_rates(classifier.get("ema_rate") or "")
    ddpm_files = checkpoint_files(ddpm_dir, ddpm_steps, ddpm_rates)
    classifier_files = checkpoint_files(classifier_dir, classifier_steps, classifier_rates)
    if args.ddpm_weights == "ema" and not ddpm_rates:
        raise UserError("--ddpm_weights ema: the DDPM is trained without an EMA (--ema_rate is empty); give "
                        "--ddpm_flags '--ema_rate 0.9999' or --ddpm_weights raw")
    ddpm_weights = ddpm_files["ema"][ddpm_rates[0]] if args.ddpm_weights == "ema" else ddpm_files["model"]
    # a classifier trained with an EMA is used through it too; without one, its raw weights
    classifier_weights = classifier_files["ema"][classifier_rates[0]] if classifier_rates else classifier_files["model"]
    stages.append(Stage("ddpm", "train_tumor_ddfm.py", ddpm, ddpm_weights, recorded=False,
                        complete=lambda: os.path.isfile(ddpm_files["record"]),
                        details=dict(steps=ddpm_steps, rates=ddpm_rates, batch=_number(ddpm, "batch_size", "ddpm"))))
    stages.append(Stage("classifier", "classifier_tumor_train.py", classifier, classifier_weights, recorded=False,
                        complete=lambda: os.path.isfile(classifier_files["record"]),
                        details=dict(steps=classifier_steps, rates=classifier_rates,
                                     batch=_number(classifier, "batch_size", "classifier"))))
    ablation_dir = os.path.join(work, "ablation")
    selection = os.path.join(ablation_dir, "selection.json")
    ablation = {**settings["ablation"], "model_path": ddpm_weights, "classifier_path": classifier_weights,
                "src_dir": slices, "split": "training", "out_dir": ablation_dir}
    stages.append(Stage("ablation", "ablation.py", ablation, selection, complete=lambda: os.path.isfile(selection)))
    export = {"ddpm": ddpm_weights, "ddpm_weights": args.ddpm_weights, "classifier": classifier_weights,
              "classifier_weights": "ema" if classifier_rates else "raw", "dataset_json": slices,
              "selection": selection, "half": args.half, "out_dir": out_dir}
    if args.validate:
        validation_dir = os.path.join(work, "validation")
        summary = os.path.join(validation_dir, "summary.json")
        validate = {"method": "cg-cdm", **settings["validate"], "src_dir": slices, "split": "validation",
                    "model_path": ddpm_weights, "classifier_path": classifier_weights, "settings": selection,
                    "out_dir": validation_dir}
        stages.append(Stage("validate", "image_p_seg.py", validate, summary, complete=lambda: os.path.isfile(summary)))
        export["validation"] = summary
    model_card = os.path.join(out_dir, "model.json")
    stages.append(Stage("export", "export_model.py", export, out_dir, complete=lambda: os.path.isfile(model_card)))
    return stages, slices, modalities


# ---------------------------------------------------------------------------------------------
# Running


def run_stage(command):
    """Run `command` and return its exit status once it has ended. A stop is the stage's to handle: Ctrl-C
    reaches it from the terminal (the whole process group), and a SIGTERM of the recipe is sent on to it;
    a training run then saves the step it is on. The recipe waits for that instead of killing the stage."""
    process = subprocess.Popen(command)
    while True:
        try:
            return process.wait()
        except Terminated:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        except KeyboardInterrupt:  # the stage got the same Ctrl-C: wait while it saves and stops
            pass


def main(argv=None, log=print):
    parser = create_argparser()
    args = parser.parse_args(argv)
    stages, slices, modalities = build_stages(args)
    prepare = next((s for s in stages if s.name == "prepare"), None)
    if prepare is not None:
        marker = read_marker(args.work_dir, "prepare")
        trained = os.path.isdir(os.path.join(args.work_dir, "ddpm"))
        # without a record (stopped right after preparing) it is prepared again, unless training began on it
        if prepare.complete() and (marker.get("command") != prepare.command[1:] if marker else trained):
            raise UserError(f"--work_dir {args.work_dir}: {slices} holds a dataset prepared by another command "
                            f"({'no record of it' if marker is None else shlex.join(marker['command'])}); remove "
                            f"it, and what was trained on it, or choose another --work_dir")
        counts = check_prepared(slices, f"--work_dir {args.work_dir}: {slices}") if prepare.complete() else \
            check_raw_subjects(args.input_dir, modalities, float(prepare.flags.get("val_fraction", 0.2)),
                               int(prepare.flags.get("seed", 0)))
    else:
        from .cli import require_dir

        require_dir(args.prepared_dir, "--prepared_dir")
        counts = check_prepared(slices, f"--prepared_dir {slices}")
    done = {stage.name: stage_done(args.work_dir, stage) for stage in stages}
    log(f"recipe ({args.preset} preset): {' -> '.join(s.name for s in stages)}; work in {args.work_dir}, model "
        f"folder {stages[-1].output}")
    if args.estimate and not all(done.values()):
        estimate_lines(stages, counts, done, log)
    for number, stage in enumerate(stages, 1):
        log(f"[{number}/{len(stages)}] {stage.name}: {shlex.join(stage.command)}")
        if args.dry_run:
            continue
        if stage_done(args.work_dir, stage):
            log(f"  complete ({stage.output}): skipped")
            continue
        if stage.name in ("ddpm", "classifier") and steps_done(stage):
            log(f"  resuming at step {steps_done(stage)} of {stage.details['steps']}")
        sys.stdout.flush()
        started = time.monotonic()
        status = run_stage(stage.command)
        seconds = time.monotonic() - started
        record_time(args.work_dir, stage.name, seconds)
        if status != 0:
            signum = status - 128 if status > 128 else -status if status < 0 else 0
            if signum in (signal.SIGINT, signal.SIGTERM):
                raise Stopped(signum, f"stage {stage.name} stopped by {signal.Signals(signum).name}; run the same "
                                      f"recipe command again to resume")
            print(f"error: stage {stage.name} failed (exit status {status}); its command is printed above",
                  file=sys.stderr)
            raise SystemExit(status if 0 < status < 128 else 1)
        if stage.recorded:
            write_marker(args.work_dir, stage)
        log(f"  {stage.name} finished in {duration_text(seconds)}")
        if stage.name == "prepare":
            check_prepared(slices, f"--input_dir {args.input_dir} (prepared into {slices})")
    if not args.dry_run:
        log(f"model folder: {stages[-1].output} (segment with: python scripts/segment_scans.py --model_dir "
            f"{stages[-1].output} --input SCANS --out_dir OUT)")
