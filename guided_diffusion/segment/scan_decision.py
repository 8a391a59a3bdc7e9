"""Which voxels of a whole scan are lesion: one decision over the stack of slices, not slice by slice.

A scan's evidence is, for every kept axial slice z, the method's map and the classifier's tumour
probability p(z) at t = 0. Two rules turn it into masks:

- `slices`: each slice on its own, behind a hard gate: slices with p(z) >= `threshold` (and, when
  `min_separability` > 0, a clearly two-class map) are thresholded (min-max + Otsu), the others
  stay empty. This is how `--slices all` segments a folder of slices.
- `volume`: the scan as one object.
  1. Hysteresis along z: a slice *seeds* a lesion when p(z) >= `seed_probability`; seeds grow into
     the contiguous neighbouring slices with p(z) >= `grow_probability`, so a tumour's thin ends,
     where the classifier is unsure, are kept as long as they touch a confident slice, while an
     isolated doubtful slice is not.
  2. Caution at the brain's ends: a slice whose brain area is below `edge_fraction` of the scan's
     largest (the base and the vertex, few of which look like the training slices) seeds only at
     p(z) >= `edge_seed_probability`; it may still be grown into from a seed.
  3. The chosen slices are thresholded as in `slices` (min-max + Otsu per slice, with the run's mask
     options), and the masks are joined in 3-D (26-connected across adjacent kept slices):
     a component is kept when it reaches a seed slice and holds at least `min_lesion_fraction` of
     the scan's brain pixels, so specks of Otsu's split are dropped.

A scan with no seed gets an empty mask: the scan-level "any tumour" decision. Everything is chosen
on training scans by `choose_scan_decision` (see `segment.study`), never on validation masks.
"""

from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy import ndimage

from .postprocess import foreground_mask, saliency_to_mask

DECISION_RULES = ("slices", "volume")


@dataclass(frozen=True)
class ScanDecision:
    """How a scan's slices become its lesion voxels (see the module docstring)."""

    # The 3-D rule's defaults are the mask-tuned choice on the training scans of the demo generator's stress
    # set (make_demo_data.py --profile stress) with the demo models: what a run without settings uses.
    rule: str = "volume"
    threshold: float = 0.5  # "slices": the detection threshold
    min_separability: float = 0.0  # "slices": the map check (0: none)
    seed_probability: float = 0.3  # "volume": p(z) a slice needs to seed a lesion
    grow_probability: float = 0.1  # "volume": p(z) a neighbour of a lesion slice needs to join it
    edge_fraction: float = 0.4  # "volume": slices with less brain than this fraction of the largest are edge slices
    edge_seed_probability: float = 0.999  # "volume": p(z) an edge slice needs to seed
    min_lesion_fraction: float = 0.0005  # "volume": smallest kept 3-D component, as a fraction of the brain's pixels

    def __post_init__(self):
        if self.rule not in DECISION_RULES:
            raise ValueError(f"rule {self.rule!r}: choose one of {', '.join(DECISION_RULES)}")
        for name in ("threshold", "min_separability", "seed_probability", "grow_probability", "edge_fraction",
                     "edge_seed_probability", "min_lesion_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} {value}: must lie in [0, 1]")
        if self.grow_probability > self.seed_probability:
            raise ValueError(f"grow_probability {self.grow_probability} exceeds seed_probability "
                             f"{self.seed_probability}: seeds must be at least as probable as the slices they grow into")

    def as_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        """The decision recorded in selection.json; an unknown key is an error (never skipped)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown scan decision key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**values)


@dataclass
class ScanEvidence:
    """One scan's evidence, its kept slices in z order: maps (N, H, W), p(tumour) (N,), images (N, C, H, W).
    Each slice's Otsu mask and map separability are computed once per mask options and reused."""

    maps: np.ndarray
    probability: np.ndarray
    images: np.ndarray

    def __post_init__(self):
        self.probability = np.asarray(self.probability, np.float64)
        self._masks, self._separability, self._area = {}, {}, None

    def __len__(self):
        return len(self.probability)

    def brain_area(self):
        """Pixels of brain (above the background) per slice."""
        if self._area is None:
            self._area = (foreground_mask(self.images).sum(axis=(1, 2)).astype(np.float64) if len(self)
                          else np.zeros(0))
        return self._area

    def slice_masks(self, options):
        """Every slice's mask on its own (min-max + Otsu with `options`)."""
        if options not in self._masks:
            self._masks[options] = (saliency_to_mask(self.maps, options=options, images=self.images) if len(self)
                                    else np.zeros(np.shape(self.maps), bool))
        return self._masks[options]

    def separability(self, options):
        """Every slice's map separability (`detect.SeparabilityGate.scores`) under `options`."""
        if options not in self._separability:
            from .detect import SeparabilityGate

            self._separability[options] = SeparabilityGate(0.0, options).scores(self.maps, self.images)
        return self._separability[options]


def hysteresis_slices(probability, seeds, grow_probability):
    """Slices in a contiguous run of p >= grow_probability that holds a seed (boolean (N,) arrays)."""
    runs, _ = ndimage.label(np.asarray(probability) >= grow_probability)
    seeded = np.unique(runs[np.asarray(seeds) & (runs > 0)])
    return np.isin(runs, seeded[seeded > 0])


