"""Is a scan what the models were trained on? Checks `scans.prepare_scan` runs before segmenting.

What the models expect comes from the training data's dataset.json (`Expectations`). A scan that
cannot be segmented meaningfully is a `UserError` (one line, exit status 2); one that can, but
less well than the training data, gets a warning in its prepared scan's `warnings` (printed and
kept). The rules:

- Voxel size, per canonical axis (x, y, z), against the range of the training subjects'
  (dataset.json "geometry", written by the converters): within a factor 1.5 of that range it is
  fine, up to a factor 4 a warning (slices are resized to the image size, so the models see
  nearly the same picture), beyond that an error. Without a recorded geometry (datasets prepared
  before it was recorded, hand-made ones) the check is skipped.
- Field of view (voxel size x voxels), per axis, likewise: fine within a factor 1.5, a warning up
  to a factor 3, an error beyond (a slab of a few slices, or a whole-body scan).
- Skull stripping, for data normalised on the brain (`intensity` "brain": the background must be
  exactly 0): the fraction of nonzero voxels (any channel) on the scan's four side faces, the
  ends of its canonical x and y axes in every slice. A skull-stripped brain lies inside the
  field of view, so these faces are zero; an unstripped head scan has scalp and noisy air there.
  Above 50 % is an error, above 10 % a warning. The axial end faces are left out, as a scan may
  cut the brain at its top or bottom.

Which modalities a scan holds, and whether a 4-D scan's channels fit, are settled when the scans
are found (`scans.find_scans`, `layouts.scan_channels`).
"""

from dataclasses import dataclass

from ..cli import UserError
from ..layouts import REGIONS, SCHEMES, canonical_modality
from ..volumes import voxel_geometry

VOXEL_FACTORS = (1.5, 4.0)  # (warning beyond, error beyond) this factor outside the training range
FOV_FACTORS = (1.5, 3.0)
BORDER_FRACTIONS = (0.1, 0.5)  # nonzero fraction of the side faces: (warning above, error above)


@dataclass(frozen=True)
class Expectations:
    """What the models were trained on, as the training data's dataset.json records it."""

    modalities: tuple = ()  # () when dataset.json names none
    geometry: dict = None  # {"voxel_mm": {"min": [x, y, z], "max": [...]}, "fov_mm": {...}}; None: unknown
    region: str = ""  # wt, tc, et; "" when the lesion was raw label values (options.lesion_labels)
    scheme: str = ""  # the training data's label scheme (layouts.SCHEMES); "" when unknown


def expectations(settings):
    """The `Expectations` of a prepared dataset's dataset.json (a dict)."""
    recorded = settings.get("modalities") or ([settings["modality"]] if settings.get("modality") else [])
    geometry = settings.get("geometry")
    if not (isinstance(geometry, dict) and all(isinstance(geometry.get(k), dict) for k in ("voxel_mm", "fov_mm"))):
        geometry = None
    scheme = settings.get("label_scheme")  # a model folder's preprocessing.json may describe it in words instead
    return Expectations(modalities=tuple(canonical_modality(m) or m for m in recorded), geometry=geometry,
                        region=settings.get("region") if settings.get("region") in REGIONS else "",
                        scheme=scheme if scheme in SCHEMES else "")


def _compare(path, what, values, recorded, factors, warnings):
    """Warn or raise when `values` (per axis) lie outside the recorded [min, max] by more than `factors`."""
    warn, fail = factors
    for axis, value, low, high in zip("xyz", values, recorded["min"], recorded["max"]):
        if low / warn <= value <= high * warn:
            continue
        training = f"{low:.3g}" if low == high else f"{low:.3g}-{high:.3g}"
        text = f"{path}: {what} along {axis} is {value:.3g} mm, the training data's {training} mm"
        if not low / fail <= value <= high * fail:
            raise UserError(f"{text} (more than {fail:g}x off: another kind of scan; resample it like the training "
                            f"data)")
        warnings.append(f"{text} (more than {warn:g}x off: the masks may be worse)")


def check_geometry(path, affine, shape, geometry):
    """Warnings for a scan (its canonical affine and shape) whose voxel size or field of view is off the
    training data's `geometry`; UserError when far off (see the module docstring)."""
    warnings = []
    if geometry:
        spacing, fov = voxel_geometry(affine, shape)
        _compare(path, "voxel size", spacing, geometry["voxel_mm"], VOXEL_FACTORS, warnings)
        _compare(path, "field of view", fov, geometry["fov_mm"], FOV_FACTORS, warnings)
    return warnings


def side_face_fraction(foreground):
    """The fraction of nonzero voxels on the four side faces (x and y ends, every slice) of a (X, Y, Z) mask."""
    faces = [foreground[0], foreground[-1], foreground[:, 0], foreground[:, -1]]
    return float(sum(f.sum() for f in faces) / sum(f.size for f in faces))


def check_skull_stripped(path, foreground):
    """Warnings (or a UserError) for a scan that does not look skull-stripped (see the module docstring)."""
    fraction = side_face_fraction(foreground)
    warn, fail = BORDER_FRACTIONS
    text = (f"{path}: {100 * fraction:.0f} % of the voxels on its side faces are nonzero, so it does not look "
            f"skull-stripped (the models were trained on skull-stripped scans with a background of exactly 0)")
    if fraction > fail:
        raise UserError(f"{text}; skull-strip it first")
    return [f"{text}; the brain's box and intensities may be off"] if fraction > warn else []


def check_scan(path, affine, foreground, options, expected):
    """Every check of a loaded scan: `affine` and `foreground` (X, Y, Z) in canonical orientation, `options`
    the training data's SliceOptions, `expected` its Expectations (None: nothing recorded). Returns warnings."""
    warnings = check_geometry(path, affine, foreground.shape, expected.geometry if expected else None)
    if options.intensity == "brain":
        warnings += check_skull_stripped(path, foreground)
    return warnings
