"""3-D NIfTI volumes to the 2-D slice layout the loaders read, and back.

One implementation shared by `scripts/prepare_brats.py`, `scripts/prepare_synapse.py`,
`scripts/prepare_chaos.py` (through `guided_diffusion.chaos`) and `scripts/make_demo_data.py`. The layout it writes (see data/README.md):

    ROOT/training/{normal,tumor,seg}/    ROOT/validation/{normal,tumor,seg}/
    ROOT/manifest.csv                    one row per written slice
    ROOT/dataset.json                    the settings and the subject split

Geometry. A volume is read in its closest canonical (RAS+) orientation and cut into
axial slices `volume[:, :, z]`. A slice is shown with anterior at the top and the
volume's x axis running left to right; a square box [x0, x1) x [y0, y1) of voxels
(recorded in the manifest) is cut out and resized to `image_size`. `paste_slices`
inverts all of this, so per-slice predictions go back into the source voxel grid.

Pixel values. Images are 8-bit: 0..255 is the normalised [0, 1] range, which the
loaders map to [-1, 1]. Several channels (e.g. four BraTS modalities) are written as
one uint8 `.npy` array of shape (C, H, W). Masks are 8-bit PNG, 0 = background,
255 = lesion; every written slice has one (all zeros for `normal` slices).
"""

import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import nibabel as nib
import numpy as np
from PIL import Image
from tqdm import tqdm

from . import layouts
from .cli import UserError, atomic_directory
from .layouts import VolumeCase  # the converters' case, defined with the layouts that find them

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


# ----------------------------------------------------------------------------- reading


def _one_line(err):
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _load_nifti(path, warn=None, channel=None):
    try:
        img = nib.load(os.fspath(path))
        if channel is None:
            data = img.get_fdata(dtype=np.float32)
        elif len(img.shape) == 4 and channel < img.shape[3]:
            data = np.array(img.dataobj[..., channel], dtype=np.float32)  # one channel read, as a writable copy
        else:
            raise UserError(f"{path}: expected a 4-D volume with channel {channel} on its 4th axis (a Decathlon "
                            f"image), got shape {img.shape}")
    except UserError:
        raise
    except Exception as err:  # nibabel and gzip raise many kinds for broken files
        raise UserError(f"{path}: cannot read NIfTI volume ({_one_line(err)})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UserError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad and warn is not None:
        warn(f"{path}: {bad} NaN or infinite voxels, read as 0")
    return img, np.nan_to_num(data, copy=False, nan=0.0, posinf=0.0, neginf=0.0)


def _canonical_ornt(affine):
    return nib.orientations.io_orientation(affine)


def load_canonical(path, warn=None, channel=None):
    """Read a 3-D NIfTI volume (or `channel` of a 4-D one) as float32 in closest canonical (RAS+) orientation.

    Returns (array, affine); UserError naming `path` if it cannot be read. NaN and infinite voxels
    read as 0, said through `warn(message)` when given.
    """
    img, data = _load_nifti(path, warn, channel)
    ornt = _canonical_ornt(img.affine)
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)  # shape before reorienting
    data = nib.orientations.apply_orientation(data, ornt)
    return np.ascontiguousarray(data, dtype=np.float32), affine


def lesion_mask(labels, lesion_labels=()):
    """A label map (any numeric array) as a lesion mask: the `lesion_labels` values, or every nonzero label."""
    labels = np.rint(np.asarray(labels)).astype(np.int64)
    return np.isin(labels, lesion_labels) if lesion_labels else labels != 0


def label_values(labels):
    """The distinct values of a label map (rounded to integers), sorted."""
    labels = np.rint(np.asarray(labels)).astype(np.int64).ravel()
    if labels.size and 0 <= labels.min() and labels.max() < 1 << 16:
        return [int(v) for v in np.flatnonzero(np.bincount(labels))]  # far faster than np.unique on a volume
    return [int(v) for v in np.unique(labels)]


def voxel_geometry(affine, shape):
    """(voxel size, field of view) in mm along each array axis of a volume with this affine and shape."""
    spacing = np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(0))
    return spacing, spacing * np.asarray(shape[:3], np.float64)