def seed_slices(evidence, decision):
    """Slices confident enough to seed a lesion (stricter at the brain's ends)."""
    area = evidence.brain_area()
    edge = area < decision.edge_fraction * area.max() if area.size else np.zeros(0, bool)
    p = evidence.probability
    return (p >= decision.seed_probability) & (~edge | (p >= decision.edge_seed_probability))


def decide(evidence, decision, options):
    """(masks (N, H, W) bool, segmented (N,) bool) of one scan under `decision`, masks by `options`."""
    masks = evidence.slice_masks(options)
    if len(evidence) == 0:
        return masks, np.zeros(0, bool)
    if decision.rule == "slices":
        chosen = evidence.probability >= decision.threshold
        if decision.min_separability > 0:
            chosen &= evidence.separability(options) >= decision.min_separability
        masks = masks & chosen[:, None, None]
    else:
        seeds = seed_slices(evidence, decision)
        chosen = hysteresis_slices(evidence.probability, seeds, decision.grow_probability)
        masks = keep_supported_components(masks & chosen[:, None, None], seeds,
                                          decision.min_lesion_fraction * evidence.brain_area().sum())
    return masks, masks.any(axis=(1, 2))


def keep_supported_components(masks, seeds, min_pixels):
    """Keep the 26-connected components of the mask stack (N, H, W) that reach a seed slice and hold at
    least `min_pixels` pixels."""
    if not masks.any():
        return masks
    labels, count = ndimage.label(masks, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    seeded = np.zeros(count + 1, bool)
    seeded[np.unique(labels[np.asarray(seeds, bool)])] = True
    keep = seeded & (sizes >= max(min_pixels, 1))
    keep[0] = False
    return keep[labels]


def volume_dice(masks, reference):
    """Dice of a scan's mask stack against its reference; a healthy scan scores 1 when nothing is marked and 0
    otherwise (the BraTS convention for an empty reference)."""
    predicted, actual = int(masks.sum()), int(reference.sum())
    if actual == 0:
        return float(predicted == 0)
    return 2.0 * int((masks & reference).sum()) / (predicted + actual)


def slice_label_score(masks, labels, slice_masks, probability):
    """A score from image labels alone, an estimate of `volume_dice` that needs no reference mask.

    The marked pixels of a slice labelled tumour count as right in proportion to its tumour probability p
    (a tumour's thin ends are labelled tumour, yet hold little of it: most of their mask is wrong), the rest as
    wrong, and every marked pixel of a slice labelled healthy as wrong; a tumour slice left empty misses p
    times the area its own mask (`slice_masks`: every slice's mask on its own) would have marked. A healthy
    scan scores 1 when nothing is marked, else 0. On the demo's stress scans its rank correlation with
    whole-volume Dice across the candidates is 0.90 (the study records it)."""
    positive = np.asarray(labels) == 1
    p = np.asarray(probability, np.float64)
    area = masks.sum(axis=(1, 2)).astype(np.float64)
    if not positive.any():
        return float(area.sum() == 0)
    right = (area * p)[positive].sum()
    wrong = (area * (1 - p))[positive].sum() + area[~positive].sum()
    missing = (slice_masks.sum(axis=(1, 2)) * p)[positive & (area == 0)].sum()
    return float(2.0 * right / (2.0 * right + wrong + missing)) if right + wrong + missing else 0.0


def candidate_decisions(slice_rule=None):
    """The decisions the study compares: `slice_rule` (the slice gate, when given) and a grid of the 3-D rule's
    thresholds, ordered so that a tie goes to the more cautious one (stricter at the brain's ends, larger
    smallest lesion): the training scans may hold no case that tells them apart."""
    grid = [ScanDecision(rule="volume", seed_probability=seed, grow_probability=grow, edge_fraction=edge,
                         edge_seed_probability=edge_seed, min_lesion_fraction=size)
            for edge in (0.6, 0.4, 0.0) for edge_seed in ((0.999, 0.99) if edge else (0.99,))
            for size in (0.002, 0.0005, 0.0)
            for seed in (0.5, 0.3, 0.2, 0.7, 0.9) for grow in (0.1, 0.05, 0.2, 0.02) if grow <= seed]
    return ([slice_rule] if slice_rule is not None else []) + grid


def choose_scan_decision(scans, options, candidates, *, use_masks=True):
    """The candidate with the best mean score over training `scans`, and one row per candidate.

    scans: (ScanEvidence, reference slice masks (N, H, W), slice labels (N,)) per scan. Every row holds both
    scores, `dice` (`volume_dice` against the masks) and `label_score` (`slice_label_score`, image labels
    alone); `use_masks` says which one chooses (the label-free choice uses labels alone). Ties go to the
    earlier candidate.
    """
    rows, best = [], None
    key = "dice" if use_masks else "label_score"
    for decision in candidates:
        dice, label = [], []
        for evidence, reference, labels in scans:
            masks, _ = decide(evidence, decision, options)
            dice.append(volume_dice(masks, reference))
            label.append(slice_label_score(masks, labels, evidence.slice_masks(options), evidence.probability))
        rows.append({**decision.as_dict(), "dice": float(np.mean(dice)), "dice_min": float(np.min(dice)),
                     "label_score": float(np.mean(label))})
        if best is None or rows[-1][key] > best[1]:
            best = (decision, rows[-1][key])
    return best[0], rows
