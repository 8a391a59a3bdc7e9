"""Where one CG-CDM batch spends its time, phase by phase, at 64 and 224 pixels.

At the shipped demo models' size (64 px) it runs them on evenly spaced validation tumour slices of
--src_dir; at other sizes, random networks of the demo configuration on random images (timing does
not depend on the weights). Phases: the UNet's forward passes (both branches in one call per step),
the guidance classifier's forward and backward passes, the sampler's arithmetic with the map
accumulation, the post-processing into masks (the demo's: 1-pixel blur, Otsu over the brain) and
the data movement (reading the slices, copies to the device). GFLOP/s are FLOPs counted by
torch.utils.flop_counter over the phase's seconds, beside a float32 matrix product on the same device.

Example (CPU, about 3 minutes on 2 cores):
    python scripts/profile_seg.py --sizes 64,224 --images 32,4 --json runs/profile_seg.json
"""

import argparse
import json
import os
import platform
import sys

import torch

from guided_diffusion import dist_util
from guided_diffusion.bench import benchmarks
from guided_diffusion.bench.timing import Inputs, describe_point, load_inputs, profile_cgcdm
from guided_diffusion.cli import UserError, atomic_write_text, run_main
from guided_diffusion.segment.config import OperatingPoint
from guided_diffusion.segment.postprocess import MaskOptions
from guided_diffusion.volumes import parse_int_list

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--sizes", default="64,224", help="image sizes (default: 64,224)")
    parser.add_argument("--images", default="32,4", help="batch size per size (default: 32,4)")
    parser.add_argument("--models", default=os.path.join(ROOT, "runs", "demo"),
                        help="the shipped demo models (ddpm/, classifier/) (default: runs/demo)")
    parser.add_argument("--src_dir", default=os.path.join(ROOT, "data", "demo", "slices"),
                        help="slices for the shipped models' size (default: data/demo/slices)")
    parser.add_argument("--noise_level", type=float, default=0.1, help="Q as a fraction of T (default: 0.1)")
    parser.add_argument("--steps", type=int, default=10, help="R (default: 10)")
    parser.add_argument("--tau", type=float, default=0.0, help="tau (default: 0, the demo's)")
    parser.add_argument("--classifier_scale", type=float, default=10.0, help="s (default: 10)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    sizes, counts = parse_int_list(args.sizes, "--sizes"), parse_int_list(args.images, "--images")
    if len(sizes) != len(counts):
        raise UserError("--sizes and --images need one entry per size")
    if not os.path.isfile(os.path.join(args.models, "ddpm", "args.json")):
        raise UserError(f"--models {args.models}: no ddpm/args.json (the shipped demo models' folder)")
    settings = OperatingPoint(args.noise_level, args.steps, args.tau, args.classifier_scale)
    mask_options = MaskOptions(smooth_sigma=1.0, foreground_only=True)
    device = dist_util.dev()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} {device.type.upper()}, {torch.get_num_threads()} threads"
    matmul = benchmarks.matmul_flops_per_second(device)
    print(f"device: {where}; torch {torch.__version__}; 2048 x 2048 float32 matmul {matmul / 1e9:.0f} GFLOP/s")

    rows = []
    shipped_size = benchmarks.demo_configs(args.models)[0]["image_size"]
    for size, count in zip(sizes, counts):
        shipped = size == shipped_size and os.path.isdir(args.src_dir)
        inputs = Inputs(size, count, args.models, shipped=shipped, src_dir=args.src_dir, device=str(device))
        reading, state = benchmarks.timed(lambda: load_inputs(inputs), device)
        profile_cgcdm(state, OperatingPoint(args.noise_level, 1, args.tau, args.classifier_scale))  # warm-up
        phases, _ = profile_cgcdm(state, settings, mask_options)
        if shipped:
            phases.append(dict(phase="reading the slices and the models", seconds=reading, calls=1, flops=None))
        total = sum(p["seconds"] for p in phases)
        what = "shipped demo models, validation slices" if shipped else "random demo-configuration networks"
        point = describe_point(settings, state["diffusion"].num_timesteps)
        print(f"\n{size} px, batch {len(state['x0'])} ({what}), {point}: "
              f"{total:.1f} s, {total / len(state['x0']):.3f} s per image")
        for p in phases:
            p.update(size=size, images=len(state["x0"]), share=p["seconds"] / total,
                     gflops=p["flops"] / p["seconds"] / 1e9 if p["flops"] and p["seconds"] > 0 else None,
                     matmul_gflops=matmul / 1e9)
        print(benchmarks.format_table(phases, [("phase", "phase", "s"), ("seconds", "seconds", ".2f"),
                                               ("share", "share", ".0%"), ("calls", "calls", "d"),
                                               ("gflops", "GFLOP/s", ".0f")]))
        rows += phases
    if args.json:
        atomic_write_text(args.json, json.dumps({"device": where, "matmul_gflops": matmul / 1e9, "rows": rows},
                                                indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
