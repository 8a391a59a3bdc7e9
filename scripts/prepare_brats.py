"""Convert a BraTS or Decathlon brain-tumour training folder into the 2-D slice layout (see data/README.md).

The input holds one folder per subject with *_flair.nii.gz, *_t1.nii.gz, *_t1ce.nii.gz,
*_t2.nii.gz and *_seg.nii.gz (BraTS 2020/2021), or with *-t2f, *-t1n, *-t1c, *-t2w and *-seg.nii.gz
(BraTS 2023+: GLI, MEN, MET, PED, SSA), or is the Decathlon's Task01_BrainTumour (imagesTr/ with 4-D
images, labelsTr/); see guided_diffusion/layouts.py. Label values must fit the layout's scheme
(2020/2021: 1 NCR/NET, 2 ED, 4 ET; 2023+: 1 NCR, 2 ED, 3 ET; Decathlon: 1 edema, 2 non-enhancing,
3 enhancing); --region picks the tumour region by name in any of them. Axial slices with enough
brain are normalised per volume (percentile clip on brain voxels), cropped to a square around
the brain, resized, and written to OUT/{training,validation}/{normal,tumor,seg} with OUT/manifest.csv. A slice is
`tumor` when its resized mask has at least --min_tumor_pixels lesion pixels, `normal` when
its label map has no lesion voxel, and is left out in between. Subjects, not slices, are
split, so no subject is in both splits. Rerunning with the same flags gives the same files.

example:
  python scripts/prepare_brats.py --input_dir MICCAI_BraTS2020_TrainingData \\
      --out_dir data/brats/flair --modality flair --image_size 224
  python scripts/prepare_brats.py --input_dir Task01_BrainTumour --out_dir data/msd/tc --region tc
"""

from dataclasses import replace

from guided_diffusion.cli import UserError, run_main
from guided_diffusion.convert_cli import (
    add_converter_flags, check_converter_flags, converter_parser, report_conversion,
)
from guided_diffusion.layouts import REGIONS, region_labels
from guided_diffusion.volumes import (
    SliceOptions, check_slice_options, export_slice_dataset, find_brats_cases, parse_int_list, parse_modalities,
)


def create_argparser():
    p = converter_parser(__doc__, "BraTS folder with one sub-folder per subject")
    p.add_argument("--modality", default="flair",
                   help="flair, t1, t1ce, t2 (or the BraTS 2023 names t2f, t1n, t1c, t2w), 'all' (4 channels, "
                        "written as .npy) or a comma list (default: flair)")
    p.add_argument("--region", choices=tuple(REGIONS), default=None,
                   help="the lesion by name, in whichever label scheme the layout has: wt whole tumour (every "
                        "tumour label), tc tumour core (without the edema), et enhancing tumour (default: every "
                        "nonzero label, the whole tumour)")
    p.add_argument("--tumor_labels", default="",
                   help="raw label values counted as lesion, for data in none of the known label schemes (their "
                        "values are then not checked); excludes --region (default: empty, see --region)")
    p.add_argument("--min_brain_fraction", type=float, default=0.3,
                   help="skip slices whose brain area is below this fraction of the subject's largest (default: 0.3)")
    p.add_argument("--clip_percentiles", type=float, nargs=2, default=(0.5, 99.5), metavar=("LOW", "HIGH"),
                   help="brain-voxel percentiles mapped to black and white, per volume and modality "
                        "(default: 0.5 99.5)")
    p.add_argument("--crop", choices=("brain", "none"), default="brain",
                   help="cut a square around the subject's brain before resizing, or keep the whole slice "
                        "(default: brain)")
    p.add_argument("--crop_margin", type=int, default=4, help="voxels added around the brain's box (default: 4)")
    add_converter_flags(p, "subjects", image_size=224, positive="lesion",
                        format_help="file type of one-channel images; several channels are always .npy")
    return p


def main(argv=None):
    args = create_argparser().parse_args(argv)
    check_converter_flags(args)
    if args.region and args.tumor_labels.strip():
        raise UserError(f"--region {args.region} and --tumor_labels {args.tumor_labels}: give one (--region by name, "
                        f"--tumor_labels as raw values)")
    options = check_slice_options(SliceOptions(
        image_size=args.image_size, intensity="brain", clip_percentiles=tuple(args.clip_percentiles),
        crop=args.crop, crop_margin=args.crop_margin, min_brain_fraction=args.min_brain_fraction,
        min_lesion_pixels=args.min_tumor_pixels, lesion_labels=parse_int_list(args.tumor_labels, "--tumor_labels"),
        image_format=args.format,
    ))
    modalities = parse_modalities(args.modality)
    cases = find_brats_cases(args.input_dir, modalities)
    layout = cases[0].scheme
    region, labels_flag = args.region or "wt", None  # the default, every nonzero label, is the whole tumour
    if options.lesion_labels:  # raw values: the label scheme is the user's, not checked
        region, labels_flag = None, f"--tumor_labels {args.tumor_labels}"
        cases = [replace(case, scheme="") for case in cases]
    elif args.region:
        options = replace(options, lesion_labels=region_labels(layout, args.region))
        labels_flag = f"--region {args.region}"
    counts = export_slice_dataset(cases, args.out_dir, options, input_dir=args.input_dir,
                                  val_fraction=args.val_fraction, seed=args.seed, workers=args.workers,
                                  labels_flag=labels_flag,
                                  extra_settings=dict(dataset="brats", modalities=list(modalities),
                                                      label_scheme=layout, region=region))
    report_conversion(counts, args.out_dir)



if __name__ == "__main__":
    run_main(main)
