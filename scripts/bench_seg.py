"""Benchmark: CG-CDM at today's and at new settings against the original code's per-image loop, side by side.

For each image size, in one run, each variant in a process of its own and timed in turns
(`bench.timing.benchmark`):

  today's defaults   `cdm_saliency` batched (both branches and every image in one UNet call per step,
                     the guidance classifier once per step) at --noise_level, --steps, --tau,
                     --classifier_scale (default: the demo's Q = 0.1 T, R = 10, tau 0, s = 10);
  new defaults       the same at --new_steps (default 1) and the other --new_* settings;
  original loop      the original code: one image at a time, a cloned model for branch B, two UNet and
                     two guidance calls per step, host copies every step, on the original network's
                     behaviour (F.interpolate upsampling, strided attention, glibc's allocator), at
                     today's settings, on the first --loop_images images;
  anomaly            (with --anomaly_images) the reconstruction baseline, L measured and scaled.

With --levers, today's defaults again with each speed lever of `benchmarks.LEVERS` switched off, and
with channels-last and bf16 added (--compile: torch.compile too, warm-up reported). At the shipped
demo models' size (64 px) the variants run them on evenly spaced validation tumour slices and report
the mean Dice of the demo's masks (1-pixel blur, Otsu over the brain); at other sizes random networks
of the demo configuration on random images (timing does not depend on the weights; --num_channels,
--num_res_blocks and --diffusion_steps change that configuration and use random networks at every size).

Example (CPU, about 5 minutes on 2 cores):
    python scripts/bench_seg.py --sizes 64,224 --images 32,2 --loop_images 4,1 --json runs/bench_seg.json
"""

import argparse
import json
import os
import platform
import sys

import torch

from guided_diffusion import dist_util
from guided_diffusion.bench import benchmarks
from guided_diffusion.bench.timing import Inputs, Variant, benchmark
from guided_diffusion.cli import UserError, atomic_write_text, run_main
from guided_diffusion.segment.config import OperatingPoint
from guided_diffusion.segment.postprocess import MaskOptions
from guided_diffusion.volumes import parse_int_list

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def per_size(text, flag, sizes, default):
    """One integer per size from `text`, or `default(size)` for each when it is empty."""
    values = parse_int_list(text, flag) if text else [default(size) for size in sizes]
    if len(values) != len(sizes):
        raise UserError(f"{flag} {text!r}: give one entry per size of --sizes ({len(sizes)})")
    return values


