"""Synthetic BraTS-style subjects made from the MNI152 template: the embedded demo dataset.

A subject is the 1 mm MNI152 T1 template and brain mask (shipped inside nilearn, so this
works offline) given a FLAIR-like contrast (dark CSF, grey matter brighter than white
matter), randomly deformed (affine + smooth elastic field) while being resampled to
`voxel_size` mm, given zero or more irregular lesions (thresholded smooth noise, a few
mm to several cm, hyper-intense, hypo-intense or ring-shaped: bright rim around a dark
core, inside the brain only), and finally varied in intensity (bias field, contrast,
noise). Subjects are written BraTS-style, `<id>/<id>_flair.nii.gz` + `<id>/<id>_seg.nii.gz`
with BraTS label values (1 dark core or hypo-intense lesion, 2 hyper-intense lesion,
4 bright rim), so `scripts/prepare_brats.py` (or `volumes.export_slice_dataset`) turns
them into the slice layout. Subject i depends only on (seed, i).
"""

import functools
import json
import os
from dataclasses import asdict, dataclass

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from .cli import UserError, atomic_directory, atomic_path
from .volumes import SliceOptions, export_slice_dataset, find_brats_cases, read_manifest

LESION_KINDS = ("hyper", "hypo", "ring")
LABEL_CORE, LABEL_HYPER, LABEL_RIM = 1, 2, 4
DEMO_MARKER = "demo.json"


@dataclass(frozen=True)
class Template:
    """A brain on a 1 mm grid: intensities in [0, 1] (zero outside), brain mask, affine."""

    image: np.ndarray
    brain: np.ndarray  # float32 0/1, so it can be resampled like the image
    affine: np.ndarray


@dataclass(frozen=True)
class LesionSettings:
    """How many lesions a subject gets, and how big."""

    lesion_free_fraction: float = 0.1
    max_lesions: int = 5
    min_diameter_mm: float = 4.0
    max_diameter_mm: float = 50.0
    kind_probabilities: tuple = (0.45, 0.2, 0.35)  # hyper, hypo, ring


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


def add_lesions(image, brain, rng, voxel_size, count, settings=LesionSettings()):
    """Paint `count` lesions into `image` (in place), inside `brain`; return the BraTS-style label map."""
    seg = np.zeros(image.shape, np.uint8)
    if count == 0:
        return seg
    depth = ndimage.distance_transform_edt(brain)
    median = float(np.median(image[brain]))
    for _ in range(count):
        diameter = np.exp(rng.uniform(np.log(settings.min_diameter_mm), np.log(settings.max_diameter_mm)))
        radius = diameter / 2.0 / voxel_size
        # deep enough that most of the lesion lies inside the brain
        candidates = np.flatnonzero(depth >= min(0.8 * radius + 1.0, depth.max()))
        center = np.unravel_index(rng.choice(candidates), image.shape)
        blob = irregular_blob(radius, rng)
        half = blob.shape[0] // 2
        box, local = [], []
        for c, size in zip(center, image.shape):
            lo, hi = c - half, c + half + 1
            box.append(slice(max(lo, 0), min(hi, size)))
            local.append(slice(max(lo, 0) - lo, blob.shape[0] - (hi - min(hi, size))))
        box, local = tuple(box), tuple(local)
        mask = blob[local] & brain[box]
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


def vary_intensity(image, brain, rng, bias=0.15, gamma_range=(0.75, 1.35), noise_range=(0.01, 0.04), voxel_size=1.0):
    """Bias field, contrast (gamma and gain) and Gaussian noise, inside the brain; background stays 0."""
    field = np.exp(bias * rng.uniform(0.3, 1.0) * smooth_field(image.shape, rng, 60.0 / voxel_size))
    out = image * field
    reference = np.percentile(out[brain], 99) + 1e-8
    out = reference * (np.clip(out, 0, None) / reference) ** rng.uniform(*gamma_range)
    out = out * rng.uniform(0.8, 1.2) + rng.uniform(*noise_range) * rng.standard_normal(image.shape)
    return np.where(brain, np.clip(out, 0.002, None), 0.0).astype(np.float32)  # brain stays > 0


