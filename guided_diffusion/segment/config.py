"""One configuration of a segmentation run: what selection.json stores and every front end applies.

    SegmentationConfig
        point           OperatingPoint   Q, R, tau, s and the noise draws K of the maps
        postprocessing  MaskOptions      how a map becomes a mask (`postprocess`)
        detection       Detection        which slices are segmented (threshold, map check), or None
        scan_decision   ScanDecision     how a whole scan's slices become one mask (`scan_decision`), or None

`SegmentationConfig.from_selection(selection, choice)` reads one choice of selection.json
(`scripts/ablation.py`) strictly: a key that is neither a setting nor one of the study's records
(`CHOICE_RECORDS`) is an error, never skipped. Each value is checked once, in its dataclass.
`values()` gives the flat names that the front ends' flags share (noise_level, ..., keep_largest,
detect_threshold, min_separability), so a new setting is one field here and one flag there.
"""

from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from .chain import check_tau
from .postprocess import MaskOptions
from .scan_decision import ScanDecision

# Keys of a choice that report how the study found it; they are not settings.
CHOICE_RECORDS = ("passes", "training_dice", "training_separability", "criterion", "training_criterion")


@dataclass(frozen=True)
class OperatingPoint:
    """Where the maps come from: noise level Q (a fraction of T, or an integer step), R DDIM steps, the
    soft label tau, guidance scale s (0: CDM) and the mean over K noise draws. Defaults: the paper's."""

    noise_level: float = 0.1
    steps: int = 10
    tau: float = 0.95
    classifier_scale: float = 10.0
    noise_draws: int = 1

    def __post_init__(self):
        for name in ("steps", "noise_draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)}: must be at least 1")
        check_tau(float(self.tau))

    @property
    def passes(self):
        """UNet (and classifier) passes per image: R x K."""
        return self.steps * self.noise_draws

    @classmethod
    def from_dict(cls, values):
        """The point of a choice or an ablation row (other keys ignored; K defaults to 1)."""
        missing = [f.name for f in fields(cls)[:4] if f.name not in values]
        if missing:
            raise ValueError(f"a point needs {', '.join(missing)}")
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def as_dict(self):
        return asdict(self)

    def describe(self):
        draws = f", {self.noise_draws} noise draws" if self.noise_draws > 1 else ""
        return f"Q {self.noise_level:g} T, R {self.steps}{draws}, tau {self.tau:g}, s {self.classifier_scale:g}"


POINT_KEYS = tuple(f.name for f in fields(OperatingPoint))


@dataclass(frozen=True)
class Detection:
    """Which slices are segmented: tumour probability >= `threshold`, and (when `min_separability` > 0) a
    map that is clearly two-class (`detect.SeparabilityGate`)."""

    threshold: float = 0.5
    min_separability: float = 0.0

    def __post_init__(self):
        for name in ("threshold", "min_separability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} {getattr(self, name)}: must lie in [0, 1]")

    @classmethod
    def from_record(cls, record):
        """The detection record of selection.json (its other keys are the training split's scores)."""
        if record.get("threshold") is None:
            raise ValueError("detection: no threshold")
        return cls(threshold=record["threshold"], min_separability=record.get("min_separability") or 0.0)


@dataclass(frozen=True)
class SegmentationConfig:
    """Everything a segmentation run is set to, apart from the models and the data."""

    point: OperatingPoint = field(default_factory=OperatingPoint)
    postprocessing: MaskOptions = field(default_factory=MaskOptions)
    detection: Optional[Detection] = None
    scan_decision: Optional[ScanDecision] = None

    @classmethod
    def from_selection(cls, selection, choice):
        """Choice `choice` of a selection.json dict, with the selection's detection record. ValueError
        naming the key for an unknown choice, an unknown key, or a value out of range."""
        chosen = selection.get(choice)
        if not isinstance(chosen, dict) or not all(k in chosen for k in POINT_KEYS[:4]):
            raise ValueError(f"choice {choice!r}: not in the selection (its choices: {', '.join(choices_of(selection))})")
        known = set(POINT_KEYS) | {"postprocessing", "scan_decision"} | set(CHOICE_RECORDS)
        unknown = sorted(set(chosen) - known)
        if unknown:
            raise ValueError(f"choice {choice!r}: unknown key {unknown[0]!r} (settings: {', '.join(sorted(known))})")
        post = chosen.get("postprocessing") or {}
        unknown = sorted(set(post) - set(MaskOptions().as_dict()))
        if unknown:
            raise ValueError(f"choice {choice!r}: unknown post-processing key {unknown[0]!r} "
                             f"(known: {', '.join(MaskOptions().as_dict())})")
        detection = selection.get("detection")
        try:
            return cls(point=OperatingPoint.from_dict(chosen), postprocessing=MaskOptions(**post),
                       detection=Detection.from_record(detection) if detection else None,
                       scan_decision=ScanDecision.from_dict(chosen["scan_decision"]) if chosen.get("scan_decision")
                       else None)
        except TypeError as err:  # a value of the wrong type, e.g. "steps": "2" in a hand-edited file
            raise ValueError(f"choice {choice!r}: a value of the wrong type ({err})") from None

    def values(self):
        """{flag name: value} of every setting this configuration holds (detection only when it has one;
        the scan decision is not a flag)."""
        values = {**self.point.as_dict(), **self.postprocessing.as_dict()}
        if self.detection is not None:
            values.update(detect_threshold=self.detection.threshold, min_separability=self.detection.min_separability)
        return values

    def as_dict(self):
        return {"point": self.point.as_dict(), "postprocessing": self.postprocessing.as_dict(),
                "detection": asdict(self.detection) if self.detection else None,
                "scan_decision": self.scan_decision.as_dict() if self.scan_decision else None}


def choices_of(selection):
    """Names of a selection's choices: entries that hold a full point (Q, R, tau, s)."""
    return [name for name, value in selection.items()
            if isinstance(value, dict) and all(k in value for k in POINT_KEYS[:4])]


def as_flags(values):
    """["--name", "value", ...] of a {flag name: value} dict (e.g. `SegmentationConfig.values()`)."""
    return [item for name, value in values.items() for item in (f"--{name}", str(value))]
