"""The paper's ablation (Fig. 3) on the training split, and settings chosen there.

Every point is measured on the same fixed subset of training tumour slices with the same noise
draw (image i's noise depends only on (seed, i)). One CG-CDM run of R_max steps gives the maps of
every R <= R_max (partial sums), and every tau shares branch A, so the whole study is a handful of
runs. CDM is the same runs at classifier scale 0.

Two choices are made from the grid, never from validation masks:
- `mask_tuned`: the cheapest point (fewest UNet and classifier passes: R x noise draws) whose mean
  Dice against the training masks is within `tolerance` of the best (default: one standard error of
  the best point's mean Dice on the subset, the one-standard-error rule; or a number), then the
  post-processing (smoothing, foreground-only threshold, largest component) best on those maps;
  the best point itself is recorded beside it (`mask_tuned_best`);
- `label_free`: the same rule on a label-free score, which needs no mask at all: of the candidate
  criteria of `label_free.py` (Otsu separability, agreement between noise draws, the classifier's
  drop when the mask is filled with healthy tissue, ...), measured on every point, the one whose
  Spearman rho with Dice across the CG-CDM points is highest (every rho is recorded in
  `label_free_criteria`, each criterion's own choice in `label_free_by_criterion`), with the paper's
  post-processing (or that of `separability_pp` when it is the criterion).
The noise-draw sweep spends passes differently: the mean of the maps of K noise draws at R = 1, 2
against one draw at R = K, at the best point's Q, tau and s. The detection threshold of `--slices
all` and `segment_scans.py` is chosen on the training split's image labels (`detect.choose_threshold`).
"""

import json
import os
from dataclasses import dataclass, replace

import numpy as np

from ..checkpoint_util import load_classifier, load_model_and_diffusion
from ..files import atomic_write_text
from ..script_util import diffusion_from_config
from .label_free import (POSTPROCESSED, best_criterion, criterion_correlations, point_criteria,
                         point_key, tumour_probability)
from .methods import CGCDM, SaliencySettings
from .pipeline import compute_maps
from ..metrics import evaluate_masks
from .postprocess import MaskOptions, saliency_to_mask
from .report import variant_summary
from .saliency import cdm_saliency_by_steps
from .study_plot import plot_ablation

POSTPROCESSING = [MaskOptions(smooth_sigma=sigma, foreground_only=inside, positive_part=positive)
                  for positive in (False, True) for inside in (False, True) for sigma in (0.0, 1.0)]


@dataclass
class StudyGrid:
    """The points of the ablation: noise levels (fractions of T), recorded step counts, taus and scales."""

    noise_levels: tuple = (0.05, 0.1, 0.175)  # Q = 200, 400, 700 of T = 4000
    record_steps: tuple = (1, 2, 5, 10, 20, 30, 50)
    taus: tuple = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99)
    step_sweep_taus: tuple = (0.0, 0.95)
    scales: tuple = (0.0, 1.0, 10.0, 100.0, 1000.0)
    paper_scale: float = 10.0  # s of the Q / R and tau sweeps
    paper_steps: int = 10  # R of the tau and s sweeps
    noise_draws: tuple = (2, 5)  # K of the noise-draw sweep (0 draws: no sweep)
    draw_steps: tuple = (1, 2)  # R of the noise-draw sweep


COST_TOLERANCE = "se"  # how much Dice (or separability) a cheaper point may lose against the best: one standard error


class StepSweep(CGCDM):
    """CG-CDM (CDM at scale 0) recording the maps after several step counts: variants R<r>_tau_<tau>."""

    def __init__(self, settings, record_steps, **resources):
        super().__init__(settings, **resources)
        self.record_steps = tuple(sorted(set(record_steps)))

    def variants(self):
        return [point_name(r, tau) for r in self.record_steps for tau in self.settings.taus]

    def maps(self, x0, y1, noise):
        s = self.settings
        by_steps = cdm_saliency_by_steps(self.model, self.diffusion, x0, y1, taus=s.taus, record_steps=self.record_steps,
                                         absolute=s.abs_map, steps=max(self.record_steps), noise=noise,
                                         **self._diffusion_settings())
        return {point_name(r, tau): m for (r, tau), m in by_steps.items()}


def point_name(steps, tau):
    return f"R{steps}_tau_{float(tau):g}"


