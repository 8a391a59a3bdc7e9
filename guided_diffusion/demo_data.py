"""Synthetic BraTS-style subjects made from the MNI152 template: the embedded demo dataset.

A subject is the 1 mm MNI152 T1 template and brain mask (shipped inside nilearn, so this
works offline) given a FLAIR-like contrast (dark CSF, grey matter brighter than white
matter), randomly deformed (affine + smooth elastic field) while being resampled to
`voxel_size` mm, given lesions, and finally varied in intensity (bias field, contrast,
noise). Two lesion models:

- "glioma" (default), after BraTS FLAIR: usually one tumour per subject, placed in the
  hemispheric white matter, a few centimetres across: a hyper-intense edema (label 2) around
  a tumour core with an enhancing rim (label 4) and often a necrotic centre (label 1), all of
  it brighter than the surrounding brain in FLAIR except the necrosis, which is intermediate;
  segmented as the whole tumour (labels 1, 2, 4), as BraTS' FLAIR whole-tumour task does.
- "mixed": up to five irregular lesions from 4 mm, hyper-intense, hypo-intense (label 1) or
  ring-shaped (bright rim 4 around a dark core 1), anywhere inside the brain: a harder,
  less brain-tumour-like test, including lesions darker than the tissue.

Profiles. `demo` (the default) draws every subject from one lesion model. `stress` cycles through
kinds of subject that a whole-scan decision finds hard (`STRESS_KINDS`): a typical glioma, a small
tumour (a few thousand voxels at 1 mm), several tumours, a tumour at the top or bottom of the brain
(where few training slices look alike), and healthy subjects; subject i is kind i mod 5, and
demo.json records each subject's kind.

Subjects are written BraTS-style, `<id>/<id>_flair.nii.gz` + `<id>/<id>_seg.nii.gz` (or, with the
BraTS 2023+ naming, `<id>/<id>-t2f.nii.gz` + `<id>/<id>-seg.nii.gz` with enhancing tumour 3), so
`scripts/prepare_brats.py` (or `volumes.export_slice_dataset`) turns them into the slice
layout. Subject i depends only on (seed, i).
"""

import functools
import json
import os
from dataclasses import asdict, dataclass, replace

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from .cli import UserError, atomic_directory, atomic_path
from .volumes import SliceOptions, export_slice_dataset, find_brats_cases, read_manifest

LESION_KINDS = ("hyper", "hypo", "ring")
LESION_MODELS = ("glioma", "mixed")
LABEL_CORE, LABEL_HYPER, LABEL_RIM = 1, 2, 4  # BraTS: necrosis / edema / enhancing tumour
NAMINGS = ("brats2021", "brats2023")  # how the raw subjects are written (see `subject_name`, `_subject_job`)
DEMO_MARKER = "demo.json"


@dataclass(frozen=True)
class Template:
    """A brain on a 1 mm grid: intensities in [0, 1] (zero outside), brain mask, affine."""

    image: np.ndarray
    brain: np.ndarray  # float32 0/1, so it can be resampled like the image
    affine: np.ndarray


@dataclass(frozen=True)
class LesionSettings:
    """Which lesion model, how many lesions a subject gets, and how big (whole-lesion diameter)."""

    lesion_free_fraction: float = 0.1
    max_lesions: int = 5
    min_diameter_mm: float = 4.0
    max_diameter_mm: float = 50.0
    kind_probabilities: tuple = (0.45, 0.2, 0.35)  # hyper, hypo, ring ("mixed" only)
    model: str = "mixed"
    extra_tumour_probability: float = 0.1  # "glioma": chance of each further (multifocal) tumour
    placement: str = "white_matter"  # "glioma": or "edge", within the top or bottom fifth of the brain's height


