"""Make the demo dataset: synthetic BraTS-style subjects and their 2-D slice layout.

Each subject is a randomly deformed, intensity-varied copy of the MNI152 template brain
(shipped with nilearn, no download) with BraTS-like FLAIR gliomas (--lesion_model glioma,
the default: usually one tumour, edema around an enhancing core, labels 2 / 4 / 1) or the
harder "mixed" model (--lesion_model mixed: up to five bright, dark or ring lesions from 4 mm).
--profile stress makes a stress set instead: subjects take in turn the kinds typical, small
(a few thousand voxels at 1 mm), multiple (three tumours), edge (a tumour in the top or bottom
fifth of the brain) and healthy, recorded per subject in OUT/raw/demo.json. Writes
OUT/raw/<subject>/<subject>_{flair,seg}.nii.gz, the slice layout OUT/slices (as
scripts/prepare_brats.py would) and a picture OUT/preview.png. The same --seed gives the
same files. The defaults (64x64 slices, a few thousand training slices, a few hundred
validation slices) take one to two minutes on two CPU cores.

examples:
  python scripts/make_demo_data.py            # data/demo/raw, data/demo/slices
  python scripts/make_demo_data.py --profile stress --num_subjects 30 --voxel_size 1 --val_fraction 0.5 \
      --out_dir data/stress                   # whole-scan checks: tune on training, report on validation
"""

import argparse

from guided_diffusion.cli import UserError, run_main
from guided_diffusion.demo_data import LESION_MODELS, NAMINGS, PROFILES, STRESS_KINDS, lesion_settings, make_demo_dataset
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
    p.add_argument("--lesion_model", default="glioma", choices=LESION_MODELS,
                   help="glioma: BraTS-like FLAIR whole tumours; mixed: up to five small bright, dark or ring "
                        "lesions anywhere in the brain (default: glioma)")
    p.add_argument("--max_lesions", type=int, default=None,
                   help="most lesions per subject (default: 2 for glioma, where a second tumour is rare; 5 for mixed, "
                        "drawn uniformly from 1..5)")
    p.add_argument("--min_lesion_mm", type=float, default=None,
                   help="smallest whole-lesion diameter in mm (default: 20 for glioma, 4 for mixed)")
    p.add_argument("--max_lesion_mm", type=float, default=None,
                   help="largest whole-lesion diameter in mm (default: 70 for glioma, 50 for mixed)")
    p.add_argument("--profile", default="demo", choices=PROFILES,
                   help="demo: every subject from --lesion_model; stress: subjects take in turn the kinds "
                        f"{', '.join(STRESS_KINDS)} (the lesion flags above do not apply) (default: demo)")
    p.add_argument("--naming", default="brats2021", choices=NAMINGS,
                   help="file names and label values of the raw subjects: brats2021 (<id>_flair, <id>_seg, "
                        "enhancing tumour 4) or brats2023 (BraTS-GLI-<n>-000-t2f, -seg, enhancing tumour 3) "
                        "(default: brats2021)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random (default: 0)")
    p.add_argument("--workers", type=int, default=2, help="processes working in parallel (default: 2)")
    return p


def main(argv=None):
    args = create_argparser().parse_args(argv)
    settings = lesion_settings(args.lesion_model, lesion_free_fraction=args.lesion_free_fraction,
                               max_lesions=args.max_lesions, min_diameter_mm=args.min_lesion_mm,
                               max_diameter_mm=args.max_lesion_mm)
    if not 0 < settings.min_diameter_mm <= settings.max_diameter_mm:
        raise UserError(f"--min_lesion_mm {settings.min_diameter_mm} and --max_lesion_mm {settings.max_diameter_mm}: "
                        f"need 0 < min <= max")
    if settings.max_lesions < 1:
        raise UserError(f"--max_lesions {settings.max_lesions}: must be at least 1")
    if not 0 <= settings.lesion_free_fraction < 1:
        raise UserError(f"--lesion_free_fraction {settings.lesion_free_fraction}: must be in [0, 1)")
    counts = make_demo_dataset(args.out_dir, num_subjects=args.num_subjects, seed=args.seed,
                               voxel_size=args.voxel_size, image_size=args.image_size,
                               val_fraction=args.val_fraction, min_tumor_pixels=args.min_tumor_pixels,
                               settings=STRESS_KINDS if args.profile == "stress" else settings, workers=max(1, args.workers),
                               naming=args.naming)
    print(format_counts(counts))
    print(f"wrote {args.out_dir}/raw, {args.out_dir}/slices and {args.out_dir}/preview.png")


if __name__ == "__main__":
    run_main(main)
