"""Does this device give the same maps and losses in reduced precision? (scripts/check_gpu.py)

On the device present (CUDA, else MPS, else the CPU) `check_precisions` runs a small CDM and CG-CDM
pass and a few DDPM training steps in each precision (and, with `compile`, compiled), and compares
them with the float32 run on the same weights, images and noise:

- maps: the Pearson correlation of each image's map with its float32 map (the smallest over the
  images), the largest absolute difference relative to the float32 maps' largest value, and the mean
  Dice between the Otsu masks (the paper's rule: per-image min-max, Otsu) of the two;
- training: the relative difference of the mean loss over the steps (same initial weights, batches,
  timesteps and noise). fp16 training needs CUDA (loss scaling) and is skipped elsewhere;
- speed: seconds of each pass (after a warm-up pass) and its speed-up over float32.

A row fails when an agreement falls outside `TOLERANCES`; `check_precisions` returns the rows and
whether all passed.
"""

import copy
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from .. import logger
from ..cli import UserError
from ..guidance import make_classifier_cond_fn
from ..inference import PRECISIONS, autocast_dtype, prepare_for_inference
from ..metrics import dice
from ..segment.postprocess import saliency_to_mask
from ..segment.saliency import cdm_saliency
from . import benchmarks
from ..segment.config import OperatingPoint

# Agreement with float32 a precision must reach: the map correlation and mask Dice at least, the
# relative map difference and the relative loss difference at most.
TOLERANCES = {
    "fp32": dict(correlation=0.9999, max_difference=1e-3, mask_dice=0.999, loss_difference=1e-4),
    "bf16": dict(correlation=0.97, max_difference=0.25, mask_dice=0.85, loss_difference=0.05),
    "fp16": dict(correlation=0.995, max_difference=0.1, mask_dice=0.95, loss_difference=0.02),
}


@dataclass(frozen=True)
class CheckSettings(OperatingPoint):
    """The CG-CDM settings of the maps (tau 0, the demo's), and the training steps and seed of the loss check."""

    tau: float = 0.0
    train_steps: int = 3
    seed: int = 0


def map_agreement(maps, reference):
    """(smallest per-image correlation, max |difference| / max |reference|, mean Dice of the Otsu masks)."""
    maps, reference = np.asarray(maps, np.float64), np.asarray(reference, np.float64)
    correlations = []
    for a, b in zip(maps.reshape(len(maps), -1), reference.reshape(len(reference), -1)):
        correlations.append(1.0 if np.array_equal(a, b) else float(np.corrcoef(a, b)[0, 1]))
    difference = float(np.abs(maps - reference).max() / max(np.abs(reference).max(), 1e-30))
    masks, reference_masks = saliency_to_mask(maps), saliency_to_mask(reference)
    mask_dice = float(np.mean([dice(m, r) for m, r in zip(masks, reference_masks)]))
    return min(correlations), difference, mask_dice


def _maps(model, diffusion, classifier, x0, y1, noise, settings, precision, compile, device):
    """{method: (seconds, maps)} of CDM and CG-CDM at `precision`, each timed after a warm-up pass."""
    setup = prepare_for_inference(model, classifier, precision=precision, compile=compile, device=device)
    cond_fn = make_classifier_cond_fn(setup.classifier, settings.classifier_scale)
    out = {}
    for method, guidance in (("cdm", None), ("cg-cdm", cond_fn)):
        def run():
            return cdm_saliency(setup.model, diffusion, x0, y1, noise_level=settings.noise_level, steps=settings.steps,
                                tau=settings.tau, cond_fn=guidance, noise=noise)

        benchmarks.timed(run, device)
        out[method] = benchmarks.timed(run, device)
    return out