# BraTS-like whole tumours: mostly one per subject, 2-7 cm of edema around the core.
GLIOMA_SETTINGS = LesionSettings(model="glioma", max_lesions=2, min_diameter_mm=20.0, max_diameter_mm=70.0)
MIXED_SETTINGS = LesionSettings()
PLACEMENTS = ("white_matter", "edge")

# The stress profile: subject i is the kind i mod 5 (so both splits hold every kind).
STRESS_KINDS = {
    "typical": replace(GLIOMA_SETTINGS, lesion_free_fraction=0.0),
    "small": replace(GLIOMA_SETTINGS, lesion_free_fraction=0.0, max_lesions=1, min_diameter_mm=14.0,
                     max_diameter_mm=24.0),
    "multiple": replace(GLIOMA_SETTINGS, lesion_free_fraction=0.0, max_lesions=3, extra_tumour_probability=1.0,
                        min_diameter_mm=12.0, max_diameter_mm=40.0),
    "edge": replace(GLIOMA_SETTINGS, lesion_free_fraction=0.0, max_lesions=1, min_diameter_mm=16.0,
                    max_diameter_mm=36.0, placement="edge"),
    "healthy": replace(GLIOMA_SETTINGS, lesion_free_fraction=1.0),
}
PROFILES = ("demo", "stress")


def subject_settings(settings, index):
    """The lesion settings of subject `index`: `settings` itself, or item index mod n of a sequence of them."""
    return settings if isinstance(settings, LesionSettings) else settings[index % len(settings)]


def lesion_settings(model, **overrides):
    """The default settings of lesion model `model`, with `overrides` (None values ignored)."""
    if model not in LESION_MODELS:
        raise ValueError(f"model {model!r}: expected one of {', '.join(LESION_MODELS)}")
    base = GLIOMA_SETTINGS if model == "glioma" else MIXED_SETTINGS
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def flair_like(t1, brain):
    """Remap T1 intensities (CSF < grey < white matter) to a FLAIR-like order (CSF < white < grey)."""
    # knots read off the template's histogram: CSF ~0.3, grey matter ~0.65, white matter ~0.85
    out = np.interp(t1, [0.0, 0.3, 0.5, 0.65, 0.85, 1.0], [0.0, 0.12, 0.45, 0.7, 0.55, 0.6])
    return np.where(brain, out, 0.0).astype(np.float32)


