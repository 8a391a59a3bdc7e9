"""Make the demo dataset: synthetic BraTS-style subjects and their 2-D slice layout.

Each subject is a randomly deformed, intensity-varied copy of the MNI152 template brain
(shipped with nilearn, no download) with zero or more irregular lesions. Writes
OUT/raw/<subject>/<subject>_{flair,seg}.nii.gz, the slice layout OUT/slices (as
scripts/prepare_brats.py would) and a picture OUT/preview.png. The same --seed gives the
same files. The defaults (64x64 slices, a few thousand training slices, a few hundred
validation slices) take one to two minutes on two CPU cores.

example:
  python scripts/make_demo_data.py            # data/demo/raw, data/demo/slices
"""

import argparse

from guided_diffusion.cli import UserError, run_main
from guided_diffusion.demo_data import LesionSettings, make_demo_dataset
from guided_diffusion.volumes import format_counts


def create_argparser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="data/demo", help="output folder (default: data/demo)")
    p.add_argument("--num_subjects", type=int, default=72, help="synthetic subjects to make (default: 72)")
    p.add_argument("--voxel_size", type=float, default=2.0,
                   help="voxel size of the subjects in mm; the template is 1 mm (default: 2)")
    p.add_argument("--image_size", type=int, default=64, help="side of the square slices in pixels (default: 64)")
    p.add_argument("--val_fraction", type=float, default=0.15,
                   help="fraction of subjects for validation (default: 0.15)")
    p.add_argument("--min_tumor_pixels", type=int, default=5,
                   help="lesion pixels (after resizing) a slice needs to be called tumor (default: 5)")
    p.add_argument("--lesion_free_fraction", type=float, default=0.1,
                   help="fraction of subjects without any lesion (default: 0.1)")
    p.add_argument("--max_lesions", type=int, default=5,
                   help="the others get 1..max_lesions lesions (default: 5)")
    p.add_argument("--min_lesion_mm", type=float, default=4.0, help="smallest lesion diameter in mm (default: 4)")
    p.add_argument("--max_lesion_mm", type=float, default=50.0, help="largest lesion diameter in mm (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random (default: 0)")
    p.add_argument("--workers", type=int, default=2, help="processes working in parallel (default: 2)")
    return p


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if not 0 < args.min_lesion_mm <= args.max_lesion_mm:
        raise UserError(f"--min_lesion_mm {args.min_lesion_mm} and --max_lesion_mm {args.max_lesion_mm}: "
                        f"need 0 < min <= max")
    if args.max_lesions < 1 or not 0 <= args.lesion_free_fraction < 1:
        raise UserError("--max_lesions must be at least 1 and --lesion_free_fraction in [0, 1)")
    settings = LesionSettings(lesion_free_fraction=args.lesion_free_fraction, max_lesions=args.max_lesions,
                              min_diameter_mm=args.min_lesion_mm, max_diameter_mm=args.max_lesion_mm)
    counts = make_demo_dataset(args.out_dir, num_subjects=args.num_subjects, seed=args.seed,
                               voxel_size=args.voxel_size, image_size=args.image_size,
                               val_fraction=args.val_fraction, min_tumor_pixels=args.min_tumor_pixels,
                               settings=settings, workers=max(1, args.workers))
    print(format_counts(counts))
    print(f"wrote {args.out_dir}/raw, {args.out_dir}/slices and {args.out_dir}/preview.png")


if __name__ == "__main__":
    run_main(main)
