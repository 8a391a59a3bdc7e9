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
    (`every_slice_pipeline`), its mask options, and whether masks may score it (`mask_tuned`) or only the
    image labels (`label_free`). Returns the selection record {name: decision, "candidates": {name: rows},
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
    for name, (pipeline, options, use_masks) in choices.items():
        log(f"scan decision of {name}: {len(candidates)} candidates on {len(prepared)} training scans, scored "
            + ("against their masks" if use_masks else "by their slice labels alone"))
        evidence = []
        for scan in prepared:
            n = len(scan.z)
            reference = scan.masks if scan.masks is not None else np.zeros((n,) + scan.images.shape[-2:], bool)
            labels = scan.labels if scan.labels is not None else np.zeros(n, int)
            evidence.append((scan_evidence(pipeline, scan, batch_size), reference, labels))
        chosen, rows = choose_scan_decision(evidence, options, candidates, use_masks=use_masks)
        record[name] = chosen.as_dict()
        record["candidates"][name] = rows
        # does the label-only score rank the candidates as the masks do?
        rho = float(spearmanr([r["label_score"] for r in rows], [r["dice"] for r in rows]).statistic)
        record.setdefault("label_score_spearman", {})[name] = rho if np.isfinite(rho) else None
    return record


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
    choices = {name: (*point_pipeline(models, chosen[name], device, seed=seed), use_masks)
               for name, use_masks in (("mask_tuned", True), ("label_free", False))}
    record = study_scan_decisions(choices, scans, chosen.get("detection"), batch_size=batch_size, log=log)
    record["sources"] = [os.path.normpath(root) for root in (src_dir, *extra_src_dirs)]
    for name in choices:
        chosen[name]["scan_decision"] = record.pop(name)
    chosen["scan_decisions"] = record
    return chosen


def point_pipeline(models, point, device, *, seed=0, progress=False):
    """(every-slice CG-CDM pipeline, mask options) of a selection.json choice `point`."""
    from .detect import TumourDetector
    from .methods import CGCDM, SaliencySettings
    from .postprocess import MaskOptions

    model, diffusion, classifier = models
    settings = SaliencySettings(noise_level=point["noise_level"], steps=point["steps"], taus=(point["tau"],),
                                classifier_scale=point["classifier_scale"], seed=seed)
    method = CGCDM(settings, model=model, diffusion=diffusion, classifier=classifier)
    pipeline = every_slice_pipeline(method, TumourDetector(classifier), seed=seed,
                                    noise_draws=point.get("noise_draws", 1), device=device, progress=progress)
    return pipeline, MaskOptions(**point.get("postprocessing", {}))