@functools.lru_cache(maxsize=4)
def load_mni_template(voxel_size=1.0):
    """The MNI152 1 mm template as a FLAIR-like `Template`, pre-smoothed for sampling at `voxel_size` mm."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    t1 = load_mni152_template(resolution=1)
    brain = load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32) > 0.5
    image = flair_like(t1.get_fdata(dtype=np.float32), brain)
    if voxel_size > 1:
        image = ndimage.gaussian_filter(image, sigma=0.4 * voxel_size)  # against aliasing
    return Template(image, brain.astype(np.float32), t1.affine.copy())


def smooth_field(shape, rng, spacing):
    """Zero-mean, unit-std random field that varies over about `spacing` voxels."""
    coarse_shape = tuple(max(2, int(np.ceil(s / spacing)) + 1) for s in shape)
    field = rng.standard_normal(coarse_shape)
    for axis, (size, coarse) in enumerate(zip(shape, coarse_shape)):
        # cubic-spline upsampling is linear and separable: one small matrix per axis
        weights = ndimage.zoom(np.eye(coarse), (size / coarse, 1), order=3)
        field = np.moveaxis(np.tensordot(weights, np.moveaxis(field, axis, 0), axes=1), 0, axis)
    return ((field - field.mean()) / (field.std() + 1e-8)).astype(np.float32)


def _rotation(angles):
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rx @ ry @ rz


def deform_template(template, rng, voxel_size, max_rotation_deg=(5.0, 5.0, 10.0), scale_range=(0.9, 1.1),
                    max_shift_mm=4.0, elastic_mm=2.0, elastic_spacing_mm=24.0, margin_mm=12):
    """Resample the template at `voxel_size` mm through a random affine + elastic map.

    Returns (image, brain bool, affine) on the output grid, which covers the template's brain
    with a margin of `margin_mm` (template voxels are 1 mm).
    """
    nonzero = [np.flatnonzero(template.brain.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
    start = np.array([max(idx[0] - margin_mm, 0) for idx in nonzero], float)
    stop = np.array([min(idx[-1] + margin_mm, s - 1) for idx, s in zip(nonzero, template.image.shape)], float)
    shape = tuple(int(n) for n in (stop - start) // voxel_size + 1)
    affine = template.affine.copy()
    affine[:3, 3] = template.affine[:3, :3] @ start + template.affine[:3, 3]
    affine[:3, :3] = template.affine[:3, :3] * voxel_size
    center = np.array(ndimage.center_of_mass(template.brain))
    matrix = _rotation(np.deg2rad(max_rotation_deg) * rng.uniform(-1, 1, 3)) @ np.diag(rng.uniform(*scale_range, 3))
    shift = rng.uniform(-max_shift_mm, max_shift_mm, 3)
    points = np.indices(shape, dtype=np.float32).reshape(3, -1) * voxel_size + start[:, None].astype(np.float32)
    coords = (matrix @ (points - center[:, None]) + (center + shift)[:, None]).astype(np.float32)
    for axis in range(3):
        coords[axis] += elastic_mm * smooth_field(shape, rng, elastic_spacing_mm / voxel_size).ravel()
    image, brain = _sample_trilinear(np.stack([template.image, template.brain]), coords.reshape(3, *shape))
    brain = brain > 0.5
    return np.where(brain, image, 0.0).astype(np.float32), brain, affine


def _sample_trilinear(volumes, coords):
    """Trilinear samples of (C, X, Y, Z) volumes at voxel coordinates (3, ...); zero outside.

    Same result as scipy's map_coordinates(order=1), but many times faster (torch's grid_sample).
    """
    sizes = np.array(volumes.shape[1:], np.float32).reshape(3, 1)
    normalised = 2.0 * coords.reshape(3, -1) / (sizes - 1.0) - 1.0  # align_corners=True convention
    grid = torch.from_numpy(np.ascontiguousarray(normalised[::-1].T, dtype=np.float32))  # (x, y, z) -> (W, H, D)
    with torch.no_grad():
        out = torch.nn.functional.grid_sample(torch.from_numpy(volumes)[None], grid[None, None, None],
                                              mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, :, 0, 0].numpy().reshape(volumes.shape[0], *coords.shape[1:])


def irregular_blob(radius, rng):
    """A cube holding one irregular blob of roughly `radius` voxels (thresholded smooth noise)."""
    half = int(np.ceil(1.6 * radius)) + 1
    axes = radius * rng.uniform(0.7, 1.3, 3)
    grid = np.mgrid[-half:half + 1, -half:half + 1, -half:half + 1].astype(np.float32)
    ellipsoid = sum((grid[i] / axes[i]) ** 2 for i in range(3))
    noise = ndimage.gaussian_filter(rng.standard_normal(grid.shape[1:]), sigma=max(radius / 3.5, 0.8))
    blob = 1.0 - ellipsoid + 0.6 * noise / (noise.std() + 1e-8) > 0
    parts, count = ndimage.label(blob)
    if count > 1:  # one connected lesion: keep the largest part
        blob = parts == 1 + np.argmax(ndimage.sum(blob, parts, range(1, count + 1)))
    return blob


def draw_radius(rng, settings, voxel_size):
    """A lesion radius in voxels, its diameter log-uniform between the settings' bounds (mm)."""
    diameter = np.exp(rng.uniform(np.log(settings.min_diameter_mm), np.log(settings.max_diameter_mm)))
    return diameter / 2.0 / voxel_size


