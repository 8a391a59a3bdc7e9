"""The converters' command line (`prepare_brats.py`, `prepare_synapse.py`, `prepare_chaos.py`): one parser
with the flags they share, one check of those flags, one closing report. The conversion itself is
`volumes.export_slice_dataset`."""

import argparse

from .cli import ArgumentParser, UserError
from .volumes import format_counts


def converter_parser(description, input_help):
    """A converter's parser with --input_dir (`input_help` says what it holds) and --out_dir."""
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False)
    parser.add_argument("--input_dir", required=True, help=input_help)
    parser.add_argument("--out_dir", required=True,
                        help="where the slice layout goes (replaced if it holds an earlier one)")
    return parser


def add_converter_flags(parser, unit, *, image_size, positive, format_help="image file type"):
    """The converters' shared flags: --image_size, --min_tumor_pixels, --format, --val_fraction, --seed and
    --workers (checked by `check_converter_flags`). `unit` names what is split and converted (subjects,
    cases, patients); `positive` what makes a slice positive ("lesion", "organ")."""
    parser.add_argument("--image_size", type=int, default=image_size,
                        help=f"side of the square slices in pixels (default: {image_size})")
    parser.add_argument("--min_tumor_pixels", type=int, default=10,
                        help=f"{positive} pixels (after resizing) a slice needs to be called tumor, the positive "
                             f"class (default: 10)")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help=f"{format_help} (default: png)")
    parser.add_argument("--val_fraction", type=float, default=0.2,
                        help=f"fraction of {unit} for validation (default: 0.2)")
    parser.add_argument("--seed", type=int, default=0, help=f"seed of the {unit[:-1]} split (default: 0)")
    parser.add_argument("--workers", type=int, default=1,
                        help=f"processes converting {unit} in parallel (default: 1)")


def check_converter_flags(args):
    """The converter flags (--workers, --seed, --val_fraction) checked before any input is read."""
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {args.seed}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise UserError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")


def report_conversion(counts, out_dir):
    """A converter's closing lines: the slices of each split and where they went."""
    print(format_counts(counts))
    print(f"wrote {out_dir}")
