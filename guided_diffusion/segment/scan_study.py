"""The whole-scan decision chosen on the training split's scans (the ablation's last step).

The training subjects' raw scans (found through the slice dataset's manifest) are prepared exactly as
`segment_scans.py` prepares a user's scan, every kept slice gets its map at the chosen operating
point and its tumour probability, and each candidate decision of `scan_decision.candidate_decisions`
(the slice gate chosen on the training slices among them) is scored on the stack:

- `mask_tuned`: mean whole-volume Dice against the training masks (a healthy scan: 1 when nothing is
  marked, else 0);
- `label_free`: mean score from the slices' image labels alone (`scan_decision.slice_label_score`),
  the weak labels the method trains on, no mask; its rank correlation with the masks' Dice across the
  candidates is recorded (`label_score_spearman`).

The records go to selection.json under each choice's `scan_decision`, a summary under
`scan_decisions`, and the table of every candidate's scores to scan_decisions.json beside it.
"""

import os

import numpy as np
from scipy.stats import spearmanr

from .pipeline import Pipeline, evenly_spaced
from .scan_decision import ScanDecision, ScanEvidence, candidate_decisions, choose_scan_decision


def training_scans(src_dir, split, modalities, max_subjects=0):
    """The raw scans (with their references) of the subjects of `split` of a prepared slice dataset, at most
    `max_subjects`, evenly spaced."""
    from ..volumes import read_manifest
    from .scans import Scan, find_scans

    sources = {}
    for row in read_manifest(src_dir):
        if row["split"] == split and row["source"]:
            sources.setdefault(row["subject"], (row["source"], row["seg_source"]))
    scans = []
    for subject in evenly_spaced(sorted(sources), max_subjects):
        source, seg = sources[subject]
        if len(modalities) > 1:  # a subject folder holds the channels
            (scan,) = find_scans([os.path.dirname(source)], modalities)
        else:
            scan = Scan(subject, (source,))
        scan.reference = seg or scan.reference
        scans.append(scan)
    return scans


def scan_evidence(pipeline, prepared, batch_size):
    """A prepared scan's evidence: every kept slice's map and tumour probability (`pipeline` must detect and
    segment every slice: threshold 0, no map check)."""
    from .scans import scan_batches

    results = list(pipeline.run(scan_batches(prepared, batch_size), desc=prepared.scan.name))
    size = prepared.images.shape[-1]
    if not results:
        return ScanEvidence(np.zeros((0, size, size), np.float32), np.zeros(0), prepared.images.numpy())
    maps = np.concatenate([r.maps[next(iter(r.maps))] for r in results])
    probability = np.concatenate([r.tumour_probability for r in results])
    return ScanEvidence(maps, probability, prepared.images.numpy())


def every_slice_pipeline(method, detector, *, seed, noise_draws, device, progress=False):
    """The pipeline of a whole-scan decision: the map and the tumour probability of every slice."""
    return Pipeline(method, seed=seed, noise_draws=noise_draws, detector=detector, threshold=0.0, map_gate=None,
                    device=device, progress=progress)