def add_lesions(image, brain, rng, voxel_size, count, settings=MIXED_SETTINGS):
    """Paint `count` "mixed" lesions into `image` (in place), inside `brain`; return the BraTS-style label map."""
    seg = np.zeros(image.shape, np.uint8)
    if count == 0:
        return seg
    depth = ndimage.distance_transform_edt(brain)
    median = float(np.median(image[brain]))
    for _ in range(count):
        radius = draw_radius(rng, settings, voxel_size)
        # deep enough that most of the lesion lies inside the brain
        candidates = np.flatnonzero(depth >= min(0.8 * radius + 1.0, depth.max()))
        center = np.unravel_index(rng.choice(candidates), image.shape)
        box, mask = _blob_at(center, radius, rng, brain)
        if not mask.any():
            continue
        kind = rng.choice(LESION_KINDS, p=settings.kind_probabilities)
        core = ndimage.binary_erosion(mask, iterations=max(1, int(round(0.3 * radius)))) if kind == "ring" else None
        if kind == "ring" and not core.any():
            kind = "hyper"  # too small to show a rim
        texture = 1.0 + 0.08 * rng.standard_normal(mask.shape)
        region, labels = image[box], seg[box]
        if kind == "hyper":
            region[mask] = median * rng.uniform(1.5, 2.2) * texture[mask]
            labels[mask] = LABEL_HYPER
        elif kind == "hypo":
            region[mask] = median * rng.uniform(0.15, 0.45) * texture[mask]
            labels[mask] = LABEL_CORE
        else:
            rim = mask & ~core
            region[rim] = median * rng.uniform(1.6, 2.3) * texture[rim]
            region[core] = median * rng.uniform(0.15, 0.5) * texture[core]
            labels[rim], labels[core] = LABEL_RIM, LABEL_CORE
    return seg


def _paste_box(center, half, shape):
    """Slices of a (2 half + 1)^3 cube centred at `center`, clipped to `shape`: (volume box, cube box)."""
    box, local = [], []
    for c, size in zip(center, shape):
        lo, hi = c - half, c + half + 1
        box.append(slice(max(lo, 0), min(hi, size)))
        local.append(slice(max(lo, 0) - lo, 2 * half + 1 - (hi - min(hi, size))))
    return tuple(box), tuple(local)