def load_models(ddpm_path, classifier_path, device):
    """(model, unspaced diffusion, classifier) from checkpoints with their args.json."""
    model, _, config = load_model_and_diffusion(ddpm_path, device=device)
    classifier, _ = load_classifier(classifier_path, device=device)
    return model, diffusion_from_config({**config, "timestep_respacing": ""}), classifier


def measure(models, slices, *, noise_level, record_steps, taus, scale, batch_size, seed, sweep, progress=True,
            noise_draws=1, criteria=False, masks=None):
    """Rows (one per recorded step count and tau) of one run, with training-split scores.

    criteria: also the label-free criteria of `label_free.point_criteria` (an independent replicate of
    the run on noise draws K..2K-1, and one classifier pass per image and point); masks: a dict that
    receives each point's Otsu masks under `label_free.point_key` (for `label_free.add_stability`).
    """
    model, diffusion, classifier = models
    settings = SaliencySettings(noise_level=noise_level, steps=max(record_steps), taus=tuple(taus),
                                classifier_scale=scale, seed=seed)
    method = StepSweep(settings, record_steps, model=model, diffusion=diffusion, classifier=classifier)
    maps, seconds = compute_maps(method, slices.images, slices.labels, batch_size=batch_size, names=slices.names,
                                 seed=seed, progress=progress, noise_draws=noise_draws)
    replicate, detector, p_before = None, None, None
    if criteria:
        replicate, _ = compute_maps(method, slices.images, slices.labels, batch_size=batch_size, names=slices.names,
                                    seed=seed, progress=progress, noise_draws=noise_draws, first_draw=noise_draws)
        if classifier is not None:
            from .detect import TumourDetector

            detector = TumourDetector(classifier)
            p_before = tumour_probability(detector, slices.images, batch_size)
    rows = []
    for r in record_steps:
        for tau in taus:
            summary = variant_summary(maps[point_name(r, tau)], slices.masks, slices.images)
            rows.append({"sweep": sweep, "method": "cg-cdm" if scale else "cdm", "noise_level": noise_level,
                         "steps": r, "tau": float(tau), "classifier_scale": scale,
                         "noise_draws": noise_draws, "passes": r * noise_draws,
                         "dice": summary["otsu"]["dice_mean"], "dice_std": summary["otsu"]["dice_std"],
                         "dice_lcc": summary["largest_component"]["dice_mean"],
                         "separability": summary["map_separability"],
                         "separability_std": summary["map_separability_std"], "n_images": len(slices),
                         "seconds_per_image": seconds / len(slices)})
            if criteria or masks is not None:
                name = point_name(r, tau)
                fields, point_masks = point_criteria(maps[name], None if replicate is None else replicate[name],
                                                     slices.images, detector, p_before)
                if criteria:
                    rows[-1].update({k: v for k, v in fields.items() if not k.startswith("separability_std")
                                     and k != "separability"})
                if masks is not None:
                    masks[point_key(rows[-1])] = point_masks
    return rows


def run_ablation(models, slices, grid=StudyGrid(), *, batch_size=32, seed=0, log=print, criteria=False, masks=None):
    """Every sweep of Fig. 3 for CG-CDM and CDM on `slices`; returns the rows (`criteria`, `masks`: see `measure`)."""
    rows = []
    extra = dict(criteria=criteria, masks=masks)
    for noise_level in grid.noise_levels:  # Dice vs R, one run per Q and method
        for scale in (grid.paper_scale, 0.0):
            log(f"R sweep: Q = {noise_level:g} T, s = {scale:g}")
            rows += measure(models, slices, noise_level=noise_level, record_steps=grid.record_steps,
                            taus=grid.step_sweep_taus, scale=scale, batch_size=batch_size, seed=seed, sweep="steps",
                            **extra)
    for scale in (grid.paper_scale, 0.0):  # Dice vs tau
        log(f"tau sweep: s = {scale:g}")
        rows += measure(models, slices, noise_level=0.1, record_steps=(grid.paper_steps,), taus=grid.taus, scale=scale,
                        batch_size=batch_size, seed=seed, sweep="tau", **extra)
    for scale in grid.scales:  # Dice vs s (s = 0 is CDM); the tau sweep already measured its own scales
        measured = [r for r in rows if r["sweep"] == "tau" and r["classifier_scale"] == scale]
        if {float(t) for t in grid.step_sweep_taus} <= {r["tau"] for r in measured}:
            rows += [{**r, "sweep": "classifier_scale"} for r in measured if r["tau"] in grid.step_sweep_taus]
            continue
        log(f"s sweep: s = {scale:g}")
        rows += measure(models, slices, noise_level=0.1, record_steps=(grid.paper_steps,), taus=grid.step_sweep_taus,
                        scale=scale, batch_size=batch_size, seed=seed, sweep="classifier_scale", **extra)
    return rows


