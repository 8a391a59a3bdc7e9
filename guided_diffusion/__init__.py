"""Conditional diffusion models (CDM / CG-CDM) for weakly supervised medical image segmentation."""