def find_brats_cases(root, modalities):
    """List the subjects of a BraTS 2020/2021, BraTS 2023+ or Decathlon Task01 folder (see `layouts`); each
    case's `scheme` names its layout, whose label values `export_slice_dataset` checks."""
    return layouts.find_cases(root, tuple(modalities))


def find_btcv_cases(root):
    """List BTCV / Synapse cases: `img/imgXXXX.nii.gz` with `label/labelXXXX.nii.gz`."""
    if not os.path.isdir(root):
        raise UserError(f"--input_dir {root}: no such directory")
    img_dir, label_dir = os.path.join(root, "img"), os.path.join(root, "label")
    for folder in (img_dir, label_dir):
        if not os.path.isdir(folder):
            raise UserError(f"{folder}: no such directory (expected img/imgXXXX.nii.gz and label/labelXXXX.nii.gz)")
    images = sorted(n for n in os.listdir(img_dir) if n.startswith("img") and n.endswith((".nii.gz", ".nii")))
    if not images:
        raise UserError(f"{img_dir}: no imgXXXX.nii.gz files")
    cases = []
    for name in images:
        ext = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
        case_id = name[len("img"):-len(ext)]
        candidates = [os.path.join(label_dir, f"label{case_id}{e}") for e in (".nii.gz", ".nii")]
        seg = next((c for c in candidates if os.path.isfile(c)), None)
        if seg is None:
            raise UserError(f"{os.path.join(img_dir, name)}: no label file {candidates[0]}")
        cases.append(VolumeCase(f"img{case_id}", (os.path.join(img_dir, name),), seg))
    return cases


# ----------------------------------------------------------------------------- pixels


def normalize_percentiles(volume, foreground, low=0.5, high=99.5):
    """Map the [low, high] percentiles of the foreground voxels to [0, 1], clip, zero the background."""
    values = volume[foreground]
    out = np.zeros(volume.shape, np.float32)
    if values.size == 0:
        return out
    lo, hi = np.percentile(values, [low, high])
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    out[foreground] = np.clip((values - lo) * scale, 0.0, 1.0)
    return out


def ct_window(volume, low=-125.0, high=275.0):
    """Map Hounsfield units in [low, high] to [0, 1], clipping outside."""
    return np.clip((volume - low) / (high - low), 0.0, 1.0).astype(np.float32)


def to_display(slice_xy):
    """Axial slice indexed [x, y] -> image [row, col], anterior (high y) at the top."""
    return slice_xy.T[::-1]


def from_display(image):
    """Inverse of `to_display`."""
    return image[::-1].T


def square_box(footprint_xy, margin=0):
    """Square [x0, x1, y0, y1) around the True pixels of a 2-D footprint, `margin` voxels wider per side."""
    xs, ys = np.flatnonzero(footprint_xy.any(1)), np.flatnonzero(footprint_xy.any(0))
    if xs.size == 0:
        xs, ys = np.array([0, footprint_xy.shape[0] - 1]), np.array([0, footprint_xy.shape[1] - 1])
    side = int(max(xs[-1] - xs[0] + 1, ys[-1] - ys[0] + 1)) + 2 * margin
    x0 = int(np.floor((xs[0] + xs[-1] + 1 - side) / 2))
    y0 = int(np.floor((ys[0] + ys[-1] + 1 - side) / 2))
    return x0, x0 + side, y0, y0 + side


def cut_box(slice_xy, box):
    """The box of a slice as a display image; parts outside the slice are zero."""
    x0, x1, y0, y1 = box
    out = np.zeros((x1 - x0, y1 - y0), slice_xy.dtype)
    sx0, sx1 = max(x0, 0), min(x1, slice_xy.shape[0])
    sy0, sy1 = max(y0, 0), min(y1, slice_xy.shape[1])
    if sx1 > sx0 and sy1 > sy0:
        out[sx0 - x0:sx1 - x0, sy0 - y0:sy1 - y0] = slice_xy[sx0:sx1, sy0:sy1]
    return to_display(out)


