"""CHAOS MR (DICOM series with ground-truth PNGs) to the 2-D slice layout (see data/README.md).

Input: the CHAOS training set, `Train_Sets/MR/<patient>/...` (or the `MR` folder itself):

    <patient>/T2SPIR/DICOM_anon/*.dcm               --modality t2spir
    <patient>/T2SPIR/Ground/*.png
    <patient>/T1DUAL/DICOM_anon/InPhase/*.dcm       --modality t1in
    <patient>/T1DUAL/DICOM_anon/OutPhase/*.dcm      --modality t1out
    <patient>/T1DUAL/Ground/*.png                   (one PNG per slice, shared by both phases)

Each patient's series becomes two NIfTI volumes inside the output, `volumes/<patient>_<modality>.nii.gz`
(the image) and `volumes/<patient>_<modality>_labels.nii.gz` (organ numbers 0 background,
1 liver, 2 right kidney, 3 left kidney, 4 spleen), on the same grid; `volumes.export_slice_dataset`
then cuts them into slices exactly as for BraTS and Synapse (subject split, manifest, atomic
writing, workers, `volumes.paste_slices`).

Slice order. The slices of a series are ordered by geometry: the projection of
ImagePositionPatient onto the slice normal (ImageOrientationPatient's row direction x column
direction), never by file name or InstanceNumber. The series must be complete: one size, one
orientation, no two slices at one position, and no gap larger than 1.5 x the median spacing.

Voxel grid. Voxel (i, j, k) of the NIfTI volumes is column i, row j of the k-th slice in that
order; the affine is the DICOM geometry (PixelSpacing, ImageOrientationPatient, the first
slice's ImagePositionPatient, and the step from the first to the last slice), turned from DICOM's
LPS patient coordinates into NIfTI's RAS (x and y negated). The slicer reads volumes in their
closest canonical (RAS+) orientation and writes `volume[:, :, z]`: for an axial series (normal
closer to inferior-superior than to the other two axes, tilted or not) that third axis is the
acquisition axis, so every written slice is one acquired slice, z = k when the normal points
head-ward and z = n - 1 - k when it points feet-ward (the written slices always run from feet
to head). A coronal or sagittal series would be cut across its acquired slices: it is refused.
dataset.json records, under "cases" -> patient -> "slices" (in voxel order k), each slice's
DICOM file, SOPInstanceUID, ground-truth PNG and manifest `slice_index`; `series_masks` turns
a volume pasted back with `volumes.paste_slices` into one (rows, cols) mask per DICOM file.

Pairing of the ground truth. In CHAOS a PNG is named after its DICOM slice
(`T2SPIR/Ground/IMG-0002-00001.png` for `T2SPIR/DICOM_anon/IMG-0002-00001.dcm`; the T1DUAL
PNGs after the files of one of the two phases). So: when the PNG names (without `.png`) are the
DICOM names (without `.dcm`) of the series, each PNG goes to the slice of the same name; when they
are the names of the other T1DUAL phase, each goes to the slice at the same position (the two
phases must then have the same slice positions). When no PNG name is a DICOM name (e.g. renamed
`liver_GT_000.png`, ...), the k-th PNG in natural name order goes to the k-th DICOM file in
natural name order, the CHAOS convention (its evaluation code states that slice order follows
the image names, not the position tags). Only some names matching, or a count of PNGs different
from the count of DICOM files, is an error. A PNG's pixel (row r, column c) is the DICOM pixel
(r, c); its size must be the slice's.

Grey levels. CHAOS writes 63 liver, 126 right kidney, 189 left kidney, 252 spleen, and its data
description gives the ranges 55-70, 110-135, 175-200, 240-255 for them; those ranges (inclusive)
are accepted, 0 is background, and any other grey level is an error naming the file.

example:
  python scripts/prepare_chaos.py --input_dir CHAOS_Train_Sets/Train_Sets --out_dir data/chaos/kidney \\
      --modality t2spir --class_index 2,3
"""