def synthesize_subject(template, rng, voxel_size=2.0, settings=LesionSettings()):
    """One random subject: (FLAIR-like image float32, BraTS label map uint8, affine)."""
    image, brain, affine = deform_template(template, rng, voxel_size)
    count = 0 if rng.random() < settings.lesion_free_fraction else int(rng.integers(1, settings.max_lesions + 1))
    seg = add_lesions(image, brain, rng, voxel_size, count, settings)
    return vary_intensity(image, brain, rng, voxel_size=voxel_size), seg, affine


def _subject_job(job):
    raw_dir, index, seed, voxel_size, settings = job
    rng = np.random.default_rng([seed, index])
    image, seg, affine = synthesize_subject(load_mni_template(voxel_size), rng, voxel_size, settings)
    subject = f"demo_{index:03d}"
    folder = os.path.join(raw_dir, subject)
    os.makedirs(folder)
    flair = nib.Nifti1Image(np.rint(image * 1000).astype(np.int16), affine)
    flair.header.set_xyzt_units("mm")
    nib.save(flair, os.path.join(folder, f"{subject}_flair.nii.gz"))
    nib.save(nib.Nifti1Image(seg, affine), os.path.join(folder, f"{subject}_seg.nii.gz"))
    return subject


def write_demo_subjects(raw_dir, num_subjects, seed=0, voxel_size=2.0, settings=LesionSettings(), workers=1):
    """Write `num_subjects` synthetic subjects BraTS-style under `raw_dir` (replacing an earlier demo there)."""
    if num_subjects < 2:
        raise UserError(f"--num_subjects must be at least 2 (one per split), got {num_subjects}")
    if voxel_size < 1:
        raise UserError(f"--voxel_size must be at least 1 mm (the template's resolution), got {voxel_size}")
    raw_dir = os.path.abspath(raw_dir)
    if os.path.isdir(raw_dir) and os.listdir(raw_dir) and not os.path.isfile(os.path.join(raw_dir, DEMO_MARKER)):
        raise UserError(f"{raw_dir}: exists, is not empty and is not a demo folder; refusing to replace it")
    load_mni_template(voxel_size)  # once here, so worker processes inherit it
    with atomic_directory(raw_dir) as tmp:
        jobs = [(tmp, i, seed, voxel_size, settings) for i in range(num_subjects)]
        progress = dict(total=num_subjects, desc="demo subjects", unit="subject")
        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers) as pool:
                list(tqdm(pool.map(_subject_job, jobs), **progress))
        else:
            list(tqdm(map(_subject_job, jobs), **progress))
        with open(os.path.join(tmp, DEMO_MARKER), "w") as f:
            json.dump(dict(num_subjects=num_subjects, seed=seed, voxel_size=voxel_size,
                           lesions=asdict(settings)), f, indent=1, sort_keys=True)
            f.write("\n")
    return raw_dir


def make_demo_dataset(out_dir, num_subjects=72, seed=0, voxel_size=2.0, image_size=64, val_fraction=0.15,
                      min_tumor_pixels=5, settings=LesionSettings(), workers=1, preview=True):
    """Subjects under OUT/raw, the slice layout under OUT/slices, a picture at OUT/preview.png; returns counts."""
    raw_dir = write_demo_subjects(os.path.join(out_dir, "raw"), num_subjects, seed, voxel_size, settings, workers)
    options = SliceOptions(image_size=image_size, min_lesion_pixels=min_tumor_pixels)
    counts = export_slice_dataset(find_brats_cases(raw_dir, ("flair",)), os.path.join(out_dir, "slices"), options,
                                  input_dir=raw_dir, val_fraction=val_fraction, seed=seed, workers=workers)
    if preview:
        save_preview(os.path.join(out_dir, "slices"), os.path.join(out_dir, "preview.png"))
    return counts


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
