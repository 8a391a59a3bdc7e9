"""Convert the Synapse / BTCV abdominal CT set into the 2-D slice layout (see data/README.md).

The input holds img/imgXXXX.nii.gz and label/labelXXXX.nii.gz (BTCV organ labels:
1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver, 7 stomach,
8 aorta, ...). Axial slices are windowed (--ct_window, in HU), resized to --image_size and
labelled by the organ chosen with --class_index: `tumor` (organ present, at least
--min_tumor_pixels pixels after resizing), `normal` (absent), left out in between. The
mask in seg/ is that organ. Cases are split by subject as for BraTS, with a manifest.

example:
  python scripts/prepare_synapse.py --input_dir RawData/Training --out_dir data/synapse/kidney --class_index 2,3
"""

from guided_diffusion.cli import UserError, run_main
from guided_diffusion.convert_cli import (
    add_converter_flags, check_converter_flags, converter_parser, report_conversion,
)
from guided_diffusion.volumes import (
    SliceOptions, check_slice_options, export_slice_dataset, find_btcv_cases, parse_int_list,
)


def create_argparser():
    p = converter_parser(__doc__, "folder holding img/ and label/")
    p.add_argument("--class_index", default="1",
                   help="organ label(s) that make a slice positive, comma-separated; the original code's class 2 "
                        "meant both kidneys, i.e. '2,3' (default: 1, spleen)")
    p.add_argument("--ct_window", type=float, nargs=2, default=(-125.0, 275.0), metavar=("LOW", "HIGH"),
                   help="Hounsfield units mapped to black and white (default: -125 275)")
    add_converter_flags(p, "cases", image_size=128, positive="organ")
    return p


def main(argv=None):
    args = create_argparser().parse_args(argv)
    check_converter_flags(args)
    class_indices = parse_int_list(args.class_index, "--class_index")
    if not class_indices or min(class_indices) < 1:
        raise UserError(f"--class_index {args.class_index!r}: expected organ labels >= 1, e.g. 1 or 2,3")
    options = check_slice_options(SliceOptions(
        image_size=args.image_size, intensity="ct", ct_window=tuple(args.ct_window), crop="none",
        min_brain_fraction=0.0, min_lesion_pixels=args.min_tumor_pixels, lesion_labels=class_indices,
        image_format=args.format,
    ))
    cases = find_btcv_cases(args.input_dir)
    counts = export_slice_dataset(cases, args.out_dir, options, input_dir=args.input_dir,
                                  val_fraction=args.val_fraction, seed=args.seed, workers=args.workers,
                                  extra_settings=dict(dataset="synapse", class_index=list(class_indices)))
    report_conversion(counts, args.out_dir)



if __name__ == "__main__":
    run_main(main)
