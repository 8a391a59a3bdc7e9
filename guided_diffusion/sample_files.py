"""The files of a sampling run: the samples as `samples_{N}x{H}x{W}x{C}.npz` (as the openai code writes
them) and a labelled PNG grid, each written atomically."""

import os

import numpy as np

from .files import atomic_path

DEFAULT_CLASS_NAMES = ("normal", "tumor")


def samples_filename(images, ext="npz"):
    """`samples_{N}x{H}x{W}x{C}.{ext}` for an NHWC array."""
    return "samples_" + "x".join(str(d) for d in images.shape) + f".{ext}"


def save_samples_npz(images, labels, save_dir):
    """Write arr_0 = uint8 NHWC images (and arr_1 = labels unless None) atomically; returns the path."""
    path = os.path.join(save_dir, samples_filename(images))
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": np.asarray(labels)}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return path


def save_sample_grid(images, labels, path, class_names=DEFAULT_CLASS_NAMES, max_images=64, ncols=8):
    """A PNG grid of the first `max_images` uint8 NHWC images, each titled with its class, written atomically.

    One- and three-channel images are shown as grey / RGB; other channel counts show channel 0.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    shown = images[:max_images]
    n = len(shown)
    if n == 0:
        raise ValueError("no images to put in a grid")
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(1.6 * ncols, 1.75 * nrows), dpi=100)
    channels = shown.shape[-1]
    for i in range(nrows * ncols):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.axis("off")
        if i >= n:
            continue
        if channels == 3:
            ax.imshow(shown[i], interpolation="nearest")
        else:
            ax.imshow(shown[i, :, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        if labels is not None:
            label = int(labels[i])
            name = class_names[label] if class_names and label < len(class_names) else "class"
            ax.set_title(f"{name} ({label})", fontsize=8)
    if channels not in (1, 3):
        fig.suptitle(f"channel 0 of {channels}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
