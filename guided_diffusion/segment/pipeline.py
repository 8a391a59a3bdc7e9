"""The segmentation pipeline: which slices, in which batches, with which noise, timed.

`select_slices` picks the evaluated tumour slices of a split (a fold of them, or an evenly spaced
subset); `compute_maps` runs a method over them in batches and returns `{variant: maps}` and the
seconds spent. Image i's noise depends only on (seed, i), so the maps do not depend on the batch
size. Under a distributed launch (torchrun, mpiexec) every rank takes every world_size-th batch and
rank 0 gathers the maps in image order, so they are the same for any number of processes.
"""

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .. import dist_util
from .chain import per_image_noise


@dataclass
class SliceSet:
    """Evaluated slices: images (N, C, H, W) in [-1, 1], masks (N, H, W) bool, labels (N,), names."""

    images: torch.Tensor
    masks: np.ndarray
    labels: torch.Tensor
    names: list

    def __len__(self):
        return len(self.names)


def evenly_spaced(items, count):
    """At most `count` of `items`, evenly spaced (all when count is 0 or covers them)."""
    if not count or len(items) <= count:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def select_slices(src_dir, split, *, image_size, in_channels, fold=0, num_folds=1, fold_size=0, max_images=0,
                  log=print):
    """The tumour slices of `split` that have a mask, in sorted order; fold `fold` (of `num_folds`, or the
    block of `fold_size`: see `datasets.select_fold`), then at most `max_images` of them, evenly spaced so
    that a subset spans subjects."""
    from ..datasets import SliceDataset, list_slices, select_fold

    tumours = SliceDataset(src_dir, split, files=list_slices(src_dir, split, classes=("tumor",)))
    with_masks = [item for item, mask in zip(tumours.items, tumours.mask_paths) if mask is not None]
    if not with_masks:
        raise ValueError(f"src_dir {src_dir}: no tumour image of the {split} split has a mask in seg/")
    if len(with_masks) < len(tumours.items):
        log(f"{len(tumours.items) - len(with_masks)} tumour images without a mask are not evaluated")
    chosen = evenly_spaced(select_fold(with_masks, fold, num_folds, fold_size), max_images)
    dataset = SliceDataset(src_dir, split, image_size=image_size, in_channels=in_channels, require_masks=True,
                           files=chosen)
    items = [dataset[i] for i in range(len(dataset))]
    return SliceSet(images=torch.stack([item["image"] for item in items]),
                    masks=torch.stack([item["mask"][0] > 0.5 for item in items]).numpy(),
                    labels=torch.stack([item["label"] for item in items]),
                    names=[item["name"] for item in items])


def compute_maps(method, images, labels, *, batch_size, seed=0, device=None, progress=True):
    """Run `method` (a `methods.Method`) over `images`; returns ({variant: float32 (N, H, W)}, seconds).

    Seconds are the time spent in the method itself on this process (data movement excluded),
    summed over its batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be at least 1")
    device = device or dist_util.dev()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    starts = list(range(0, len(images), batch_size))
    mine = starts[rank::world]
    parts = {}
    elapsed = 0.0
    bar = tqdm(mine, desc=f"{method.name} batches", unit="batch", disable=not progress or rank != 0)
    for start in bar:
        x0 = images[start:start + batch_size].to(device)
        y1 = labels[start:start + batch_size].to(device)
        noise = per_image_noise(x0.shape[1:], seed, range(start, start + len(x0)), device=device)
        began = time.perf_counter()
        batch_maps = method.maps(x0, y1, noise)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - began
        parts[start] = {name: np.asarray(m, dtype=np.float32) for name, m in batch_maps.items()}
    if world > 1:
        parts, elapsed = _gather_on_rank0(parts, elapsed)
        if rank != 0:
            return None, elapsed
    variants = method.variants()
    return {v: np.concatenate([parts[s][v] for s in starts]) for v in variants}, elapsed


def _gather_on_rank0(parts, elapsed):
    """Every rank's batches (and summed seconds) on rank 0; other ranks get ({}, their own seconds)."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((parts, elapsed), gathered, dst=0)
    if dist.get_rank() != 0:
        return {}, elapsed
    merged, seconds = {}, 0.0
    for rank_parts, rank_seconds in gathered:
        merged.update(rank_parts)
        seconds += rank_seconds
    return merged, seconds