def noise_draw_sweep(models, slices, best, grid=StudyGrid(), *, batch_size=32, seed=0, log=print, criteria=False,
                     masks=None):
    """Rows of K noise draws at the R of `grid.draw_steps`, at `best`'s Q, tau and s (equal cost: K draws
    at R = 1 against one draw at R = K, which the R sweep measured)."""
    rows = []
    for draws in grid.noise_draws:
        log(f"noise draws: K = {draws}")
        rows += measure(models, slices, noise_level=best["noise_level"], record_steps=grid.draw_steps,
                        taus=(best["tau"],), scale=best["classifier_scale"], batch_size=batch_size, seed=seed,
                        sweep="noise_draws", noise_draws=draws, criteria=criteria, masks=masks)
    return rows


def passes(row):
    """UNet (and classifier) passes per image of a row: R x noise draws."""
    return row["steps"] * row.get("noise_draws", 1)


def tolerance_of(rows, key, tolerance):
    """The tolerance in units of `key`: a number as it is, or "se", the standard error of the best row's
    mean (its per-image standard deviation over the square root of its image count): the one-standard-
    error rule, which takes the cheapest point that the subset cannot tell apart from the best."""
    if tolerance != "se":
        return float(tolerance)
    best = max(rows, key=lambda r: r[key])
    return float(best[f"{key}_std"]) / best["n_images"] ** 0.5


def best_point(rows, key, method=None, max_steps=None, tolerance=0.0):
    """The cheapest row (fewest `passes`) whose `key` is within `tolerance` (a number, or "se": see
    `tolerance_of`) of the highest among `method`'s rows with at most `max_steps` steps; tolerance 0
    gives the best row (ties: fewer passes, then the higher `key`, then the earlier row)."""
    candidates = [r for r in rows if (method is None or r["method"] == method)
                  and (max_steps is None or r["steps"] <= max_steps)]
    top = max(r[key] for r in candidates)
    good = [r for r in candidates if r[key] >= top - tolerance_of(candidates, key, tolerance)]
    return min(good, key=lambda r: (passes(r), -r[key]))


def point_method(models, point, *, seed=0):
    """CG-CDM (CDM at s = 0) at an `OperatingPoint` (Q, R, tau, s; its noise draws are the pipeline's), on
    `models` (model, unspaced diffusion, classifier)."""
    model, diffusion, classifier = models
    settings = SaliencySettings(noise_level=point.noise_level, steps=point.steps, taus=(point.tau,),
                                classifier_scale=point.classifier_scale, seed=seed)
    return CGCDM(settings, model=model, diffusion=diffusion, classifier=classifier)


def choose_postprocessing(models, slices, point, *, batch_size=32, seed=0, options=POSTPROCESSING):
    """Dice of each post-processing of the chosen point's maps; returns (best MaskOptions, rows)."""
    method = point_method(models, point, seed=seed)
    maps, _ = compute_maps(method, slices.images, slices.labels, batch_size=batch_size, names=slices.names, seed=seed,
                           progress=False, noise_draws=point.noise_draws)
    (point_maps,) = maps.values()
    rows, best = [], None
    for option in options:
        summary = variant_summary(point_maps, slices.masks, slices.images, option)
        for keep, key in ((False, "otsu"), (True, "largest_component")):
            chosen = replace(option, keep_largest=keep)
            rows.append({**chosen.as_dict(), "dice": summary[key]["dice_mean"]})
            if best is None or rows[-1]["dice"] > best[1]:
                best = (chosen, rows[-1]["dice"])
    return best[0], rows


