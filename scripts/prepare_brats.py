"""Convert a BraTS 2020/2021 training folder into the 2-D slice layout (see data/README.md).

The input holds one folder per subject with *_flair.nii.gz, *_t1.nii.gz, *_t1ce.nii.gz,
*_t2.nii.gz and *_seg.nii.gz. Axial slices with enough brain are normalised per volume
(percentile clip on brain voxels), cropped to a square around the brain, resized, and
written to OUT/{training,validation}/{normal,tumor,seg} with OUT/manifest.csv. A slice is
`tumor` when its resized mask has at least --min_tumor_pixels lesion pixels, `normal` when
its label map has no lesion voxel, and is left out in between. Subjects, not slices, are
split, so no subject is in both splits. Rerunning with the same flags gives the same files.

example:
  python scripts/prepare_brats.py --input_dir MICCAI_BraTS2020_TrainingData \\
      --out_dir data/brats/flair --modality flair --image_size 224
"""

import argparse

from guided_diffusion.cli import ArgumentParser, run_main
from guided_diffusion.volumes import (
    SliceOptions, add_converter_flags, check_converter_flags, check_slice_options, export_slice_dataset,
    find_brats_cases, format_counts, parse_int_list, parse_modalities,
)


def create_argparser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    p.add_argument("--input_dir", required=True, help="BraTS folder with one sub-folder per subject")
    p.add_argument("--out_dir", required=True, help="where the slice layout goes (replaced if it holds an earlier one)")
    p.add_argument("--modality", default="flair",
                   help="flair, t1, t1ce, t2, 'all' (4 channels, written as .npy) or a comma list (default: flair)")
    p.add_argument("--image_size", type=int, default=224, help="side of the square slices in pixels (default: 224)")
    p.add_argument("--min_tumor_pixels", type=int, default=10,
                   help="lesion pixels (after resizing) a slice needs to be called tumor (default: 10)")
    p.add_argument("--tumor_labels", default="",
                   help="label values counted as lesion, e.g. '1,4' for the tumour core; empty = every nonzero "
                        "label, the whole tumour (default: empty)")
    p.add_argument("--min_brain_fraction", type=float, default=0.3,
                   help="skip slices whose brain area is below this fraction of the subject's largest (default: 0.3)")
    p.add_argument("--clip_percentiles", type=float, nargs=2, default=(0.5, 99.5), metavar=("LOW", "HIGH"),
                   help="brain-voxel percentiles mapped to black and white, per volume and modality "
                        "(default: 0.5 99.5)")
    p.add_argument("--crop", choices=("brain", "none"), default="brain",
                   help="cut a square around the subject's brain before resizing, or keep the whole slice "
                        "(default: brain)")
    p.add_argument("--crop_margin", type=int, default=4, help="voxels added around the brain's box (default: 4)")
    p.add_argument("--format", choices=("png", "jpg"), default="png",
                   help="file type of one-channel images; several channels are always .npy (default: png)")
    add_converter_flags(p, "subjects")
    return p


def main(argv=None):
    args = create_argparser().parse_args(argv)
    check_converter_flags(args)
    options = check_slice_options(SliceOptions(
        image_size=args.image_size, intensity="brain", clip_percentiles=tuple(args.clip_percentiles),
        crop=args.crop, crop_margin=args.crop_margin, min_brain_fraction=args.min_brain_fraction,
        min_lesion_pixels=args.min_tumor_pixels, lesion_labels=parse_int_list(args.tumor_labels, "--tumor_labels"),
        image_format=args.format,
    ))
    modalities = parse_modalities(args.modality)
    cases = find_brats_cases(args.input_dir, modalities)
    counts = export_slice_dataset(cases, args.out_dir, options, input_dir=args.input_dir,
                                  val_fraction=args.val_fraction, seed=args.seed, workers=args.workers,
                                  extra_settings=dict(dataset="brats", modalities=list(modalities)))
    print(format_counts(counts))
    print(f"wrote {args.out_dir}")



if __name__ == "__main__":
    run_main(main)
