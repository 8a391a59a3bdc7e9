"""The slice layout's names and fixed values, `SliceOptions` (how volumes become slices) and the
parsers of the converters' list flags."""

from dataclasses import dataclass

from .. import layouts
from ..cli import UserError

BRATS_MODALITIES = layouts.MODALITIES
SPLITS = ("training", "validation")
CLASSES = ("normal", "tumor")
MANIFEST_NAME = "manifest.csv"
SETTINGS_NAME = "dataset.json"
MANIFEST_FIELDS = (
    "file", "split", "label", "subject", "slice_index", "lesion_pixels", "mask",
    "source", "seg_source", "x0", "x1", "y0", "y1",
)
MANIFEST_INT_FIELDS = ("slice_index", "lesion_pixels", "x0", "x1", "y0", "y1")


@dataclass(frozen=True)
class SliceOptions:
    """How volumes become slices; every field is a command-line flag of the converters."""

    image_size: int = 224
    intensity: str = "brain"  # "brain": percentile clip on brain voxels; "ct": fixed HU window;
    # "percentile": percentile clip on every voxel (data that are not skull-stripped, e.g. abdominal MR)
    clip_percentiles: tuple = (0.5, 99.5)
    ct_window: tuple = (-125.0, 275.0)
    crop: str = "brain"  # "brain": square box around the brain; "none": the whole slice
    crop_margin: int = 4
    min_brain_fraction: float = 0.3  # of the subject's largest axial brain area
    min_lesion_pixels: int = 10  # in the written (resized) mask
    lesion_labels: tuple = ()  # label values that count as lesion; () = any nonzero
    image_format: str = "png"  # png | jpg for one channel; npy is used for several


def parse_modalities(text):
    """'flair', 'all' (the four BraTS modalities, in the order flair, t1, t1ce, t2) or a comma list; BraTS 2023
    names (t2f, t1n, t1c, t2w) are read as the canonical flair, t1, t1ce, t2 (see `layouts`)."""
    return layouts.parse_modalities(text)


def parse_int_list(text, flag):
    """'1' or '2,3' -> (2, 3); '' -> ()."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected integers separated by commas") from None


def check_slice_options(options):
    """UserError naming the flag for any setting that cannot work."""
    o = options
    checks = [
        (o.image_size >= 8, f"--image_size must be at least 8, got {o.image_size}"),
        (o.min_lesion_pixels >= 1, f"--min_tumor_pixels must be at least 1, got {o.min_lesion_pixels}"),
        (0 <= o.min_brain_fraction <= 1, f"--min_brain_fraction must be in [0, 1], got {o.min_brain_fraction}"),
        (0 <= o.clip_percentiles[0] < o.clip_percentiles[1] <= 100,
         f"--clip_percentiles must be LOW HIGH with 0 <= LOW < HIGH <= 100, got {o.clip_percentiles}"),
        (o.ct_window[0] < o.ct_window[1], f"--ct_window must be LOW HIGH with LOW < HIGH, got {o.ct_window}"),
        (o.crop_margin >= 0, f"--crop_margin must be at least 0, got {o.crop_margin}"),
        (o.image_format in ("png", "jpg", "npy"), f"--format must be png, jpg or npy, got {o.image_format}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return options
