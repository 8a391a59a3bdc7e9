"""Check this device: speed and agreement of CDM / CG-CDM and DDPM training in fp32, bf16 and fp16.

The first command to run on a new GPU machine. On the device present (CUDA, else Apple's MPS, else
the CPU) it runs a small CDM and CG-CDM pass and a few training steps in each precision (with
--compile, compiled too), compares the maps (correlation, largest difference, Dice of the Otsu
masks) and the losses with the float32 run, and prints speed and agreement as a table
(`guided_diffusion.bench.precision_check`). Networks: the shipped demo models (runs/demo) on demo
validation slices when both exist (on random images without the slices), else tiny random networks
(--tiny forces them). Exit status 1 when an agreement falls outside the stated tolerances.

Example:
    python scripts/check_gpu.py                      # then --precision bf16 where it passes
    python scripts/check_gpu.py --compile --images 16
"""

import argparse
import json
import os
import sys

import torch

from guided_diffusion import dist_util
from guided_diffusion.bench import benchmarks
from guided_diffusion.bench.precision_check import CheckSettings, check_precisions, tolerance_text
from guided_diffusion.cli import UserError, atomic_write_text, run_main
from guided_diffusion.inference import PRECISIONS
from guided_diffusion.segment.chain import per_image_noise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DDPM = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                 num_heads=4, class_cond=True, diffusion_steps=400, use_scale_shift_norm=True)
TINY_CLASSIFIER = dict(image_size=16, classifier_width=32, classifier_depth=1, classifier_channel_mult="1,2",
                       classifier_attention_resolutions="8", classifier_num_head_channels=32)


def networks_and_images(args, device):
    """(model, diffusion, classifier, x0, description)."""
    shipped = not args.tiny and os.path.isfile(os.path.join(args.models, "ddpm", "model.pt")) and \
        os.path.isfile(os.path.join(args.models, "classifier", "model.pt"))
    if shipped:
        model, diffusion, classifier = benchmarks.shipped_networks(args.models, device)
        size = model.image_size
        if os.path.isdir(args.src_dir):
            from guided_diffusion.segment.pipeline import load_slice_set

            x0 = load_slice_set(args.src_dir, "validation", image_size=size, in_channels=model.in_channels,
                                max_images=args.images).images
            return model, diffusion, classifier, x0.to(device), f"shipped demo models, {len(x0)} validation slices"
        what = "shipped demo models, random images"
    else:
        from guided_diffusion.script_util import classifier_defaults, model_and_diffusion_defaults

        ddpm = {**model_and_diffusion_defaults(), **TINY_DDPM}
        classifier_config = {**classifier_defaults(), **TINY_CLASSIFIER}
        model, diffusion, classifier = benchmarks.random_networks(ddpm, classifier_config, device, scale=0.05)
        size = model.image_size
        what = "tiny random networks, random images"
    generator = torch.Generator().manual_seed(1)
    x0 = torch.rand(args.images, model.in_channels, size, size, generator=generator) * 2 - 1
    return model, diffusion, classifier, x0.to(device), what


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma list (default: fp32,bf16,fp16)")
    parser.add_argument("--compile", action="store_true", help="also check torch.compile (slow first call)")
    parser.add_argument("--images", type=int, default=8, help="images of the CDM pass and the training batch")
    parser.add_argument("--steps", type=int, default=10, help="R of the CDM pass (default: 10)")
    parser.add_argument("--train_steps", type=int, default=3, help="training steps per precision (default: 3)")
    parser.add_argument("--models", default=os.path.join(ROOT, "runs", "demo"), help="shipped demo models")
    parser.add_argument("--src_dir", default=os.path.join(ROOT, "data", "demo", "slices"), help="demo slices")
    parser.add_argument("--tiny", action="store_true", help="tiny random networks even where the demo models exist")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown or not precisions:
        raise UserError(f"--precisions {args.precisions!r}: choose from {', '.join(PRECISIONS)}")
    for flag in ("images", "steps", "train_steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be at least 1")

    device = dist_util.dev()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
    model, diffusion, classifier, x0, what = networks_and_images(args, device)
    print(f"device: {where} ({device}); torch {torch.__version__}; {what}")
    y1 = torch.ones(len(x0), dtype=torch.long, device=device)
    noise = per_image_noise(x0.shape[1:], 0, range(len(x0)), device=device)
    settings = CheckSettings(steps=args.steps, train_steps=args.train_steps)
    rows, passed = check_precisions(model, diffusion, classifier, x0, y1, noise, precisions=precisions,
                                    compile=args.compile, settings=settings, device=device)
    for row in rows:
        row["verdict"] = "ok" if row["passed"] else "FAIL"
    print(benchmarks.format_table(rows, [
        ("precision", "precision", "s"), ("what", "what", "s"), ("seconds", "seconds", ".3f"),
        ("speedup", "vs fp32", lambda v: f"{v:.2f}x"), ("correlation", "map corr", ".5f"),
        ("max_difference", "max diff", ".2e"), ("mask_dice", "mask Dice", ".3f"),
        ("loss_difference", "loss diff", ".2e"), ("verdict", "", "s"), ("note", "", "s")]))
    print("tolerances (against the fp32 run on the same weights, images and noise):\n" + tolerance_text())
    if args.json:
        atomic_write_text(args.json, json.dumps({"device": where, "networks": what, "rows": rows}, indent=2) + "\n")
    if not passed:
        print("some agreement is outside its tolerance: keep --precision fp32 on this device for those")
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
