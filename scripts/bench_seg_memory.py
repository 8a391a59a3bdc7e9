"""Peak resident memory of image_p_seg.py on 1x and 8x the images at the same batch size.

Each run is its own process (its peak RSS is the process's own, read from the kernel after it ends);
the maps, masks and metric rows are written batch by batch, so the two peaks should be close.

    python scripts/bench_seg_memory.py --src_dir data/demo/slices --images 64 --factor 8
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_mib(argv):
    """Run image_p_seg.py with `argv` in a child process; its peak RSS in MiB (Linux reports KiB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "image_p_seg.py"), *argv], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before:
        raise RuntimeError("the child's peak did not exceed an earlier child's; run each size in a fresh process")
    return after / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src_dir", default="data/demo/slices")
    parser.add_argument("--model_path", default="runs/demo/ddpm/model.pt")
    parser.add_argument("--images", type=int, default=64, help="the 1x image count (every slice of the split)")
    parser.add_argument("--factor", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args()
    rows = []
    for count in (args.images, args.images * args.factor):
        with tempfile.TemporaryDirectory() as out:
            argv = ["--method", "cdm", "--model_path", args.model_path, "--src_dir", args.src_dir,
                    "--split", "training", "--max_images", str(count), "--steps", "1", "--tau", "0",
                    "--batch_size", str(args.batch_size), "--grid_images", "0", "--out_dir", os.path.join(out, "seg")]
            # a fresh interpreter per size, so RUSAGE_CHILDREN holds only that run's peak
            code = (f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'scripts')!r}); "
                    f"from bench_seg_memory import peak_rss_mib; print(peak_rss_mib({argv!r}))")
            peak = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                        text=True, cwd=ROOT).stdout.split()[-1])
        rows.append((count, peak))
        print(f"{count:6d} images: peak RSS {peak:8.1f} MiB", flush=True)
    print(f"ratio {args.factor}x / 1x: {rows[1][1] / rows[0][1]:.3f}")


if __name__ == "__main__":
    main()