def paste_box(slice_xy, image, box):
    """Write a display image (already box-sized) into the box of a slice, in place; inverse of `cut_box`."""
    x0, x1, y0, y1 = box
    patch = from_display(image)
    sx0, sx1 = max(x0, 0), min(x1, slice_xy.shape[0])
    sy0, sy1 = max(y0, 0), min(y1, slice_xy.shape[1])
    if sx1 > sx0 and sy1 > sy0:
        slice_xy[sx0:sx1, sy0:sy1] = patch[sx0 - x0:sx1 - x0, sy0 - y0:sy1 - y0]


def resize2d(image, shape, nearest=False):
    """Resize a 2-D float array to (rows, cols): bilinear with anti-aliasing, or nearest for masks."""
    shape = tuple(int(s) for s in shape)
    if image.shape == shape:
        return image.astype(np.float32, copy=True)
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(pil.resize((shape[1], shape[0]), resample), dtype=np.float32)


def to_uint8(image, low=0.0, high=1.0):
    """Floats in [low, high] (default [0, 1]; [-1, 1] for model images) -> 0..255 bytes, rounded
    half to even and clipped."""
    return np.rint(np.clip((np.asarray(image) - low) * (255.0 / (high - low)), 0.0, 255.0)).astype(np.uint8)


# ----------------------------------------------------------------------------- slicing