def choose_label_free_postprocessing(models, slices, point, *, batch_size=32, seed=0, options=POSTPROCESSING):
    """The post-processing of the label-free choice, chosen without masks: the option whose masks score the
    highest compact agreement (`label_free`: the Dice between the masks of two independent sets of noise
    draws, minus the masks' share of the brain). Returns (MaskOptions, rows with each option's criterion and,
    for the report only, its Dice against the training masks, and the criterion's Spearman rho with that
    Dice across the options)."""
    from .label_free import brain_share, mask_dice, rank_correlation

    method = point_method(models, point, seed=seed)
    draws = point.noise_draws
    maps, replicate = ((compute_maps(method, slices.images, slices.labels, batch_size=batch_size, names=slices.names,
                                     seed=seed, progress=False, noise_draws=draws, first_draw=first)[0])
                       for first in (0, draws))
    (maps,), (replicate,) = maps.values(), replicate.values()
    images = slices.images.numpy()
    rows = []
    for option in (replace(o, keep_largest=keep) for o in options for keep in (False, True)):
        masks = saliency_to_mask(maps, options=option, images=images)
        other = saliency_to_mask(replicate, options=option, images=images)
        score = float(np.mean(mask_dice(masks, other) - brain_share(images, masks)))
        dice = float(np.mean([r["dice"] for r in evaluate_masks(masks, slices.masks)]))
        rows.append({**option.as_dict(), "compact_agreement": score, "dice": dice})
    best = max(range(len(rows)), key=lambda i: (rows[i]["compact_agreement"], -i))
    rho = rank_correlation([r["compact_agreement"] for r in rows], [r["dice"] for r in rows])
    chosen = {k: rows[best][k] for k in MaskOptions().as_dict()}
    return MaskOptions(**chosen), rows, rho


def choose_detection(models, batches, device, point, options, *, seed=0):
    """Detection chosen on `batches` (training slices of both labels), from their image labels alone:
    the classifier's threshold (best balanced accuracy), then, on the slices it detects, the minimum
    map separability of `point`'s maps with the mask `options` (`detect.SeparabilityGate`; 0 when the
    detected slices hold no healthy one). Returns the record saved in selection.json."""
    from .detect import SeparabilityGate, TumourDetector, choose_threshold, detect_all, detection_scores
    from .pipeline import Pipeline

    detector = TumourDetector(models[2])
    probabilities, labels = detect_all(detector, batches, device)
    threshold = choose_threshold(probabilities, labels)
    record = {**detection_scores(probabilities, labels, threshold), "n_training_images": len(labels)}
    method = point_method(models, point, seed=seed)
    pipeline = Pipeline(method, seed=seed, noise_draws=point.noise_draws, detector=detector,
                        threshold=threshold, device=device, progress=False)
    gate, scores, detected_labels = SeparabilityGate(0.0, options), [], []
    for result in pipeline.run(batches):
        kept = result.segmented
        (maps,) = result.maps.values()
        scores.extend(gate.scores(maps[kept], result.batch.images.numpy()[kept]))
        detected_labels.extend(result.batch.labels[kept])
    scores, detected_labels = np.asarray(scores), np.asarray(detected_labels)
    both = (detected_labels == 0).any() and (detected_labels == 1).any()
    minimum = choose_threshold(scores, detected_labels) if both else 0.0
    gated = detection_scores(scores, detected_labels, minimum)
    return record | {"min_separability": minimum, "detected_healthy": int((detected_labels == 0).sum()),
                     "gate_sensitivity": gated["sensitivity"], "gate_specificity": gated["specificity"]}


def selection(rows, postprocessing, postprocessing_rows, n_images, max_steps=None, tolerance=COST_TOLERANCE,
              detection=None):
    """The settings chosen on the training split, as saved in selection.json.

    `max_steps` caps R (a time budget); `tolerance` is the Dice a cheaper point may lose against the
    best (see the module docstring); the best points are recorded too. `detection`: the record of
    `choose_detection`.
    """
    def settings_of(row):
        return ({k: row[k] for k in ("noise_level", "steps", "tau", "classifier_scale")}
                | {"noise_draws": row.get("noise_draws", 1), "passes": passes(row), "training_dice": row["dice"],
                   "training_separability": row["separability"]})

    mask_tuned = best_point(rows, "dice", "cg-cdm", max_steps, tolerance)
    cg_cdm = [r for r in rows if r["method"] == "cg-cdm" and (max_steps is None or r["steps"] <= max_steps)]
    label_free, correlations, criterion, by_criterion = label_free_choice(rows, max_steps, tolerance)
    return {
        "n_training_images": n_images,
        "max_steps": max_steps,
        "tolerance": tolerance,
        "tolerance_dice": tolerance_of(cg_cdm, "dice", tolerance),
        "mask_tuned": settings_of(mask_tuned) | {"postprocessing": postprocessing.as_dict()},
        "mask_tuned_best": settings_of(best_point(rows, "dice", "cg-cdm", max_steps)),
        "mask_tuned_any_steps": settings_of(best_point(rows, "dice", "cg-cdm")),
        "mask_tuned_cdm": settings_of(best_point(rows, "dice", "cdm", max_steps, tolerance))
        | {"postprocessing": postprocessing.as_dict()},
        "label_free": settings_of(label_free) | label_free_postprocessing(criterion)
        | {"criterion": criterion, "training_criterion": label_free[criterion]},
        "label_free_criteria": correlations,
        "label_free_by_criterion": {name: settings_of(row) | {"training_criterion": row[name]}
                                    for name, row in by_criterion.items()},
        "postprocessing_candidates": postprocessing_rows,
        **({"detection": detection} if detection is not None else {}),
    }