def _training_losses(model, diffusion, x0, labels, settings, precision, device):
    """(seconds per step, losses) of `train_steps` DDPM training steps at `precision` from `model`'s weights."""
    from ..train.loop import TrainLoop

    class RecordingLoop(TrainLoop):
        def compute_loss(self, batch, cond):
            loss = super().compute_loss(batch, cond)
            self.losses.append(float(loss.detach()))
            return loss

    amp = {"fp32": "none"}.get(precision, precision)
    with tempfile.TemporaryDirectory() as tmp:
        logger.configure(tmp, format_strs=[])
        loop = RecordingLoop(model=copy.deepcopy(model).train(), diffusion=diffusion, data=iter(()),
                             batch_size=len(x0), lr=1e-4, save_dir=tmp, amp=amp, ema_rate="", device=device,
                             progress=False, seed=settings.seed)
        loop.losses = []
        np.random.seed(settings.seed)
        torch.manual_seed(settings.seed)
        seconds, _ = benchmarks.timed(lambda: [loop.run_step(x0, {"y": labels})
                                               for _ in range(settings.train_steps)], device)
        logger.close()
    return seconds / settings.train_steps, loop.losses


def check_precisions(model, diffusion, classifier, x0, y1, noise, *, precisions=PRECISIONS, compile=False,
                     settings=CheckSettings(), device=None, log=print):
    """Rows {precision, compiled, what, seconds, speedup, correlation, max_difference, mask_dice,
    loss_difference, passed, note} and whether every row passed (see the module docstring)."""
    device = torch.device(device or x0.device)
    labels = torch.arange(len(x0), device=device) % 2
    variants = [(p, False) for p in precisions] + ([(p, True) for p in precisions] if compile else [])
    reference_maps = _maps(model, diffusion, classifier, x0, y1, noise, settings, "fp32", False, device)
    reference_train = _training_losses(model, diffusion, x0, labels, settings, "fp32", device)
    rows = []
    for precision, compiled in variants:
        name = precision + (" compiled" if compiled else "")
        try:
            autocast_dtype(precision, device)
        except UserError as err:
            rows.append(dict(precision=name, what="all", passed=True, note=f"skipped: {err}"))
            continue
        log(f"checking {name} ...")
        tolerance = TOLERANCES[precision]
        for method, (seconds, maps) in _maps(model, diffusion, classifier, x0, y1, noise, settings, precision,
                                             compiled, device).items():
            correlation, difference, mask_dice = map_agreement(maps, reference_maps[method][1])
            passed = (correlation >= tolerance["correlation"] and difference <= tolerance["max_difference"]
                      and mask_dice >= tolerance["mask_dice"])
            rows.append(dict(precision=name, what=f"{method} maps", seconds=seconds,
                             speedup=reference_maps[method][0] / seconds, correlation=correlation,
                             max_difference=difference, mask_dice=mask_dice, passed=passed))
        if compiled:
            continue  # training is not compiled here
        if precision == "fp16" and device.type != "cuda":
            rows.append(dict(precision=name, what="training", passed=True,
                             note="skipped: fp16 training needs CUDA (loss scaling)"))
            continue
        seconds, losses = _training_losses(model, diffusion, x0, labels, settings, precision, device)
        reference_losses = np.asarray(reference_train[1])
        loss_difference = float(abs(np.mean(losses) - reference_losses.mean()) / abs(reference_losses.mean()))
        rows.append(dict(precision=name, what=f"training ({settings.train_steps} steps)", seconds=seconds,
                         speedup=reference_train[0] / seconds, loss_difference=loss_difference,
                         passed=loss_difference <= tolerance["loss_difference"]))
    return rows, all(row["passed"] for row in rows)


def tolerance_text():
    """The tolerances as one line per precision, for the report."""
    return "\n".join(f"{p}: map correlation >= {t['correlation']}, max difference <= {t['max_difference']} of the "
                     f"largest value, mask Dice >= {t['mask_dice']}, mean loss within {t['loss_difference']:g} (relative)"
                     for p, t in TOLERANCES.items())
