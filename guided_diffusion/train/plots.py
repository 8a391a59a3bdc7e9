"""progress.csv of a training run: dropping the rows a crash lost on resume, and the loss curves."""

import csv
import math
import os

from ..cli import atomic_path


def truncate_progress(csv_path, step):
    """Drop rows logged after `step` (work lost by a crash) so a resumed run's log has no duplicates."""
    if not os.path.isfile(csv_path):
        return
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "step" not in rows[0]:
        return
    col = rows[0].index("step")
    kept = [rows[0]] + [r for r in rows[1:] if not r[col] or float(r[col]) <= step]
    if len(kept) == len(rows):
        return
    with atomic_path(csv_path) as tmp:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)


def plot_curves(csv_path, png_path, keys):
    """Draw each of `keys` found in progress.csv against `step`, one panel per key, into `png_path`."""
    if not os.path.isfile(csv_path):
        return
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    series = {}
    for key in keys:
        points = [(float(r["step"]), float(r[key])) for r in rows if r.get("step") and r.get(key)]
        points = [(s, v) for s, v in points if math.isfinite(v)]
        if points:
            series[key] = points
    if not series:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.2), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, lw=1, marker="o" if len(steps) <= 50 else None, ms=3)
        ax.set_xlabel("step")
        ax.set_title(key)
        if key.endswith("loss") or key in ("mse", "vb"):
            if min(values) > 0:
                ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

