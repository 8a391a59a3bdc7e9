"""Weakly supervised segmentation: CDM / CG-CDM, baselines, map-to-mask, pipeline and report.

    chain        the diffusion sub-chains, labels and per-image noise the methods use
    saliency     CDM / CG-CDM, CG-Diff and the reconstruction baseline as functions
    cam          the CAM family (grad-cam library) on a classifier
    methods      every method behind one protocol, in one registry (METHODS, create_method)
    postprocess  map -> mask: min-max, smoothing, Otsu (over the foreground), largest component
    pipeline     slice selection and batched, timed, distributed map computation
    report       metrics.csv, summary.json, masks, npz, grid, volumes, all or nothing
    command      the image_p_seg.py command line
"""

from .chain import noise_step, per_image_noise
from .methods import METHODS, SaliencySettings, create_method
from .postprocess import MaskOptions, saliency_to_mask
from .saliency import anomaly_saliency, cdm_saliency, cdm_saliency_multi, cgdiff_saliency

__all__ = ["METHODS", "MaskOptions", "SaliencySettings", "anomaly_saliency", "cdm_saliency", "cdm_saliency_multi",
           "cgdiff_saliency", "create_method", "noise_step", "per_image_noise", "saliency_to_mask"]
