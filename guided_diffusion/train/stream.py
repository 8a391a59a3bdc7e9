"""The training data stream: an infinite, seekable sequence of batches over a map-style dataset."""

import signal

import numpy as np
import torch

from .. import dist_util
from ..cli import UserError


class ShuffledBatches:
    """Infinite stream of `(images, {"y": labels})` batches over a map-style dataset.

    Every epoch is a permutation drawn from (seed, epoch); its first `batch_size * world_size`
    images form global batch 0, and so on (the incomplete tail is dropped). Rank r takes the r-th
    slice of each global batch, so every process reads its own shard. Batch k is a pure function
    of (seed, k): `seek(k)` restarts the stream there without reading the skipped images.

    Dataset items are dicts with `image` and `label` (see `datasets.SliceDataset`) or
    `(image, label)` pairs. `class_cond=False` yields an empty condition dict.
    """

    def __init__(self, dataset, batch_size, *, seed=0, rank=None, world_size=None, num_workers=0,
                 class_cond=True, pin_memory=False):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = dist_util.get_rank() if rank is None else rank
        self.world_size = dist_util.get_world_size() if world_size is None else world_size
        self.num_workers = num_workers
        self.class_cond = class_cond
        self.pin_memory = pin_memory
        if batch_size < 1:
            raise UserError(f"--batch_size {batch_size}: must be at least 1")
        global_batch = batch_size * self.world_size
        self.batches_per_epoch = len(dataset) // global_batch
        if self.batches_per_epoch == 0:
            raise UserError(
                f"--batch_size {batch_size}: the dataset has only {len(dataset)} images, fewer than one batch "
                f"of {global_batch} ({batch_size} x {self.world_size} processes); lower --batch_size"
            )
        self._iterator = None
        self.seek(0)

    def indices(self, k):
        """Dataset indices of this rank's part of global batch `k`."""
        epoch, j = divmod(k, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        start = j * self.batch_size * self.world_size + self.rank * self.batch_size
        return order[start:start + self.batch_size].tolist()

    def seek(self, k):
        """Make the next batch global batch `k`."""
        self.position = k
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = self._make_iterator(self.position)
        self.position += 1
        batch = next(self._iterator)
        if isinstance(batch, _WorkerFailure):
            self.shutdown()
            raise UserError(batch.message)
        return batch

    def shutdown(self):
        """Stop the data-loader workers (a later `next` starts new ones at the current position)."""
        self._iterator = None

    def _index_batches(self, start):
        k = start
        while True:
            yield self.indices(k)
            k += 1

    def _make_iterator(self, start):
        if self.num_workers == 0:
            return (self.collate([self.dataset[i] for i in idx]) for idx in self._index_batches(start))
        loader = torch.utils.data.DataLoader(
            _ReportingDataset(self.dataset), batch_sampler=self._index_batches(start), num_workers=self.num_workers,
            collate_fn=self.collate, pin_memory=self.pin_memory, persistent_workers=False,
            worker_init_fn=_ignore_stop_signals,
        )
        return iter(loader)

    def collate(self, items):
        """Stack dataset items into `(images, cond)` (a worker's `_WorkerFailure` is passed on as is)."""
        failures = [it for it in items if isinstance(it, _WorkerFailure)]
        if failures:
            return failures[0]
        if isinstance(items[0], dict):
            images = [it["image"] for it in items]
            labels = [it["label"] for it in items]
        else:
            images, labels = zip(*[(it[0], it[1]) for it in items])
        images = torch.stack([torch.as_tensor(im, dtype=torch.float32) for im in images])
        cond = {"y": torch.as_tensor(np.asarray([int(l) for l in labels]), dtype=torch.long)} if self.class_cond else {}
        return images, cond


class _WorkerFailure:
    """A UserError met in a data-loader worker, sent back as a value: torch would wrap a raised one
    in the worker's traceback, and the main process re-raises it as the one line it is."""

    def __init__(self, message):
        self.message = message


class _ReportingDataset(torch.utils.data.Dataset):
    """The dataset as a data-loader worker reads it: a UserError becomes a `_WorkerFailure` item."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except UserError as err:
            return _WorkerFailure(str(err))


def _ignore_stop_signals(worker_id):
    """Data-loader workers ignore SIGINT and SIGTERM. Ctrl-C, `timeout`, SLURM and Kubernetes signal the
    whole process group; a worker killed by it would make the main process fail with a traceback
    instead of finishing its step and saving. Workers exit when the main process closes the loader or dies."""
    del worker_id
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)

