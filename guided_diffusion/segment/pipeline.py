"""The one segmentation pipeline: which slices, in which batches, with which noise, detected or not.

Every front end (`image_p_seg.py` on a slice folder, `segment_scans.py` on whole scans, the
ablation on a training subset) hands `Pipeline.run` a sequence of `Batch`es and consumes the
`BatchResult`s it yields, one batch at a time, so memory depends on the batch size and not on the
number of images. For each batch:

1. detection (optional): the classifier's tumour probability at t = 0; slices under the threshold
   are not segmented and get an all-zero map (an empty mask); optionally also the detected slices
   whose map is not clearly two-class (a label-free check of the map);
2. the method's maps of the other slices, averaged over `noise_draws` noise draws, where slice
   `name`'s draw k depends only on (seed, name, k): a slice's map does not depend on the batch
   size, on the other slices selected, or on the front end that read it;
3. under torchrun or mpiexec, rank r computes batches r, r + world, ...; each round of batches is
   gathered on rank 0, which yields every result in order (the other ranks yield nothing).

`select_slices` picks the slices of a split (the tumour slices, or every slice; a fold of them, or
an evenly spaced subset); `SliceBatches` reads them lazily; `compute_maps` is the in-memory
shortcut for the small subsets of the ablation.
"""

import hashlib
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .. import dist_util
from .chain import per_image_noise

LESION_LABEL = 1  # the class index of "tumor" (datasets.CLASSES): the label every segmented slice is given
SLICE_CHOICES = ("tumor", "all")


@dataclass
class Batch:
    """Images (B, C, H, W) in [-1, 1]; image-level labels (B,) (-1: unknown); masks (B, H, W) bool and
    has_mask (B,) bool (a slice without a reference mask has an all-False one); names (file or slice names)."""

    images: torch.Tensor
    labels: np.ndarray
    masks: np.ndarray
    has_mask: np.ndarray
    names: list

    def __len__(self):
        return len(self.names)


@dataclass
class BatchResult:
    """One batch after the pipeline: maps {variant: float32 (B, H, W)} (zero where not segmented),
    segmented (B,) bool, tumour_probability (B,) float or None without detection."""

    batch: Batch
    maps: dict
    segmented: np.ndarray
    tumour_probability: np.ndarray = None


@dataclass
class SliceSet:
    """Slices held in memory (the ablation's small subsets): images (N, C, H, W), masks (N, H, W) bool,
    labels (N,), names."""

    images: torch.Tensor
    masks: np.ndarray
    labels: torch.Tensor
    names: list

    def __len__(self):
        return len(self.names)


def slice_key(name):
    """A slice's identity for its noise: the name without an image extension ('s_z003.png' -> 's_z003'),
    so a slice read from the slice layout and the same slice cut from its scan get the same noise."""
    from ..datasets import IMAGE_EXTENSIONS

    base = os.path.basename(name)
    stem, ext = os.path.splitext(base)
    return stem if ext.lower() in IMAGE_EXTENSIONS else base


def noise_keys(names, draw=0):
    """Integer noise keys of slices: one 62-bit hash of (slice_key, draw) each."""
    keys = []
    for name in names:
        text = slice_key(name) if draw == 0 else f"{slice_key(name)}#draw{draw}"
        keys.append(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2)
    return keys


def evenly_spaced(items, count):
    """At most `count` of `items`, evenly spaced (all when count is 0 or covers them)."""
    if not count or len(items) <= count:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def select_slices(src_dir, split, *, image_size, in_channels, slices="tumor", fold=0, num_folds=1, fold_size=0,
                  max_images=0):
    """The slices of `split` to segment, as a lazily read `SliceDataset`, in sorted order.

    slices: "tumor" (the tumour slices, the paper's protocol) or "all" (normal and tumour slices, for
    segmenting with detection). Then fold `fold` (of `num_folds`, or the block of `fold_size`: see
    `datasets.select_fold`) and at most `max_images`, evenly spaced so that a subset spans subjects.
    Masks are optional: slices with one are scored, the others only segmented.
    """
    from ..datasets import CLASSES, SliceDataset, list_slices, select_fold

    if slices not in SLICE_CHOICES:
        raise ValueError(f"slices {slices!r}: choose one of {', '.join(SLICE_CHOICES)}")
    files = list_slices(src_dir, split, classes=("tumor",) if slices == "tumor" else CLASSES)
    chosen = evenly_spaced(select_fold(files, fold, num_folds, fold_size), max_images)
    return SliceDataset(src_dir, split, image_size=image_size, in_channels=in_channels, files=chosen)


