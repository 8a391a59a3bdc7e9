"""Precision, compilation and CPU memory reuse for the networks of sampling and segmentation.

One entry point, for every command that runs a trained DDPM (and a guiding classifier):

    setup = prepare_for_inference(model, classifier, precision="bf16", compile=False, device=device)
    setup.model         # the UNet as the samplers call it, model(x, t, y=...): the forward pass under
                        # autocast, the output cast back to float32 (the diffusion chain stays float32)
    setup.classifier    # the guiding classifier (compiled with `compile`); guidance differentiates it in
                        # float32 with autocast off whatever `precision` is (`guidance.classifier_log_prob_gradient`)
    with setup.autocast(): ...   # the same autocast for other code (a null context at fp32)

Pass `setup.model` and `setup.classifier` wherever the raw networks went (`sampling.sample_images`,
`segment.create_method`, `guidance.make_classifier_cond_fn`): they keep the networks' attributes
(`num_classes`, `image_size`, ...). A CAM method needs the raw classifier (it hooks its layers).

- `precision`: "fp32" (default: no autocast), "bf16" or "fp16" (torch.autocast on the device's type;
  fp16 on a CUDA GPU or MPS, bf16 where the device supports it, both also on the CPU).
- `compile`: torch.compile of the UNet's and the classifier's forward passes. The first calls compile
  (tens of seconds to minutes; the first batch pays it) and a new input shape compiles again.
- CPU memory (`reuse_cpu_memory`, on by default on the CPU): glibc returns every large freed block to
  the system and page-faults it back at the next allocation; keeping freed memory for reuse
  (`reuse_freed_cpu_memory`) made the demo UNet's forward pass on 64 images 1.7x faster on 2 cores.
  The process then keeps its peak heap (it does not grow past it).

`add_inference_flags` adds `--precision` and `--compile` to a command's parser.
"""

import contextlib
import ctypes
import ctypes.util
import platform
from dataclasses import dataclass

import torch
import torch.nn as nn

from .cli import UserError, add_flags

PRECISIONS = ("fp32", "bf16", "fp16")
INFERENCE_DEFAULTS = dict(precision="fp32", compile=False)
INFERENCE_HELP = {
    "precision": "precision of the DDPM's forward passes: fp32, or bf16 / fp16 autocast (GPUs; the classifier "
                 "gradient of guidance stays float32). scripts/check_gpu.py measures speed and agreement",
    "compile": "torch.compile the networks for inference (the first batch pays the compilation)",
}


def add_inference_flags(parser):
    """Add --precision and --compile (bare `--compile` means True) to `parser`."""
    return add_flags(parser, INFERENCE_DEFAULTS, help=INFERENCE_HELP, choices={"precision": PRECISIONS},
                     switches=("compile",))


def autocast_dtype(precision, device):
    """The autocast dtype of `precision` on `device` (None for fp32); a UserError if the device lacks it."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use fp16")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(dtype, device):
    """torch.autocast to `dtype` on `device`'s type, or a null context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


_heap_reuse = {"applied": False}


def reuse_freed_cpu_memory():
    """Keep freed memory in the process for reuse instead of returning it to the system (Linux, glibc).

    By default glibc serves large blocks (a 64 px batch's activations are tens of MiB) with mmap and
    unmaps them when freed, so every layer's output page-faults fresh memory: on a 2-core CPU that
    cost about as much as the convolutions. M_MMAP_MAX 0 serves them from the heap and a large
    M_TRIM_THRESHOLD keeps the heap's freed top. Process-wide and idempotent; returns whether it
    applies (False off glibc).
    """
    if _heap_reuse["applied"]:
        return True
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (e.g. musl)
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, 2**31 - 1) != 1:  # an int: at most 2 GiB
        return False
    _heap_reuse["applied"] = True
    return True


class NetworkWrapper(nn.Module):
    """A module around `self.net` whose other attributes (num_classes, image_size, ...) are the network's."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            return getattr(self._modules["net"], name)


class InferenceModel(NetworkWrapper):
    """A network called under autocast with float32 outputs; other attributes are the network's."""

    def __init__(self, net, dtype, device_type):
        super().__init__()
        self.net = net
        self.autocast_dtype = dtype
        self.device_type = device_type

    def forward(self, *args, **kwargs):
        if self.autocast_dtype is None:
            return self.net(*args, **kwargs)
        with torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype):
            out = self.net(*args, **kwargs)
        return out.float()


@dataclass
class InferenceSetup:
    """What `prepare_for_inference` returns (see the module docstring)."""

    model: object
    classifier: object
    precision: str
    dtype: object  # the autocast dtype, None for fp32
    device: torch.device
    compiled: bool
    reuses_cpu_memory: bool

    def autocast(self):
        return autocast(self.dtype, self.device)


def prepare_for_inference(model, classifier=None, *, precision="fp32", compile=False, device=None,
                          reuse_cpu_memory=True):
    """The UNet (and classifier) ready to run on `device` at `precision`, optionally compiled.

    Both networks are put in eval mode on `device` (default: the model's). Returns an InferenceSetup;
    a UserError for a precision the device lacks.
    """
    if device is None:
        device = next(model.parameters()).device if model is not None else next(classifier.parameters()).device
    device = torch.device(device)
    dtype = autocast_dtype(precision, device)
    reuses = bool(reuse_cpu_memory and device.type == "cpu" and reuse_freed_cpu_memory())

    def ready(net):
        if net is None:
            return None
        net = net.to(device).eval()
        return torch.compile(net) if compile else net

    wrapped = None
    if model is not None:
        wrapped = InferenceModel(ready(model), dtype, device.type)
    return InferenceSetup(model=wrapped, classifier=ready(classifier), precision=precision, dtype=dtype,
                          device=device, compiled=bool(compile), reuses_cpu_memory=reuses)