import os
import re
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from PIL import Image

from .cli import UserError
from .layouts import VolumeCase
from .volumes.reading import _one_line

ORGANS = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}
GREY_RANGES = {1: (55, 70), 2: (110, 135), 3: (175, 200), 4: (240, 255)}  # inclusive, per organ number
SERIES = {  # modality -> (folder of the DICOM files, folder of the ground truth), under a patient folder
    "t2spir": (("T2SPIR", "DICOM_anon"), ("T2SPIR", "Ground")),
    "t1in": (("T1DUAL", "DICOM_anon", "InPhase"), ("T1DUAL", "Ground")),
    "t1out": (("T1DUAL", "DICOM_anon", "OutPhase"), ("T1DUAL", "Ground")),
}
OTHER_PHASE = {"t1in": "t1out", "t1out": "t1in"}
MAX_GAP = 1.5  # a step between slices over this many median spacings means missing slices
VOLUMES_DIR = "volumes"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class ChaosSeries:
    """One patient's series to convert: its DICOM folder, ground-truth folder and, for T1DUAL,
    the other phase's DICOM folder ('' when absent or for T2SPIR)."""

    subject: str
    modality: str
    dicom_dir: str
    ground_dir: str
    other_phase_dir: str = ""


def natural_key(name):
    """Sort key that orders embedded numbers by value: IMG-2 before IMG-10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def grey_help():
    return ", ".join(f"{lo}-{hi} {ORGANS[k]}" for k, (lo, hi) in GREY_RANGES.items())


def find_chaos_cases(root, modality):
    """The patients of a CHAOS training folder (`root/MR/<patient>` or `root/<patient>`) for one modality."""
    if modality not in SERIES:
        raise UserError(f"--modality {modality!r}: expected one of {', '.join(SERIES)}")
    if not os.path.isdir(root):
        raise UserError(f"--input_dir {root}: no such directory")
    mr = os.path.join(root, "MR") if os.path.isdir(os.path.join(root, "MR")) else root
    patients = sorted((d for d in os.listdir(mr) if not d.startswith(".") and os.path.isdir(os.path.join(mr, d))),
                      key=natural_key)
    dicom_sub, ground_sub = SERIES[modality]
    if not patients:
        raise UserError(f"--input_dir {root}: no patient folders (expected MR/<patient>/{'/'.join(dicom_sub)}/*.dcm "
                        f"with MR/<patient>/{'/'.join(ground_sub)}/*.png)")
    cases = []
    for patient in patients:
        folder = os.path.join(mr, patient)
        dicom_dir, ground_dir = os.path.join(folder, *dicom_sub), os.path.join(folder, *ground_sub)
        for path, sub, what in ((dicom_dir, dicom_sub, "DICOM series"), (ground_dir, ground_sub, "ground truth")):
            if not os.path.isdir(path):
                raise UserError(f"{folder}: no {'/'.join(sub)} folder (the {modality} {what} of patient {patient})")
        other = ""
        if modality in OTHER_PHASE:
            other = os.path.join(folder, *SERIES[OTHER_PHASE[modality]][0])
            other = other if os.path.isdir(other) else ""
        cases.append(ChaosSeries(patient, modality, dicom_dir, ground_dir, other))
    return cases


# ----------------------------------------------------------------------------- DICOM


def _list_files(folder, suffix):
    names = [n for n in os.listdir(folder) if n.lower().endswith(suffix) and not n.startswith(".")]
    return sorted(names, key=natural_key)


def _stem(name):
    return os.path.splitext(name)[0]


def _read_dicom(path, pixels):
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
    except Exception as err:  # pydicom raises many kinds for broken files
        raise UserError(f"{path}: cannot read DICOM file ({_one_line(err)})") from None
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        if tag not in ds:
            raise UserError(f"{path}: no {tag}, so the slice cannot be placed in the series")
    return ds


def read_series(dicom_dir, pixels=True):
    """The slices of one DICOM folder in geometric order, with the series geometry.

    Returns dict(names, datasets, positions (n, 3) LPS, projections (n,), orientation (2, 3),
    normal (3,), spacing (row, column) mm, rows, cols). UserError naming the folder or file for
    an empty folder, unreadable files, mixed sizes or orientations, or missing slices.
    """
    names = _list_files(dicom_dir, ".dcm")
    if not names:
        raise UserError(f"{dicom_dir}: no .dcm files")
    datasets = [_read_dicom(os.path.join(dicom_dir, n), pixels) for n in names]
    first = datasets[0]
    rows, cols = int(first.Rows), int(first.Columns)
    orientation = np.asarray([float(v) for v in first.ImageOrientationPatient]).reshape(2, 3)
    spacing = np.asarray([float(v) for v in first.PixelSpacing])
    for name, ds in zip(names[1:], datasets[1:]):
        path = os.path.join(dicom_dir, name)
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise UserError(f"{path}: {int(ds.Rows)} x {int(ds.Columns)} pixels, but {names[0]} of the same series "
                            f"has {rows} x {cols} (mixed slice sizes)")
        if not np.allclose(np.asarray([float(v) for v in ds.ImageOrientationPatient]).reshape(2, 3), orientation,
                           atol=1e-3):
            raise UserError(f"{path}: ImageOrientationPatient differs from {names[0]} (mixed orientations)")
        if not np.allclose([float(v) for v in ds.PixelSpacing], spacing, atol=1e-4):
            raise UserError(f"{path}: PixelSpacing differs from {names[0]} (mixed pixel spacings)")
    normal = np.cross(orientation[0], orientation[1])
    if np.linalg.norm(normal) < 0.5:
        raise UserError(f"{os.path.join(dicom_dir, names[0])}: ImageOrientationPatient {orientation.ravel().tolist()} "
                        f"is not two orthogonal unit vectors")
    normal /= np.linalg.norm(normal)
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    projections = positions @ normal
    order = sorted(range(len(names)), key=lambda i: (projections[i], natural_key(names[i])))
    names = [names[i] for i in order]
    datasets = [datasets[i] for i in order]
    positions, projections = positions[order], projections[order]
    if len(names) > 1:
        steps = np.diff(projections)
        median = float(np.median(steps))
        same = int(np.argmin(steps))
        if steps[same] <= 1e-3 * max(median, 1e-3):
            raise UserError(f"{dicom_dir}: {names[same]} and {names[same + 1]} lie at the same position "
                            f"({projections[same]:.3f} mm along the slice normal)")
        wide = int(np.argmax(steps))
        if steps[wide] > MAX_GAP * median:
            raise UserError(f"{dicom_dir}: missing slices: a gap of {steps[wide]:.2f} mm between {names[wide]} and "
                            f"{names[wide + 1]}, the median spacing being {median:.2f} mm")
    return dict(names=names, datasets=datasets, positions=positions, projections=projections,
                orientation=orientation, normal=normal, spacing=spacing, rows=rows, cols=cols)


def series_affine(series):
    """RAS voxel-to-world affine of the (cols, rows, slices) grid of a series from `read_series`."""
    row_dir, col_dir = series["orientation"]  # direction of increasing column index, of increasing row index
    n = len(series["names"])
    if n > 1:
        step = (series["positions"][-1] - series["positions"][0]) / (n - 1)
    else:
        thickness = float(getattr(series["datasets"][0], "SliceThickness", 0) or 1.0)
        step = series["normal"] * thickness
    lps = np.eye(4)
    lps[:3, 0] = row_dir * series["spacing"][1]  # PixelSpacing is (between rows, between columns)
    lps[:3, 1] = col_dir * series["spacing"][0]
    lps[:3, 2] = step
    lps[:3, 3] = series["positions"][0]
    return LPS_TO_RAS @ lps


def _pixels(dicom_dir, series):
    """(cols, rows, slices) array of the series in geometric order; modality rescale applied."""
    slices, rescaled = [], False
    for name, ds in zip(series["names"], series["datasets"]):
        path = os.path.join(dicom_dir, name)
        try:
            pixels = ds.pixel_array
        except Exception as err:
            raise UserError(f"{path}: cannot decode the pixel data ({_one_line(err)})") from None
        if pixels.shape != (series["rows"], series["cols"]):
            raise UserError(f"{path}: pixel data of shape {pixels.shape}, expected one frame of "
                            f"{series['rows']} x {series['cols']}")
        slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
        if (slope, intercept) != (1.0, 0.0):
            pixels = pixels * np.float32(slope) + np.float32(intercept)
            rescaled = True
        slices.append(pixels)
    dtype = np.float32 if rescaled else np.result_type(*[s.dtype for s in slices])
    return np.ascontiguousarray(np.stack(slices, axis=-1).astype(dtype).transpose(1, 0, 2))


# ----------------------------------------------------------------------------- ground truth


def grey_to_labels(grey, path):
    """Organ numbers (uint8) from a CHAOS ground-truth image; UserError naming `path` for another grey level."""
    labels = np.zeros(grey.shape, np.uint8)
    known = grey == 0
    for organ, (lo, hi) in GREY_RANGES.items():
        hit = (grey >= lo) & (grey <= hi)
        labels[hit] = organ
        known |= hit
    if not known.all():
        value = int(grey[~known][0])
        raise UserError(f"{path}: grey level {value} is no organ (expected 0 background, {grey_help()})")
    return labels


def _read_png(path, rows, cols, dicom_name):
    try:
        with Image.open(path) as img:
            grey = np.asarray(img)
    except Exception as err:
        raise UserError(f"{path}: cannot read PNG file ({_one_line(err)})") from None
    if grey.ndim == 3:  # RGB(A) written by some tools: accept only grey pixels
        if not (grey[..., :3] == grey[..., :1]).all():
            raise UserError(f"{path}: a colour image; expected grey levels")
        grey = grey[..., 0]
    if grey.shape != (rows, cols):
        raise UserError(f"{path}: {grey.shape[1]} x {grey.shape[0]} pixels (width x height), but its DICOM slice "
                        f"{dicom_name} has {cols} x {rows}")
    return grey_to_labels(grey.astype(np.int64), path)


def pair_ground_truth(case, series):
    """PNG file name for each slice of `series` (geometric order) and the rule used ('name', 'other phase',
    'order'); see the module docstring."""
    pngs = _list_files(case.ground_dir, ".png")
    n = len(series["names"])
    if not pngs:
        raise UserError(f"{case.ground_dir}: no ground-truth .png files")
    if len(pngs) != n:
        raise UserError(f"{case.ground_dir}: {len(pngs)} ground-truth PNG files for {n} DICOM slices in "
                        f"{case.dicom_dir}")
    png_of = {_stem(p): p for p in pngs}
    own = [_stem(name) for name in series["names"]]
    if set(own) == set(png_of):
        return [png_of[s] for s in own], "name"
    if case.other_phase_dir:
        other_names = _list_files(case.other_phase_dir, ".dcm")
        if set(map(_stem, other_names)) == set(png_of):
            other = read_series(case.other_phase_dir, pixels=False)
            same = (len(other["names"]) == n and (other["rows"], other["cols"]) == (series["rows"], series["cols"])
                    and np.allclose(other["orientation"], series["orientation"], atol=1e-3)
                    and np.allclose(other["positions"], series["positions"], atol=0.05))
            if not same:
                raise UserError(f"{case.other_phase_dir}: the ground truth in {case.ground_dir} is named after this "
                                f"phase, whose slices are not at the positions of {case.dicom_dir}")
            return [png_of[_stem(name)] for name in other["names"]], "other phase"
        if set(map(_stem, other_names)) & set(png_of):
            raise UserError(f"{case.ground_dir}: only some PNG names are DICOM names of {case.other_phase_dir}")
    if set(own) & set(png_of):
        raise UserError(f"{case.ground_dir}: only some PNG names are DICOM names of {case.dicom_dir} (name every "
                        f"PNG after its DICOM file, or none: then they pair in name order)")
    by_name_order = sorted(series["names"], key=natural_key)
    png_for = dict(zip(by_name_order, pngs))  # pngs are in natural order already
    return [png_for[name] for name in series["names"]], "order"


# ----------------------------------------------------------------------------- one series


def volume_paths(root, subject, modality):
    folder = os.path.join(root, VOLUMES_DIR)
    return (os.path.join(folder, f"{subject}_{modality}.nii.gz"),
            os.path.join(folder, f"{subject}_{modality}_labels.nii.gz"))


def stage_series(case, root):
    """Convert one patient's series to NIfTI under root/volumes; (VolumeCase, info for dataset.json).

    Run by `volumes.export_slice_dataset` in its worker (the `stage` hook)."""
    series = read_series(case.dicom_dir)
    affine = series_affine(series)
    ornt = nib.orientations.io_orientation(affine)
    if int(ornt[2, 0]) != 2:
        axis = "left-right" if int(ornt[2, 0]) == 0 else "anterior-posterior"
        normal = np.round((LPS_TO_RAS[:3, :3] @ series["normal"]), 3).tolist()
        raise UserError(f"{case.dicom_dir}: not an axial series (slice normal {normal} in RAS is closest to the "
                        f"{axis} axis); only axial series are converted, so that every written slice is an "
                        f"acquired one")
    pngs, pairing = pair_ground_truth(case, series)
    image = _pixels(case.dicom_dir, series)
    labels = np.stack([_read_png(os.path.join(case.ground_dir, png), series["rows"], series["cols"], name).T
                       for png, name in zip(pngs, series["names"])], axis=-1)
    image_path, labels_path = volume_paths(root, case.subject, case.modality)
    os.makedirs(os.path.dirname(image_path), exist_ok=True)
    for data, path in ((image, image_path), (labels, labels_path)):
        nifti = nib.Nifti1Image(data, affine)
        nifti.set_sform(affine, code=1)  # scanner coordinates
        nifti.set_qform(affine, code=1)
        nib.save(nifti, path)
    n = len(series["names"])
    head_ward = int(ornt[2, 1]) == 1
    slices = [dict(file=name, sop_instance_uid=str(getattr(ds, "SOPInstanceUID", "")), ground=png,
                   slice_index=k if head_ward else n - 1 - k)
              for k, (name, ds, png) in enumerate(zip(series["names"], series["datasets"], pngs))]
    info = dict(dicom_dir=os.path.abspath(case.dicom_dir), ground_dir=os.path.abspath(case.ground_dir),
                modality=case.modality, pairing=pairing, rows=series["rows"], cols=series["cols"],
                image=os.path.join(VOLUMES_DIR, os.path.basename(image_path)),
                labels=os.path.join(VOLUMES_DIR, os.path.basename(labels_path)), slices=slices)
    return VolumeCase(case.subject, (image_path,), labels_path), info


def series_masks(volume, info):
    """[(DICOM file name, (rows, cols) array)] for each slice of a series, from a volume on its NIfTI
    grid (e.g. masks pasted back with `volumes.paste_slices`); `info` is dataset.json's
    "cases"[patient]."""
    data = np.asarray(volume.dataobj)
    if data.shape[:3] != (info["cols"], info["rows"], len(info["slices"])):
        raise ValueError(f"volume of shape {data.shape} is not on the grid of {info['dicom_dir']} "
                         f"({info['cols']}, {info['rows']}, {len(info['slices'])})")
    return [(s["file"], data[:, :, k].T) for k, s in enumerate(info["slices"])]