def load_slice_set(src_dir, split, *, image_size, in_channels, max_images=0):
    """Tumour slices of `split` that have masks, read into memory (for the ablation, which scores every
    point); at most `max_images`, evenly spaced."""
    from ..datasets import SliceDataset

    tumours = select_slices(src_dir, split, image_size=image_size, in_channels=in_channels)
    with_masks = [item for item, mask in zip(tumours.items, tumours.mask_paths) if mask is not None]
    if not with_masks:
        raise ValueError(f"src_dir {src_dir}: no tumour image of the {split} split has a mask in seg/")
    dataset = SliceDataset(src_dir, split, image_size=image_size, in_channels=in_channels,
                           files=evenly_spaced(with_masks, max_images))
    batch = SliceBatches(dataset, len(dataset))[0]
    return SliceSet(images=batch.images, masks=batch.masks, labels=torch.as_tensor(batch.labels), names=batch.names)


class SliceBatches:
    """Batches of a `SliceDataset`, read only when asked for (each process reads its own)."""

    def __init__(self, dataset, batch_size):
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: must be at least 1")
        self.dataset, self.batch_size = dataset, batch_size

    def __len__(self):
        return -(-len(self.dataset) // self.batch_size)

    def __getitem__(self, index):
        start = index * self.batch_size
        items = [self.dataset[i] for i in range(start, min(start + self.batch_size, len(self.dataset)))]
        return Batch(images=torch.stack([item["image"] for item in items]),
                     labels=np.array([int(item["label"]) for item in items]),
                     masks=torch.stack([item["mask"][0] > 0.5 for item in items]).numpy(),
                     has_mask=np.array([item["has_mask"] for item in items], bool),
                     names=[item["name"] for item in items])


class ArrayBatches:
    """Batches of images held in memory (names give each image's noise)."""

    def __init__(self, images, names, batch_size, labels=None, masks=None):
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: must be at least 1")
        self.images, self.names, self.batch_size = images, list(names), batch_size
        n = len(self.names)
        self.labels = np.full(n, -1) if labels is None else np.asarray(labels)
        self.masks = masks
        self.shape = tuple(images.shape[-2:])

    def __len__(self):
        return -(-len(self.names) // self.batch_size)

    def __getitem__(self, index):
        part = slice(index * self.batch_size, (index + 1) * self.batch_size)
        names = self.names[part]
        masks = (np.zeros((len(names), *self.shape), bool) if self.masks is None else np.asarray(self.masks[part]))
        return Batch(images=torch.as_tensor(self.images[part]), labels=self.labels[part], masks=masks,
                     has_mask=np.full(len(names), self.masks is not None), names=names)


class Pipeline:
    """Detection, then a method's maps (mean over noise draws), batch by batch; see the module docstring.

    detector: None, or a callable images -> tumour probability (B,) (see `segment.detect`); slices with
    a probability under `threshold` are not segmented. map_gate: None, or a callable (maps, images) ->
    keep (n,) bool run on the detected slices' maps (`detect.SeparabilityGate`): the rejected ones get
    an all-zero map and count as not segmented. `seconds` holds, after a run, the time spent in
    detection and the method, summed over batches and processes (data reading excluded).
    """

    def __init__(self, method, *, seed=0, noise_draws=1, detector=None, threshold=0.5, map_gate=None, device=None,
                 progress=True, first_draw=0):
        if noise_draws < 1:
            raise ValueError(f"noise_draws {noise_draws}: must be at least 1")
        if first_draw < 0:
            raise ValueError(f"first_draw {first_draw}: must be at least 0")
        self.first_draw = first_draw  # the draws used are first_draw .. first_draw + noise_draws - 1
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold {threshold}: must lie in [0, 1]")
        self.method, self.seed, self.noise_draws = method, seed, noise_draws
        self.detector, self.threshold, self.map_gate = detector, threshold, map_gate
        self.device = device or dist_util.dev()
        self.progress = progress
        self.seconds = self._elapsed = 0.0

    def maps(self, images, names):
        """The method's maps of `images` (on the device), mean over the noise draws: {variant: (B, H, W)}."""
        y1 = torch.full((len(images),), LESION_LABEL, dtype=torch.long, device=images.device)
        total = None
        for draw in range(self.first_draw, self.first_draw + self.noise_draws):
            noise = per_image_noise(images.shape[1:], self.seed, noise_keys(names, draw), device=images.device)
            maps = {v: np.asarray(m, dtype=np.float64) for v, m in self.method.maps(images, y1, noise).items()}
            total = maps if total is None else {v: total[v] + maps[v] for v in total}
        return {v: (m / self.noise_draws).astype(np.float32) for v, m in total.items()}

    def process(self, batch):
        """One batch through detection and the method (on this process)."""
        x0 = batch.images.to(self.device)
        began = time.perf_counter()
        probability = None
        segmented = np.ones(len(batch), bool)
        if self.detector is not None:
            probability = np.asarray(self.detector(x0), dtype=np.float64)
            segmented = probability >= self.threshold
        shape = (len(batch), *x0.shape[-2:])
        maps = {v: np.zeros(shape, np.float32) for v in self.method.variants()}
        if segmented.any():
            chosen = np.flatnonzero(segmented)
            index = torch.as_tensor(chosen, device=self.device)
            part = self.maps(x0.index_select(0, index), [batch.names[i] for i in chosen])
            if self.map_gate is not None:  # a detected slice whose map shows no clear lesion is not segmented
                keep = self.map_gate(part[self.method.variants()[0]], batch.images.numpy()[chosen])
                segmented[chosen[~keep]] = False
                part = {v: np.where(keep[:, None, None], m, 0.0).astype(np.float32) for v, m in part.items()}
            for variant, values in part.items():
                maps[variant][chosen] = values
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._elapsed += time.perf_counter() - began
        return BatchResult(batch=batch, maps=maps, segmented=segmented, tumour_probability=probability)

    def run(self, batches, desc=None):
        """Yield the BatchResult of every batch of `batches` (a sequence of Batch) in order, on rank 0."""
        rank, world = dist_util.get_rank(), dist_util.get_world_size()
        self._elapsed = 0.0
        rounds = range(0, len(batches), world)
        bar = tqdm(rounds, desc=desc or f"{self.method.name} batches", unit="batch" if world == 1 else "round",
                   disable=not self.progress or rank != 0)
        for first in bar:
            mine = first + rank
            result = self.process(batches[mine]) if mine < len(batches) else None
            results = [result] if world == 1 else _gather_on_rank0(result)
            for item in results:
                if item is not None:
                    yield item
        self.seconds = self._elapsed if world == 1 else _sum_on_rank0(self._elapsed)


def _gather_on_rank0(obj):
    """Every rank's `obj` in rank order on rank 0; [] on the others."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered if dist.get_rank() == 0 else []


def _sum_on_rank0(value):
    gathered = _gather_on_rank0(value)
    return float(sum(gathered)) if gathered else value


def compute_maps(method, images, labels=None, *, batch_size, names=None, seed=0, device=None, progress=True,
                 noise_draws=1, first_draw=0):
    """Run `method` over in-memory `images` (every one segmented); returns ({variant: float32 (N, H, W)},
    seconds) on rank 0 and (None, seconds) on the other ranks. `names` give the noise (default: the
    positions '0', '1', ...); the maps are the mean over draws first_draw .. first_draw + noise_draws - 1
    (a later first_draw gives an independent replicate of the same point)."""
    names = [str(i) for i in range(len(images))] if names is None else list(names)
    pipeline = Pipeline(method, seed=seed, noise_draws=noise_draws, device=device, progress=progress,
                        first_draw=first_draw)
    results = list(pipeline.run(ArrayBatches(images, names, batch_size, labels=labels)))
    if dist_util.get_rank() != 0:
        return None, pipeline.seconds
    return {v: np.concatenate([r.maps[v] for r in results]) for v in method.variants()}, pipeline.seconds
