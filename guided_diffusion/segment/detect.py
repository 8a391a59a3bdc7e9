"""Which slices hold a lesion: the classifier's tumour probability at t = 0, and its threshold.

Otsu's threshold always splits a map in two, so a map of a healthy slice always yields some
"lesion". Segmenting a scan nobody has outlined therefore starts by deciding which slices to
segment: `TumourDetector` gives p(tumour | x, t = 0) of a classifier (the noise-conditioned one that
guides CG-CDM, evaluated on the clean image, or a plain one); slices at or above a threshold are
segmented, the others get an empty mask. The threshold is chosen with image-level labels of the
training split (`choose_threshold`, recorded by the ablation), never with validation labels or masks.
"""

import numpy as np
import torch

from ..metrics import binary_auroc
from .pipeline import LESION_LABEL
from .postprocess import foreground_mask, otsu_separability


class TumourDetector:
    """images (B, C, H, W) in [-1, 1] -> p(tumour) (B,) as a numpy array, from `classifier` at t = 0."""

    def __init__(self, classifier, lesion_label=LESION_LABEL):
        self.classifier, self.lesion_label = classifier, lesion_label

    @torch.inference_mode()
    def __call__(self, images):
        t = torch.zeros(len(images), dtype=torch.long, device=images.device)
        logits = self.classifier(images, t).float()
        return torch.softmax(logits, dim=-1)[:, self.lesion_label].cpu().numpy()


class SeparabilityGate:
    """maps (n, H, W), images (n, C, H, W) -> keep (n,) bool: a slice is kept when its map is clearly
    two-class, Otsu's effectiveness (`postprocess.otsu_separability`, with the run's mask options) at
    least `minimum`. It needs no label: a lesion stands out of the map, a false detection gives a
    diffuse map. `minimum` is chosen on the training split (`choose_threshold` on detected slices)."""

    def __init__(self, minimum, options):
        self.minimum, self.options = float(minimum), options

    def scores(self, maps, images):
        region = foreground_mask(images) if self.options.foreground_only else None
        return otsu_separability(maps, region, self.options.smooth_sigma, self.options.positive_part)

    def __call__(self, maps, images):
        return self.scores(maps, images) >= self.minimum


def detection_scores(probability, labels, threshold, detected=None):
    """Slice-level detection against image labels (1 lesion, 0 healthy; other values are left out):
    sensitivity, specificity, balanced accuracy and AUROC (NaN where a class is missing). `detected`:
    the slices finally segmented (default: probability >= threshold)."""
    probability, labels = np.asarray(probability, np.float64), np.asarray(labels)
    detected = probability >= threshold if detected is None else np.asarray(detected, bool)
    known = (labels == 0) | (labels == 1)
    probability, positive, detected = probability[known], labels[known] == 1, detected[known]
    sensitivity = float(detected[positive].mean()) if positive.any() else float("nan")
    specificity = float((~detected[~positive]).mean()) if (~positive).any() else float("nan")
    return {"threshold": float(threshold), "n_positive": int(positive.sum()), "n_negative": int((~positive).sum()),
            "n_detected": int(detected.sum()), "sensitivity": sensitivity, "specificity": specificity,
            "balanced_accuracy": (sensitivity + specificity) / 2,
            "auroc": binary_auroc(probability, positive) if positive.any() and (~positive).any() else float("nan")}


def choose_threshold(probability, labels):
    """The threshold of highest balanced accuracy (Youden's J) on labelled slices; ties: the midpoint of
    the best interval of candidate thresholds, so it does not sit on one training slice's probability."""
    probability, labels = np.asarray(probability, np.float64), np.asarray(labels)
    if not ((labels == 1).any() and (labels == 0).any()):
        raise ValueError("choosing a detection threshold needs slices of both labels")
    values = np.unique(probability)
    candidates = np.concatenate([[0.0], (values[1:] + values[:-1]) / 2, [np.nextafter(values[-1], 2.0)]])
    scores = np.array([detection_scores(probability, labels, c)["balanced_accuracy"] for c in candidates])
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    return float(np.clip(candidates[best[len(best) // 2]], 0.0, 1.0))


def detect_all(detector, batches, device):
    """(probabilities, labels) of every batch of `batches` (a sequence of pipeline Batches)."""
    probabilities, labels = [], []
    for index in range(len(batches)):
        batch = batches[index]
        probabilities.append(detector(batch.images.to(device)))
        labels.append(batch.labels)
    return np.concatenate(probabilities), np.concatenate(labels)