def variants_for(args, loop_images, anomaly_images):
    today = OperatingPoint(args.noise_level, args.steps, args.tau, args.classifier_scale)
    new = OperatingPoint(args.new_noise_level if args.new_noise_level is not None else args.noise_level, args.new_steps,
                      args.new_tau if args.new_tau is not None else args.tau,
                      args.new_classifier_scale if args.new_classifier_scale is not None else args.classifier_scale)
    variants = [Variant("today's defaults", today), Variant("new defaults", new),
                Variant("original loop", today, kind="original", images=loop_images, score=False)]
    if args.levers:
        variants += [Variant(f"today's, {lever} off", today, levers_off=(lever,)) for lever in benchmarks.LEVERS]
        variants += [Variant("today's + channels_last", today, channels_last=True),
                     Variant("today's + bf16", today, precision="bf16")]
        if args.compile:
            variants.append(Variant("today's + compile", today, compile=True))
    if anomaly_images:
        measured = min(args.anomaly_measured_steps, args.anomaly_steps)
        variants.append(Variant(f"anomaly L={args.anomaly_steps} (from {measured})",
                                OperatingPoint(measured, 10, args.tau, args.classifier_scale), kind="anomaly",
                                images=anomaly_images, score=False))
    return variants


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--sizes", default="64,224", help="image sizes (default: 64,224)")
    parser.add_argument("--images", default="", help="images per size, one batch (default: 32 at 64 px, else 2)")
    parser.add_argument("--loop_images", default="",
                        help="images per size for the original loop (default: 4 at 64 px, else 1)")
    parser.add_argument("--anomaly_images", default="",
                        help="images per size for the anomaly baseline, 0 to skip (default: 0)")
    parser.add_argument("--models", default=os.path.join(ROOT, "runs", "demo"),
                        help="the shipped demo models (ddpm/, classifier/) (default: runs/demo)")
    parser.add_argument("--src_dir", default=os.path.join(ROOT, "data", "demo", "slices"),
                        help="slices for the shipped models' size (default: data/demo/slices)")
    parser.add_argument("--num_channels", type=int, default=0,
                        help="UNet and classifier width of random networks (default: the demo models'); given, "
                             "random networks run at every size")
    parser.add_argument("--num_res_blocks", type=int, default=0,
                        help="residual blocks per level of random networks (default: the demo models')")
    parser.add_argument("--diffusion_steps", type=int, default=0, help="T of random networks (default: the demo's)")
    parser.add_argument("--noise_level", type=float, default=0.1, help="today's Q as a fraction of T (default: 0.1)")
    parser.add_argument("--steps", type=int, default=10, help="today's R (default: 10)")
    parser.add_argument("--tau", type=float, default=0.0, help="today's tau (default: 0)")
    parser.add_argument("--classifier_scale", type=float, default=10.0, help="today's s (default: 10)")
    parser.add_argument("--new_steps", type=int, default=1, help="the new defaults' R (default: 1)")
    parser.add_argument("--new_noise_level", type=float, default=None, help="the new defaults' Q (default: today's)")
    parser.add_argument("--new_tau", type=float, default=None, help="the new defaults' tau (default: today's)")
    parser.add_argument("--new_classifier_scale", type=float, default=None,
                        help="the new defaults' s (default: today's)")
    parser.add_argument("--levers", action="store_true",
                        help="also today's defaults with each speed lever off, and with channels-last and bf16")
    parser.add_argument("--compile", action="store_true", help="with --levers: also torch.compile (slow warm-up)")
    parser.add_argument("--anomaly_steps", type=int, default=500, help="L of the anomaly baseline (default: 500)")
    parser.add_argument("--anomaly_measured_steps", type=int, default=20,
                        help="L actually run; the time is scaled to --anomaly_steps (default: 20)")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds of every variant, best kept (default: 1)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per variant (default: torch's)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    sizes = parse_int_list(args.sizes, "--sizes")
    counts = per_size(args.images, "--images", sizes, lambda size: 32 if size <= 64 else 2)
    loops = per_size(args.loop_images, "--loop_images", sizes, lambda size: 4 if size <= 64 else 1)
    anomalies = per_size(args.anomaly_images, "--anomaly_images", sizes, lambda size: 0)
    if any(loop > count for loop, count in zip(loops + anomalies, counts + counts)):
        raise UserError("--loop_images and --anomaly_images may not exceed --images")
    if not os.path.isfile(os.path.join(args.models, "ddpm", "args.json")):
        raise UserError(f"--models {args.models}: no ddpm/args.json (the shipped demo models' folder)")

    device = dist_util.dev()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} {device.type.upper()}, {args.threads or torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}; {args.repeats} timed round(s), variants in turns")
    mask_options = MaskOptions(smooth_sigma=1.0, foreground_only=True)
    shipped_size = benchmarks.demo_configs(args.models)[0]["image_size"]
    ddpm_overrides, classifier_overrides = {}, {}
    for flag, ddpm_key, classifier_key in (("num_channels", "num_channels", "classifier_width"),
                                           ("num_res_blocks", "num_res_blocks", "classifier_depth"),
                                           ("diffusion_steps", "diffusion_steps", None)):
        value = getattr(args, flag)
        if value < 0:
            raise UserError(f"--{flag} {value}: must be positive (0: the demo models')")
        if value:
            ddpm_overrides[ddpm_key] = value
            if classifier_key:
                classifier_overrides[classifier_key] = value
    rows = []
    for size, count, loop, anomaly in zip(sizes, counts, loops, anomalies):
        shipped = size == shipped_size and os.path.isdir(args.src_dir) and not ddpm_overrides
        inputs = Inputs(size, count, args.models, shipped=shipped, src_dir=args.src_dir, device=str(device),
                        ddpm_overrides=ddpm_overrides, classifier_overrides=classifier_overrides)
        size_rows = benchmark(inputs, variants_for(args, loop, anomaly), repeats=args.repeats,
                              mask_options=mask_options, threads=args.threads)
        original = next(r for r in size_rows if r["kind"] == "original")
        for row in size_rows:
            if row["kind"] == "anomaly":
                row["seconds_per_image"] *= args.anomaly_steps / min(args.anomaly_measured_steps, args.anomaly_steps)
            row["speedup"] = original["seconds_per_image"] / row["seconds_per_image"]
            row["inputs"] = "shipped models, validation slices" if shipped else "random networks and images"
        rows += size_rows
    print(benchmarks.format_table(rows, [
        ("size", "size", "d"), ("label", "variant", "s"), ("settings", "settings", "s"), ("images", "images", "d"),
        ("seconds_per_image", "s/image", ".3f"), ("speedup", "vs original", lambda v: f"{v:.1f}x"),
        ("dice", "Dice", ".3f"), ("warmup_seconds", "warm-up s", ".1f")]))
    print("vs original: seconds per image of the original loop over the variant's, same run, same weights and "
          "images; Dice: mean over the scored images (shipped models only)")
    if args.json:
        atomic_write_text(args.json, json.dumps({"device": where, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