def _blob_at(center, radius, rng, allowed):
    """An irregular blob of `radius` voxels centred at `center`: (its box in the volume, the blob
    within the box, limited to the `allowed` voxels)."""
    blob = irregular_blob(radius, rng)
    box, local = _paste_box(center, blob.shape[0] // 2, allowed.shape)
    return box, blob[local] & allowed[box]


def glioma_sites(image, brain, voxel_size, radius, placement="white_matter", rng=None):
    """Flat indices where a glioma of `radius` voxels may be centred: hemispheric white matter, deep enough.

    White matter is read off the FLAIR-like contrast before intensity variation (white ~0.55, grey
    ~0.7 of the template scale); the midline band (first axis, +-8 mm) is left out, as BraTS gliomas
    are mostly lateral. placement "edge": anywhere in the brain within the top or bottom fifth of its
    height (the last axis; which one drawn with `rng`), at least 2 voxels deep.
    """
    if placement == "edge":
        levels = np.flatnonzero(brain.any(axis=(0, 1)))
        fifth = max(1, (levels[-1] - levels[0] + 1) // 5)
        band = (levels[-1] - fifth + 1, levels[-1] + 1) if rng.random() < 0.5 else (levels[0], levels[0] + fifth)
        edge = np.zeros_like(brain)
        edge[:, :, band[0]:band[1]] = True
        candidates = edge & ndimage.binary_erosion(brain, iterations=2)
        if candidates.any():
            return np.flatnonzero(candidates)
    depth = ndimage.distance_transform_edt(brain)
    white = brain & (image > 0.47) & (image < 0.63)
    white = ndimage.binary_opening(white, iterations=1)
    mid = ndimage.center_of_mass(brain)[0]
    lateral = np.abs(np.arange(image.shape[0]) - mid)[:, None, None] * voxel_size >= 8.0
    deep = depth >= min(0.5 * radius + 2.0, depth.max())
    for candidates in (white & lateral & deep, brain & lateral & deep, deep):
        if candidates.any():
            return np.flatnonzero(candidates)
    return np.flatnonzero(brain)


def add_gliomas(image, brain, rng, voxel_size, count, settings=GLIOMA_SETTINGS):
    """Paint `count` BraTS-like gliomas into the FLAIR-like `image` (in place); return the label map.

    Each tumour: an irregular edema of the drawn diameter (label 2, FLAIR 1.4-2.0x the brain median,
    fading in over about 2 mm at its border, sparing CSF), a core of 30-60 % of that diameter near
    its centre with an enhancing rim 2-4 mm thick (label 4, 1.3-1.8x), and in most large cores a
    necrotic centre (label 1, 0.7-1.1x: intermediate in FLAIR).
    """
    seg = np.zeros(image.shape, np.uint8)
    median = float(np.median(image[brain])) if brain.any() else 0.5
    tissue = brain & (image > 0.3 * median)  # not CSF: edema does not fill the ventricles
    for _ in range(count):
        radius = draw_radius(rng, settings, voxel_size)
        sites = glioma_sites(image, brain, voxel_size, radius, settings.placement, rng)
        center = np.unravel_index(rng.choice(sites), image.shape)
        box, edema = _blob_at(center, radius, rng, tissue)
        if not edema.any():
            continue
        core_radius = radius * rng.uniform(0.3, 0.6)
        core_blob = irregular_blob(core_radius, rng)
        offset = np.round(rng.uniform(-0.25, 0.25, 3) * radius).astype(int)
        core_box, core_local = _paste_box(tuple(np.add(center, offset)), core_blob.shape[0] // 2, image.shape)
        core = np.zeros(image.shape, bool)
        core[core_box] = core_blob[core_local]
        core = core[box] & edema
        rim_voxels = max(1, int(round(rng.uniform(2.0, 4.0) / voxel_size)))
        inner = ndimage.binary_erosion(core, iterations=rim_voxels)
        necrosis = inner if inner.sum() >= 8 and rng.random() < 0.75 else np.zeros_like(core)
        rim = core & ~necrosis
        texture = 1.0 + 0.06 * smooth_field(edema.shape, rng, max(2.0, 4.0 / voxel_size))
        # FLAIR edema brightens smoothly from its border inwards, over about 2 mm
        ramp = np.clip(ndimage.distance_transform_edt(edema) * voxel_size / 2.0, 0.0, 1.0)
        region, labels = image[box], seg[box]
        gain = 1.0 + (rng.uniform(1.4, 2.0) - 1.0) * ramp
        region[edema] = np.maximum(region[edema], median) * (gain * texture)[edema]
        region[rim] = median * rng.uniform(1.3, 1.8) * texture[rim]
        region[necrosis] = median * rng.uniform(0.7, 1.1) * texture[necrosis]
        labels[edema], labels[rim], labels[necrosis] = LABEL_HYPER, LABEL_RIM, LABEL_CORE
    return seg


def vary_intensity(image, brain, rng, bias=0.15, gamma_range=(0.75, 1.35), noise_range=(0.01, 0.04), voxel_size=1.0):
    """Bias field, contrast (gamma and gain) and Gaussian noise, inside the brain; background stays 0."""
    field = np.exp(bias * rng.uniform(0.3, 1.0) * smooth_field(image.shape, rng, 60.0 / voxel_size))
    out = image * field
    reference = np.percentile(out[brain], 99) + 1e-8
    out = reference * (np.clip(out, 0, None) / reference) ** rng.uniform(*gamma_range)
    out = out * rng.uniform(0.8, 1.2) + rng.uniform(*noise_range) * rng.standard_normal(image.shape)
    return np.where(brain, np.clip(out, 0.002, None), 0.0).astype(np.float32)  # brain stays > 0


def lesion_count(rng, settings):
    """How many lesions one subject gets under `settings`."""
    if rng.random() < settings.lesion_free_fraction:
        return 0
    if settings.model == "glioma":  # one tumour, occasionally multifocal
        count = 1
        while count < settings.max_lesions and rng.random() < settings.extra_tumour_probability:
            count += 1
        return count
    return int(rng.integers(1, settings.max_lesions + 1))


def synthesize_subject(template, rng, voxel_size=2.0, settings=GLIOMA_SETTINGS):
    """One random subject: (FLAIR-like image float32, BraTS label map uint8, affine)."""
    image, brain, affine = deform_template(template, rng, voxel_size)
    count = lesion_count(rng, settings)
    paint = add_gliomas if settings.model == "glioma" else add_lesions
    seg = paint(image, brain, rng, voxel_size, count, settings)
    return vary_intensity(image, brain, rng, voxel_size=voxel_size), seg, affine


def subject_name(index, naming="brats2021"):
    """demo_007 in the BraTS 2020/2021 naming; BraTS-GLI-00007-000 in the BraTS 2023+ naming."""
    return f"BraTS-GLI-{index:05d}-000" if naming == "brats2023" else f"demo_{index:03d}"


def _subject_job(job):
    """One subject's FLAIR and label map. BraTS 2023+ names the files <id>-t2f / <id>-seg and labels the
    enhancing tumour 3 instead of 4; the voxels are the same in both namings."""
    raw_dir, index, seed, voxel_size, settings, naming = job
    rng = np.random.default_rng([seed, index])
    image, seg, affine = synthesize_subject(load_mni_template(voxel_size), rng, voxel_size,
                                            subject_settings(settings, index))
    subject = subject_name(index, naming)
    folder = os.path.join(raw_dir, subject)
    os.makedirs(folder)
    flair = nib.Nifti1Image(np.rint(image * 1000).astype(np.int16), affine)
    flair.header.set_xyzt_units("mm")
    if naming == "brats2023":
        seg = np.where(seg == LABEL_RIM, 3, seg).astype(seg.dtype)
        flair_name, seg_name = f"{subject}-t2f.nii.gz", f"{subject}-seg.nii.gz"
    else:
        flair_name, seg_name = f"{subject}_flair.nii.gz", f"{subject}_seg.nii.gz"
    nib.save(flair, os.path.join(folder, flair_name))
    nib.save(nib.Nifti1Image(seg, affine), os.path.join(folder, seg_name))
    return subject


def write_demo_subjects(raw_dir, num_subjects, seed=0, voxel_size=2.0, settings=GLIOMA_SETTINGS, workers=1,
                        naming="brats2021"):
    """Write `num_subjects` synthetic subjects BraTS-style under `raw_dir` (replacing an earlier demo there),
    named as `naming` (one of `NAMINGS`) has it.

    settings: one `LesionSettings` for every subject, or a dict {kind: LesionSettings} whose kinds
    subjects take in turn (`STRESS_KINDS`)."""
    if num_subjects < 2:
        raise UserError(f"--num_subjects must be at least 2 (one per split), got {num_subjects}")
    if voxel_size < 1:
        raise UserError(f"--voxel_size must be at least 1 mm (the template's resolution), got {voxel_size}")
    raw_dir = os.path.abspath(raw_dir)
    if os.path.isdir(raw_dir) and os.listdir(raw_dir) and not os.path.isfile(os.path.join(raw_dir, DEMO_MARKER)):
        raise UserError(f"{raw_dir}: exists, is not empty and is not a demo folder; refusing to replace it")
    load_mni_template(voxel_size)  # once here, so worker processes inherit it
    with atomic_directory(raw_dir) as tmp:
        kinds = list(settings) if isinstance(settings, dict) else None
        per_subject = tuple(settings.values()) if kinds else settings
        jobs = [(tmp, i, seed, voxel_size, per_subject, naming) for i in range(num_subjects)]
        progress = dict(total=num_subjects, desc="demo subjects", unit="subject")
        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers) as pool:
                list(tqdm(pool.map(_subject_job, jobs), **progress))
        else:
            list(tqdm(map(_subject_job, jobs), **progress))
        with open(os.path.join(tmp, DEMO_MARKER), "w") as f:
            record = dict(num_subjects=num_subjects, seed=seed, voxel_size=voxel_size, naming=naming)
            if kinds:
                record.update(kinds={k: asdict(v) for k, v in settings.items()},
                              subject_kinds={subject_name(i, naming): kinds[i % len(kinds)] for i in range(num_subjects)})
            else:
                record.update(lesions=asdict(settings))
            json.dump(record, f, indent=1, sort_keys=True)
            f.write("\n")
    return raw_dir


def make_demo_dataset(out_dir, num_subjects=72, seed=0, voxel_size=2.0, image_size=64, val_fraction=0.15,
                      min_tumor_pixels=5, settings=GLIOMA_SETTINGS, workers=1, preview=True, naming="brats2021"):
    """Subjects under OUT/raw, the slice layout under OUT/slices, a picture at OUT/preview.png; returns counts."""
    raw_dir = write_demo_subjects(os.path.join(out_dir, "raw"), num_subjects, seed, voxel_size, settings, workers,
                                  naming)
    options = SliceOptions(image_size=image_size, min_lesion_pixels=min_tumor_pixels)
    cases = find_brats_cases(raw_dir, ("flair",))
    split_of = stratified_split([c.subject for c in cases], len(settings), val_fraction) if isinstance(settings, dict) else None
    counts = export_slice_dataset(cases, os.path.join(out_dir, "slices"), options, input_dir=raw_dir,
                                  val_fraction=val_fraction, seed=seed, workers=workers, split_of=split_of)
    if preview:
        save_preview(os.path.join(out_dir, "slices"), os.path.join(out_dir, "preview.png"))
    return counts


def stratified_split(subjects, kinds, val_fraction):
    """{subject: split} for subjects that take `kinds` kinds in turn (sorted subject i is kind i mod kinds):
    whole rounds of kinds go to validation, evenly spaced, so each split holds every kind equally often."""
    subjects = sorted(subjects)
    rounds = -(-len(subjects) // kinds)
    n_val = min(max(int(round(rounds * val_fraction)), 1), rounds - 1) if rounds > 1 else 0
    validation = {int(r) for r in np.linspace(1, rounds - 1, n_val).round()} if n_val else set()
    return {s: "validation" if i // kinds in validation else "training" for i, s in enumerate(subjects)}


def save_preview(slices_root, path, columns=6, rows=3):
    """A picture of validation slices with their lesion outlines: tumour slices by growing size, then normal ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    manifest = [r for r in read_manifest(slices_root) if r["split"] == "validation"]
    tumor = sorted((r for r in manifest if r["label"] == "tumor"), key=lambda r: (r["lesion_pixels"], r["file"]))
    normal = [r for r in manifest if r["label"] == "normal"]
    n_tumor = columns * (rows - 1)
    picks = [tumor[int(i)] for i in np.linspace(0, len(tumor) - 1, min(n_tumor, len(tumor)))]
    picks += [normal[i] for i in sorted(np.random.default_rng(0).permutation(len(normal))[:columns])]
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.1 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, row in zip(axes.ravel(), picks):
        image = np.asarray(Image.open(os.path.join(slices_root, row["file"])))
        mask = np.asarray(Image.open(os.path.join(slices_root, row["mask"]))) > 0
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        if mask.any():
            ax.contour(mask, levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"{row['subject']} z{row['slice_index']}\n{row['label']}, {row['lesion_pixels']} px", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