def study_scan_decisions(choices, scans, detection, *, batch_size=64, log=print):
    """Choose the whole-scan decision of each choice on training `scans`: (Scan, its dataset's SliceOptions)
    pairs.

    choices: {name: (pipeline, mask options, use_masks)}: the pipeline of the choice's operating point
    (`every_slice_pipeline`; choices sharing one pipeline share its evidence), its mask options, and whether
    masks may score it (`mask_tuned`) or only the image labels (`label_free`). Returns the selection record {name: decision, "candidates": {name: rows},
    "n_scans", "subjects"}.
    """
    from .scans import prepare_scan

    prepared = [prepare_scan(scan, preprocessing, preprocessing.lesion_labels) for scan, preprocessing in scans]
    slice_rule = None
    if detection:
        slice_rule = ScanDecision(rule="slices", threshold=float(detection["threshold"]),
                                  min_separability=float(detection.get("min_separability") or 0.0))
    candidates = candidate_decisions(slice_rule)
    record = {"n_scans": len(prepared), "subjects": [s.name for s, _ in scans], "candidates": {}}
    by_pipeline = {}
    for name, (pipeline, options, use_masks) in choices.items():
        log(f"scan decision of {name}: {len(candidates)} candidates on {len(prepared)} training scans, scored "
            + ("against their masks" if use_masks else "by their slice labels alone"))
        if id(pipeline) not in by_pipeline:
            by_pipeline[id(pipeline)] = [(scan_evidence(pipeline, scan, batch_size), *_reference_and_labels(scan))
                                         for scan in prepared]
        evidence = by_pipeline[id(pipeline)]
        chosen, rows = choose_scan_decision(evidence, options, candidates, use_masks=use_masks)
        record[name] = chosen.as_dict()
        record["candidates"][name] = rows
        # does the label-only score rank the candidates as the masks do?
        rho = float(spearmanr([r["label_score"] for r in rows], [r["dice"] for r in rows]).statistic)
        record.setdefault("label_score_spearman", {})[name] = rho if np.isfinite(rho) else None
    return record


def _reference_and_labels(prepared):
    """A prepared scan's reference slice masks and slice labels (empty and healthy when it has no reference)."""
    n = len(prepared.z)
    reference = prepared.masks if prepared.masks is not None else np.zeros((n,) + prepared.images.shape[-2:], bool)
    labels = prepared.labels if prepared.labels is not None else np.zeros(n, int)
    return reference, labels


def add_scan_decisions(chosen, models, src_dir, split, device, *, max_subjects=16, extra_src_dirs=(), batch_size=64,
                       seed=0, log=print):
    """Choose the whole-scan decision of `chosen`'s mask_tuned and label_free points (the ablation's
    selection) on `max_subjects` training scans of the slice dataset `src_dir`, and every `split` scan of each
    of `extra_src_dirs` (harder training data: small, multiple, edge tumours, healthy subjects); records each
    under its choice's `scan_decision` and the comparison under `scan_decisions`."""
    from ..volumes import SETTINGS_NAME, read_settings
    from .scans import dataset_preprocessing

    scans = []
    for root, count in ((src_dir, max_subjects), *((extra, 0) for extra in extra_src_dirs)):
        preprocessing, modalities = dataset_preprocessing(read_settings(root), os.path.join(root, SETTINGS_NAME))
        scans += [(scan, preprocessing) for scan in training_scans(root, split, modalities, count)]
    uses_masks = {"mask_tuned": True, "label_free": False}
    pipelines = point_pipelines(models, {name: chosen[name] for name in uses_masks}, device, seed=seed)
    choices = {name: (*pipelines[name], use_masks) for name, use_masks in uses_masks.items()}
    record = study_scan_decisions(choices, scans, chosen.get("detection"), batch_size=batch_size, log=log)
    record["sources"] = [os.path.normpath(root) for root in (src_dir, *extra_src_dirs)]
    for name in choices:
        chosen[name]["scan_decision"] = record.pop(name)
    chosen["scan_decisions"] = record
    return chosen


def point_pipelines(models, points, device, *, seed=0, progress=False):
    """{name: (every-slice CG-CDM pipeline, mask options)} of selection.json choices {name: point}; choices at the
    same operating point (Q, R, tau, s, noise draws) share one pipeline, so their evidence is computed once."""
    from .config import OperatingPoint
    from .detect import TumourDetector
    from .postprocess import MaskOptions
    from .study import point_method

    detector, shared, out = TumourDetector(models[2]), {}, {}
    for name, choice in points.items():
        point = OperatingPoint.from_dict(choice)
        if point not in shared:
            shared[point] = every_slice_pipeline(point_method(models, point, seed=seed), detector, seed=seed,
                                                 noise_draws=point.noise_draws, device=device, progress=progress)
        out[name] = (shared[point], MaskOptions(**choice.get("postprocessing", {})))
    return out