def label_free_postprocessing(criterion):
    """The post-processing of the label-free choice: that of `separability_pp` when it is the criterion,
    else the paper's (none)."""
    return {"postprocessing": (POSTPROCESSED if criterion == "separability_pp" else MaskOptions()).as_dict()}


def label_free_choice(rows, max_steps=None, tolerance=COST_TOLERANCE):
    """The label-free choice: the criterion (of `label_free.CRITERIA`, as the rows hold them) whose
    Spearman rho with Dice across the CG-CDM points (at most `max_steps` steps) is the highest, then the
    cheapest point within `tolerance` of its best value (`best_point`). Returns (row, {criterion: rho},
    criterion, {criterion: row chosen by it}) for every criterion every candidate row holds."""
    cg_cdm = [r for r in rows if r["method"] == "cg-cdm" and (max_steps is None or r["steps"] <= max_steps)]
    correlations = criterion_correlations(cg_cdm)
    by_criterion = {name: best_point(cg_cdm, name, tolerance=tolerance) for name in correlations
                    if all(r.get(name) is not None for r in cg_cdm)}
    criterion = best_criterion(correlations, cg_cdm) or "separability"
    return by_criterion[criterion], correlations, criterion, by_criterion


def save_study(out_dir, rows, chosen):
    """ablation.json (every row), selection.json and ablation.png in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "ablation.json"), json.dumps(rows, indent=1) + "\n")
    atomic_write_text(os.path.join(out_dir, "selection.json"), json.dumps(chosen, indent=1, sort_keys=True) + "\n")
    plot_ablation(rows, os.path.join(out_dir, "ablation.png"), chosen.get("label_free_criteria"),
                  chosen.get("label_free", {}).get("criterion"), chosen.get("mask_tuned"))


def epsilon_mse(model, diffusion, images, labels, timestep, *, batch_size=64, seed=0):
    """Mean squared error of the model's noise prediction at `timestep` on `images` (fixed per-image noise)."""
    import torch

    from .chain import per_image_noise

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        x0 = images[start:start + batch_size].to(device)
        noise = per_image_noise(x0.shape[1:], seed, range(start, start + len(x0)), device=device)
        t = torch.full((len(x0),), int(timestep), device=device, dtype=torch.long)
        with torch.no_grad():
            eps = model(diffusion.q_sample(x0, t, noise=noise), t, y=labels[start:start + batch_size].to(device))
        total += float(((eps[:, : x0.shape[1]].float() - noise) ** 2).mean(dim=(1, 2, 3)).sum())
        count += len(x0)
    return total / count


def noise_range_rows(checkpoints, classifier, val_images, val_labels, train_slices, *, noise_level=0.1, taus=(0.0, 0.95),
                     scale=10.0, batch_size=32, seed=0, log=print):
    """Per DDPM checkpoint ({name: path}): its training range, eps-MSE at t = Q on validation images, and
    CG-CDM Dice on `train_slices` for each tau (same classifier, same noise draw)."""
    from ..checkpoint_util import read_args_json
    from .chain import noise_step

    rows = []
    for name, path in checkpoints.items():
        log(f"noise range study: {name} ({path})")
        model, _, config = load_model_and_diffusion(path, device=next(classifier.parameters()).device)
        diffusion = diffusion_from_config({**config, "timestep_respacing": ""})
        q = noise_step(noise_level, diffusion.num_timesteps)
        row = {"run": name, "max_noise_level": float(read_args_json(path).get("max_noise_level", 1.0)),
               "eps_mse_at_q": epsilon_mse(model, diffusion, val_images, val_labels, q, seed=seed)}
        for point in measure((model, diffusion, classifier), train_slices, noise_level=noise_level, record_steps=(10,),
                             taus=taus, scale=scale, batch_size=batch_size, seed=seed, sweep="noise_range",
                             progress=False):
            row[f"dice_tau_{point['tau']:g}"] = point["dice"]
        rows.append(row)
    return rows