def split_subjects(subjects, val_fraction, seed):
    """Map each subject to 'training' or 'validation'; depends only on the set of names and `seed`."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    names = sorted(subjects)
    if len(set(names)) != len(names):
        dup = next(a for a, b in zip(names, names[1:]) if a == b)
        raise UserError(f"subject {dup} appears twice in the input")
    n_val = int(round(len(names) * val_fraction))
    if val_fraction > 0 and len(names) >= 2:
        n_val = min(max(n_val, 1), len(names) - 1)
    order = np.random.default_rng(seed).permutation(len(names))
    validation = {names[i] for i in order[:n_val]}
    return {s: ("validation" if s in validation else "training") for s in names}


def normalise_volume(volume, options):
    """Channels (C, X, Y, Z) of raw intensities -> (channels in [0, 1], foreground (X, Y, Z) bool) by
    `options.intensity`: the converters and `segment_scans.py` share this, so a scan is normalised
    exactly as the training slices were."""
    if options.intensity == "brain":
        foreground = (volume != 0).any(0)  # skull-stripped data: background is exactly zero
        low, high = options.clip_percentiles
        channels = np.stack([normalize_percentiles(v, foreground, low, high) for v in volume])
    elif options.intensity == "ct":
        foreground = np.ones(volume.shape[1:], bool)
        channels = ct_window(volume, *options.ct_window)
    elif options.intensity == "percentile":
        foreground = np.ones(volume.shape[1:], bool)  # no background to leave out: every voxel counts
        low, high = options.clip_percentiles
        channels = np.stack([normalize_percentiles(v, foreground, low, high) for v in volume])
    else:
        raise ValueError(f"unknown intensity mode {options.intensity!r}")
    return channels, foreground


def slice_geometry(foreground, options):
    """(box, z indices) of a volume: the square crop box (see `square_box`) and the axial slices with
    enough foreground (`options.min_brain_fraction` of the largest)."""
    if options.crop == "brain":
        box = square_box(foreground.any(2), options.crop_margin)
    else:
        box = square_box(np.ones(foreground.shape[:2], bool))
    area = foreground.sum((0, 1))
    keep = (area > 0) & (area >= options.min_brain_fraction * area.max())
    return box, [int(z) for z in np.flatnonzero(keep)]


def cut_image(channels, box, z, size):
    """Slice z of normalised channels as the written uint8 image (C, size, size)."""
    return np.stack([to_uint8(resize2d(cut_box(c[:, :, z], box), (size, size))) for c in channels])


def _read_case(case, options, facts=None):
    """Load a case's channels (normalised to [0, 1]), lesion mask and brain footprint.

    The label values are checked against the case's layout (`case.scheme`, when set); `facts`, if given,
    gets the voxel size and field of view in mm (canonical axes) and the label values found."""
    channel_index = getattr(case, "channel_index", ()) or (None,) * len(case.images)
    loaded = [load_canonical(p, channel=c) for p, c in zip(case.images, channel_index)]
    seg, _ = load_canonical(case.seg)
    found = label_values(seg)
    if getattr(case, "scheme", ""):
        layouts.check_label_values(found, case.scheme, case.seg)
    if facts is not None:
        spacing, fov = voxel_geometry(loaded[0][1], loaded[0][0].shape)
        facts.update(voxel_mm=spacing.tolist(), fov_mm=fov.tolist(), label_values=found)
    shape = loaded[0][0].shape
    for path, (data, _) in zip(case.images[1:], loaded[1:]):
        if data.shape != shape:
            raise UserError(f"{path}: shape {data.shape} differs from {case.images[0]} {shape}")
    if seg.shape != shape:
        raise UserError(f"{case.seg}: mask shape {seg.shape} differs from image {case.images[0]} shape {shape}")
    lesion = lesion_mask(seg, options.lesion_labels)
    channels, foreground = normalise_volume(np.stack([data for data, _ in loaded]), options)
    return channels, lesion, foreground


def _write_slice(path_stem, image, image_format):
    """Write (C, H, W) uint8; returns the file name used."""
    if image.shape[0] > 1 or image_format == "npy":
        name = path_stem + ".npy"
        np.save(name, image)
    elif image_format == "png":
        name = path_stem + ".png"
        Image.fromarray(image[0]).save(name, format="PNG")
    elif image_format == "jpg":
        name = path_stem + ".jpg"
        Image.fromarray(image[0]).save(name, format="JPEG", quality=95)
    else:
        raise ValueError(f"unknown image format {image_format!r}")
    return os.path.basename(name)


def export_case(case, split, options, out_root, facts=None):
    """Write the usable slices of one case under out_root/split and return their manifest rows (`facts`: see
    `_read_case`)."""
    channels, lesion, foreground = _read_case(case, options, facts)
    size = options.image_size
    box, kept = slice_geometry(foreground, options)
    rows = []
    for z in kept:
        mask = resize2d(cut_box(lesion[:, :, z].astype(np.float32), box), (size, size), nearest=True) > 0.5
        lesion_pixels = int(mask.sum())
        if not lesion[:, :, z].any():
            label = "normal"
        elif lesion_pixels >= options.min_lesion_pixels:
            label = "tumor"
        else:
            continue  # a lesion too small to call the slice either way
        image = cut_image(channels, box, z, size)
        stem = f"{case.subject}_z{z:03d}"
        name = _write_slice(os.path.join(out_root, split, label, stem), image, options.image_format)
        Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(out_root, split, "seg", stem + ".png"))
        rows.append(dict(
            file=f"{split}/{label}/{name}", split=split, label=label, subject=case.subject,
            slice_index=z, lesion_pixels=lesion_pixels, mask=f"{split}/seg/{stem}.png",
            source=os.path.abspath(case.images[0]), seg_source=os.path.abspath(case.seg),
            x0=box[0], x1=box[1], y0=box[2], y1=box[3],
        ))
    return rows


def _export_job(job):
    case, split, options, root, stage = job
    info = None
    if stage is not None:
        case, info = stage(case, root)
    facts = {}
    return case.subject, export_case(case, split, options, root, facts), info, facts


def _geometry_range(facts):
    """dataset.json's "geometry": the smallest and largest voxel size and field of view (mm, canonical x, y, z)
    over the subjects, which `segment.scan_checks` compares scans with."""
    def extent(key):
        values = np.array([f[key] for f in facts], np.float64)
        return {"min": np.round(values.min(0), 4).tolist(), "max": np.round(values.max(0), 4).tolist()}

    return {"voxel_mm": extent("voxel_mm"), "fov_mm": extent("fov_mm")}


def _labels_found(facts):
    return sorted({v for f in facts for v in f["label_values"]})


def _final_path(path, tmp, final):
    """`path` as it will be once the temporary output folder `tmp` is renamed to `final`."""
    if os.path.commonpath([path, tmp]) == tmp:
        return os.path.join(final, os.path.relpath(path, tmp))
    return path


def _stored_path(path, out_root, input_dir):
    """How the manifest stores a volume's path: relative to the dataset root when inside it, else relative
    to the input folder when inside that, else absolute; see `resolve_source`."""
    for base in (out_root, input_dir):
        if os.path.commonpath([path, base]) == base:
            return os.path.relpath(path, base)
    return path


def _check_output_dir(out_root):
    if os.path.exists(out_root):
        if not os.path.isdir(out_root):
            raise UserError(f"--out_dir {out_root}: exists and is not a directory")
        if os.listdir(out_root) and not os.path.isfile(os.path.join(out_root, MANIFEST_NAME)):
            raise UserError(f"--out_dir {out_root}: exists, is not empty and holds no {MANIFEST_NAME}; "
                            f"refusing to replace it (choose a new or empty folder)")


def export_slice_dataset(cases, out_root, options, *, input_dir, val_fraction=0.1, seed=0, workers=1,
                         extra_settings=None, stage=None, split_of=None, labels_flag=None):
    """Write the whole slice layout for `cases` to `out_root`; return {split: {label: count}}.

    labels_flag: the flag that chose `options.lesion_labels` (e.g. "--region et"); given, it is a UserError
    naming it when none of those labels occurs in any label map. dataset.json records the label values
    found and the range of voxel sizes and fields of view ("geometry").

    split_of: {subject: split} where the caller splits the subjects itself (default: `split_subjects`).

    Subjects are split (never shared between splits), each split's slices written, and the
    manifest and settings saved. All of it goes to a temporary folder first, so on any error
    nothing is left behind and an earlier export at `out_root` stays untouched.

    `stage`, if given, is a picklable function (case, root) -> (VolumeCase, info) run in the
    worker before a case is sliced: it may write the case's NIfTI volumes anywhere under `root`
    (the temporary output folder, e.g. converted from DICOM); the manifest then records their
    paths at the final place under `out_root`, and each case's JSON-able `info` goes to
    dataset.json under "cases" (keyed by subject). `cases` are then whatever `stage` reads; each
    needs a `subject` attribute.
    """
    out_root = os.path.abspath(out_root)
    _check_output_dir(out_root)
    split_of = split_of or split_subjects([c.subject for c in cases], val_fraction, seed)
    with atomic_directory(out_root) as tmp:
        for split in SPLITS:
            for sub in CLASSES + ("seg",):
                os.makedirs(os.path.join(tmp, split, sub))
        jobs = [(case, split_of[case.subject], options, tmp, stage) for case in cases]
        rows, staged, facts = [], {}, []
        progress = dict(total=len(jobs), desc="subjects", unit="subject")

        def check_lesion_labels():
            found = _labels_found(facts)
            if labels_flag and options.lesion_labels and not set(options.lesion_labels) & set(found):
                raise UserError(f"{labels_flag}: label value(s) {', '.join(map(str, options.lesion_labels))} occur "
                                f"in no label map under {os.path.abspath(input_dir)} (found "
                                f"{', '.join(map(str, found))}); nothing written")

        def collect(results):
            bar = tqdm(**progress)  # updated by hand: a bar iterating `results` closes itself, kept, on an error
            try:
                for subject, case_rows, info, case_facts in results:
                    rows.extend(case_rows)
                    facts.append(case_facts)
                    if stage is not None:
                        staged[subject] = info
                    bar.update(1)
                check_lesion_labels()  # while the bar is up, so that it is erased on an error
            except BaseException:
                bar.leave = False  # erase the bar, so that an error is the one line the user sees
                raise
            finally:
                bar.close()

        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                collect(pool.map(_export_job, jobs))
        else:
            collect(map(_export_job, jobs))
        input_dir = os.path.abspath(input_dir)
        for row in rows:  # relative to the dataset (volumes staged inside it) or to the input folder
            for key in ("source", "seg_source"):
                row[key] = _stored_path(_final_path(row[key], tmp, out_root), out_root, input_dir)
        counts = {s: {c: sum(r["split"] == s and r["label"] == c for r in rows) for c in CLASSES} for s in SPLITS}
        for split in SPLITS:
            has_subjects = split in split_of.values()
            if has_subjects and counts[split]["tumor"] == 0:
                raise UserError(f"{input_dir}: no {split} slice has at least --min_tumor_pixels "
                                f"{options.min_lesion_pixels} lesion pixels, so {split}/tumor would be empty; "
                                f"nothing written")
        rows.sort(key=lambda r: r["file"])
        with open(os.path.join(tmp, MANIFEST_NAME), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        settings = dict(
            input_dir=input_dir, input_dir_relative=os.path.relpath(input_dir, out_root), options=asdict(options),
            val_fraction=val_fraction, seed=seed,
            counts=counts, label_values=_labels_found(facts),
            **({"geometry": _geometry_range(facts)} if facts else {}),
            subjects={s: sorted(k for k, v in split_of.items() if v == s) for s in SPLITS},
            **({"cases": staged} if stage is not None else {}),
            **(extra_settings or {}),
        )
        with open(os.path.join(tmp, SETTINGS_NAME), "w") as f:
            json.dump(settings, f, indent=1, sort_keys=True)
            f.write("\n")
    return counts


def format_counts(counts):
    """One line per split: 'training: 1200 normal, 800 tumor'."""
    return "\n".join(f"{s}: {counts[s]['normal']} normal, {counts[s]['tumor']} tumor" for s in SPLITS)


# ----------------------------------------------------------------------------- back to 3-D


def read_settings(root):
    """ROOT/dataset.json as a dict ({} when there is none, as in hand-made layouts)."""
    path = os.path.join(root, SETTINGS_NAME)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read the dataset settings ({_one_line(err)})") from None


def resolve_source(root, stored, settings=None, raw_dir=None):
    """The path of a volume the manifest stores as `stored`.

    An absolute path (manifests written before paths were relative) is taken as it is. A relative one
    is looked up, first hit wins: under `raw_dir` (the raw data's new place, given by the user), under
    the dataset root (volumes written inside the dataset), under the input folder recorded in
    dataset.json, relative to the root (so a dataset moved together with its raw data still resolves),
    then as recorded. Without a hit it is the recorded input folder's path, for the error message.
    """
    if os.path.isabs(stored):
        return stored
    settings = read_settings(root) if settings is None else settings
    candidates = [os.path.join(raw_dir, stored)] if raw_dir else []
    candidates.append(os.path.join(root, stored))
    if settings.get("input_dir_relative"):
        candidates.append(os.path.normpath(os.path.join(root, settings["input_dir_relative"], stored)))
    if settings.get("input_dir"):
        candidates.append(os.path.join(settings["input_dir"], stored))
    return next((c for c in candidates if os.path.exists(c)), candidates[-1])


def read_manifest(root, raw_dir=None):
    """Rows of ROOT/manifest.csv as dicts, integer columns converted and `source` / `seg_source` resolved
    to paths (see `resolve_source`; `raw_dir` is where the raw data are now, if they moved)."""
    path = os.path.join(root, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file (the prepare scripts write it beside training/ and validation/)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MANIFEST_FIELDS if c not in (reader.fieldnames or ())]
        if missing:
            raise UserError(f"{path}: not a slice manifest (missing columns {', '.join(missing)})")
        rows = list(reader)
    settings = read_settings(root)
    for row in rows:
        for key in MANIFEST_INT_FIELDS:
            row[key] = int(row[key])
        for key in ("source", "seg_source"):
            if row[key]:
                row[key] = resolve_source(root, row[key], settings, raw_dir)
    return rows


def paste_subject_masks(src_dir, split, names, kinds, folder, raw_dir=None):
    """Slice masks back into each subject's source grid, written as `<subject>_pred<kind>.nii.gz` (uint8)
    in `folder`; returns one row per subject with 3-D Dice per kind where its label map is found.

    names: the segmented slice files of `split`; kinds: {suffix: name -> (H, W) bool mask}.
    """
    from .metrics import dice_3d

    rows = [r for r in read_manifest(src_dir, raw_dir) if r["split"] == split]
    lesion_labels = tuple(read_settings(src_dir).get("options", {}).get("lesion_labels", ()) or ())
    by_name = {os.path.basename(r["file"]): r for r in rows}
    segmented = {os.path.basename(n) for n in names}
    os.makedirs(folder, exist_ok=True)
    results = []
    for source in sorted({by_name[n]["source"] for n in segmented}):
        if not os.path.isfile(source):
            raise UserError(f"{src_dir}: the source volume {source} is not there (moved? pass --raw_dir, the "
                            f"raw data's new folder)")
        subject_rows = [r for r in rows if r["source"] == source]
        mine = [r for r in subject_rows if os.path.basename(r["file"]) in segmented]
        seg_path = subject_rows[0]["seg_source"]
        gt = None
        if seg_path and os.path.isfile(seg_path):
            gt = lesion_mask(nib.load(seg_path).dataobj, lesion_labels)
        result = {"subject": subject_rows[0]["subject"], "slices_evaluated": len(mine)}
        for suffix, mask_of in kinds.items():
            pasted = paste_slices(mine, {r["file"]: mask_of(r["file"]).astype(np.float32) for r in mine},
                                  nearest=True, source=source)
            prediction = np.asarray(pasted.dataobj) > 0.5
            if gt is not None and prediction.shape != gt.shape:
                raise UserError(f"{seg_path}: shape {gt.shape} differs from {source} {prediction.shape}")
            result[f"dice_3d{suffix}"] = dice_3d(prediction, gt) if gt is not None else None
            save_like(prediction.astype(np.uint8), nib.load(source),
                      os.path.join(folder, f"{result['subject']}_pred{suffix}.nii.gz"))
        results.append(result)
    return results


def save_like(data, reference, path):
    """Write `data` (the reference's voxel grid) as NIfTI with the reference's affine, qform and sform,
    so a viewer overlays it on the reference."""
    header = reference.header.copy()
    header.set_data_dtype(data.dtype)
    # a 4-D reference (a Decathlon image, every channel on one grid) gives its 3-D grid
    shape = reference.shape if data.size == np.prod(reference.shape) else reference.shape[:3]
    image = nib.Nifti1Image(data.reshape(shape), reference.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    for form in ("qform", "sform"):
        matrix, code = getattr(reference, f"get_{form}")(coded=True)
        getattr(image, f"set_{form}")(matrix, int(code))  # code 0 (unset) stays unset
    nib.save(image, path)


def paste_slices(rows, images, nearest=True, source=None):
    """Put 2-D per-slice arrays back into the voxel grid of their source volume.

    rows: manifest rows of one source volume; images: {row["file"]: 2-D array (H, W)}
    (e.g. predicted masks at the written image size); slices without an entry stay zero.
    Returns a float32 Nifti1Image on the source's own grid and affine.
    """
    if source is None:
        sources = {r["source"] for r in rows}
        if len(sources) != 1:
            raise ValueError(f"rows come from {len(sources)} source volumes; pass one volume's rows")
        source = sources.pop()
    header_img = nib.load(source)
    shape = header_img.shape[:3]
    ornt = _canonical_ornt(header_img.affine)
    canonical_shape = [0, 0, 0]
    for axis, (new_axis, _) in enumerate(ornt):
        canonical_shape[int(new_axis)] = shape[axis]
    volume = np.zeros(canonical_shape, np.float32)
    for row in rows:
        if row["file"] not in images:
            continue
        box = (row["x0"], row["x1"], row["y0"], row["y1"])
        image = resize2d(np.asarray(images[row["file"]], np.float32), (box[3] - box[2], box[1] - box[0]), nearest)
        paste_box(volume[:, :, row["slice_index"]], image, box)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    original = nib.orientations.apply_orientation(volume, back)
    return nib.Nifti1Image(np.ascontiguousarray(original), header_img.affine)
