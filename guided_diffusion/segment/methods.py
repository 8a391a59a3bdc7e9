"""Every segmentation method behind one small protocol, in one registry.

A method is a class with what it needs (`uses_ddpm`, `classifier`: "guidance" for a
noise-conditioned classifier that steers the diffusion, "cam" for the classifier whose
activations are the map, or None) and one call, `maps(x0, y1, noise)`, which returns
`{variant: float32 maps (B, H, W)}`. CDM methods have one variant per tau (all taus share branch A
and one UNet call per step); the others have a single variant named after the method.

    method = create_method("cg-cdm", SaliencySettings(taus=(0.95, 0.0)), model=unet,
                           diffusion=diffusion, classifier=classifier)
    by_variant = method.maps(x0, y1, noise)      # {"tau_0.95": ..., "tau_0": ...}
"""

from dataclasses import dataclass

import torch

from ..guidance import make_classifier_cond_fn
from .cam import CAM_METHODS, cam_saliency
from .chain import check_tau, cdm_timesteps, full_chain_timesteps, noise_step
from .saliency import anomaly_saliency, cdm_saliency_multi, cgdiff_saliency


@dataclass(frozen=True)
class SaliencySettings:
    """Settings of the diffusion methods, with the paper's values as defaults."""

    noise_level: float = 0.1  # Q as a fraction of T (or an integer step)
    steps: int = 10  # R, DDIM steps from Q (CDM)
    stride: int = 1  # timesteps per step
    taus: tuple = (0.95,)
    classifier_scale: float = 10.0  # s; 0 disables guidance
    healthy_label: int = 0
    clip_denoised: bool = True
    abs_map: bool = False
    seed: int = 0  # of CG-Diff's ancestral noise draws (the other methods take per-image noise)

    def __post_init__(self):
        if not self.taus:
            raise ValueError("taus is empty")
        for tau in self.taus:
            check_tau(float(tau))
        for name in ("steps", "stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)}: must be at least 1")


def tau_variant(tau):
    return f"tau_{float(tau):g}"


class Method:
    """The protocol: class attributes say what the method needs; `maps` computes the maps."""

    name = ""
    description = ""
    uses_ddpm = True
    classifier = None  # "guidance", "cam" or None
    uses_tau = False

    def __init__(self, settings=None, *, model=None, diffusion=None, classifier=None):
        self.settings = settings or SaliencySettings()
        self.model, self.diffusion, self.classifier_net = model, diffusion, classifier
        if self.uses_ddpm and (model is None or diffusion is None):
            raise ValueError(f"{self.name} needs the DDPM (model and diffusion)")
        if self.classifier == "cam" and classifier is None:
            raise ValueError(f"{self.name} needs the classifier")
        self.cond_fn = None
        if self.classifier == "guidance" and classifier is not None and self.settings.classifier_scale != 0:
            self.cond_fn = make_classifier_cond_fn(classifier, self.settings.classifier_scale)

    @classmethod
    def needs_classifier(cls, classifier_scale):
        """Whether a classifier must be loaded for this method at guidance scale `classifier_scale`."""
        return cls.classifier == "cam" or (cls.classifier == "guidance" and classifier_scale != 0)

    def variants(self):
        return [self.name]

    def model_calls_per_batch(self):
        """UNet (or classifier) passes per batch, for progress reporting and benchmarks."""
        return 1

    def maps(self, x0, y1, noise):
        raise NotImplementedError

    def _diffusion_settings(self):
        s = self.settings
        return dict(noise_level=s.noise_level, stride=s.stride, healthy_label=s.healthy_label, cond_fn=self.cond_fn,
                    clip_denoised=s.clip_denoised)


class CDM(Method):
    name = "cdm"
    description = "conditional diffusion model: branches conditioned on y1 and on a soft label, no classifier"
    uses_tau = True

    def variants(self):
        return [tau_variant(tau) for tau in self.settings.taus]

    def model_calls_per_batch(self):
        return self.settings.steps

    def maps(self, x0, y1, noise):
        taus = [float(t) for t in self.settings.taus]
        by_tau = cdm_saliency_multi(self.model, self.diffusion, x0, y1, taus=taus, absolute=self.settings.abs_map,
                                    steps=self.settings.steps, noise=noise, **self._diffusion_settings())
        return {tau_variant(tau): by_tau[tau] for tau in taus}


class CGCDM(CDM):
    name = "cg-cdm"
    description = "CDM with classifier guidance on both branches (the paper's CG-CDM)"
    classifier = "guidance"


class CGDiff(Method):
    name = "cg-diff"
    description = "the original ancestral variant: sampling from Q with y1 and with y0, difference of the results"
    classifier = "guidance"

    def __init__(self, settings=None, **resources):
        super().__init__(settings, **resources)
        self.generator = torch.Generator().manual_seed(self.settings.seed)

    def model_calls_per_batch(self):
        q = noise_step(self.settings.noise_level, self.diffusion.num_timesteps)
        return len(full_chain_timesteps(q, self.settings.stride))

    def maps(self, x0, y1, noise):
        return {self.name: cgdiff_saliency(self.model, self.diffusion, x0, y1, noise=noise, absolute=self.settings.abs_map,
                                           generator=self.generator, **self._diffusion_settings())}


class Anomaly(Method):
    name = "anomaly"
    description = "reconstruction baseline: DDIM encode, guided decode toward the healthy label, |x - x_hat|"
    classifier = "guidance"

    def model_calls_per_batch(self):
        q = noise_step(self.settings.noise_level, self.diffusion.num_timesteps)
        return 2 * (len(full_chain_timesteps(q, self.settings.stride)) - 1)

    def maps(self, x0, y1, noise):
        return {self.name: anomaly_saliency(self.model, self.diffusion, x0, y1, **self._diffusion_settings())}


class CAM(Method):
    """A CAM-family map of the (plain, t = 0) classifier for the image's label."""

    uses_ddpm = False
    classifier = "cam"

    def maps(self, x0, y1, noise):
        return {self.name: cam_saliency(self.classifier_net, x0, y1, self.name)}


def _cam_class(cam_name):
    return type(f"CAM_{cam_name}", (CAM,), {"name": cam_name, "description": f"{cam_name} on the classifier (t = 0)"})


METHODS = {m.name: m for m in (CGCDM, CDM, CGDiff, Anomaly, *(_cam_class(c) for c in CAM_METHODS))}


def create_method(name, settings=None, **resources):
    """The method `name` of METHODS built with `settings` and its models (model, diffusion, classifier)."""
    if name not in METHODS:
        raise ValueError(f"method {name!r}: unknown; choose one of {', '.join(METHODS)}")
    return METHODS[name](settings, **resources)


def check_steps_fit(settings, num_timesteps):
    """Raise ValueError unless Q, R and the stride fit a chain of `num_timesteps` (CDM methods)."""
    cdm_timesteps(noise_step(settings.noise_level, num_timesteps), settings.steps, settings.stride)
