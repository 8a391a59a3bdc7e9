"""Convert the CHAOS MR training set (DICOM series with PNG ground truth) into the 2-D slice layout.

The input holds MR/<patient>/T2SPIR/{DICOM_anon,Ground} and MR/<patient>/T1DUAL/{DICOM_anon/InPhase,
DICOM_anon/OutPhase,Ground} (the CHAOS Train_Sets folder, or its MR folder). Each patient's series
of --modality is ordered by its DICOM geometry, paired with its ground-truth PNGs (grey levels
55-70 liver, 110-135 right kidney, 175-200 left kidney, 240-255 spleen), stored as NIfTI in
OUT/volumes/, normalised per volume (--clip_percentiles over all voxels), resized to --image_size
and labelled by the organs of --class_index (1 liver, 2 right kidney, 3 left kidney, 4 spleen):
`tumor` (organ present, at least --min_tumor_pixels pixels after resizing), `normal` (absent),
left out in between. Patients are split as for BraTS, with a manifest; dataset.json maps each
written slice to its DICOM file. Rules and paste-back: guided_diffusion/chaos.py, data/README.md.

example:
  python scripts/prepare_chaos.py --input_dir CHAOS_Train_Sets/Train_Sets --out_dir data/chaos/kidney \\
      --modality t2spir --class_index 2,3
"""

from guided_diffusion import chaos
from guided_diffusion.cli import UserError, run_main
from guided_diffusion.convert_cli import (
    add_converter_flags, check_converter_flags, converter_parser, report_conversion,
)
from guided_diffusion.volumes import SliceOptions, check_slice_options, export_slice_dataset, parse_int_list


def create_argparser():
    p = converter_parser(__doc__, "CHAOS Train_Sets folder (holding MR/) or the MR folder itself: one folder "
                                  "per patient")
    p.add_argument("--modality", choices=tuple(chaos.SERIES), default="t2spir",
                   help="series to convert: t2spir (T2SPIR/DICOM_anon), t1in or t1out (T1DUAL/DICOM_anon/InPhase "
                        "or OutPhase); the paper used T2-SPIR (default: t2spir)")
    p.add_argument("--class_index", default="2,3",
                   help="organ(s) that make a slice positive, comma-separated: 1 liver, 2 right kidney, 3 left "
                        "kidney, 4 spleen (default: 2,3, both kidneys, the paper's task)")
    p.add_argument("--clip_percentiles", type=float, nargs=2, default=(0.5, 99.5), metavar=("LOW", "HIGH"),
                   help="percentiles of all the volume's voxels mapped to black and white (default: 0.5 99.5)")
    add_converter_flags(p, "patients", image_size=128, positive="organ")
    return p


def main(argv=None):
    args = create_argparser().parse_args(argv)
    check_converter_flags(args)
    class_indices = parse_int_list(args.class_index, "--class_index")
    if not class_indices or not set(class_indices) <= set(chaos.ORGANS):
        raise UserError(f"--class_index {args.class_index!r}: expected organs among 1 liver, 2 right kidney, "
                        f"3 left kidney, 4 spleen, e.g. 2,3")
    options = check_slice_options(SliceOptions(
        image_size=args.image_size, intensity="percentile", clip_percentiles=tuple(args.clip_percentiles),
        crop="none", min_brain_fraction=0.0, min_lesion_pixels=args.min_tumor_pixels, lesion_labels=class_indices,
        image_format=args.format,
    ))
    cases = chaos.find_chaos_cases(args.input_dir, args.modality)
    counts = export_slice_dataset(
        cases, args.out_dir, options, input_dir=args.input_dir, val_fraction=args.val_fraction, seed=args.seed,
        workers=args.workers, stage=chaos.stage_series,
        extra_settings=dict(dataset="chaos", modality=args.modality, class_index=list(class_indices),
                            organs={str(k): v for k, v in chaos.ORGANS.items()},
                            grey_ranges={str(k): list(v) for k, v in chaos.GREY_RANGES.items()}))
    report_conversion(counts, args.out_dir)


if __name__ == "__main__":
    run_main(main)
