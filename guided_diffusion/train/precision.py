"""Mixed precision for the training loops, on one path: torch.amp.

The weights, their gradients and the optimizer stay in float32; the forward pass runs under
autocast in bfloat16 or float16. With float16 the loss is multiplied by a dynamic scale
(torch.amp's GradScaler) so that small gradients do not underflow: a step whose gradients are not
finite is skipped and the scale halved; it doubles again after `1 / fp16_scale_growth` good steps.
`--use_fp16 True` (the flag of the original code) means float16 autocast.
"""

import contextlib
import math

import torch

from ..cli import UserError

AMP_CHOICES = ("auto", "none", "fp16", "bf16")


def resolve_amp(amp, use_fp16, device):
    """The autocast dtype for `--amp` (and `--use_fp16`) on `device` (None: no autocast)."""
    if amp not in AMP_CHOICES:
        raise UserError(f"--amp {amp!r}: choose one of {', '.join(AMP_CHOICES)}")
    if use_fp16:
        if amp not in ("auto", "none", "fp16"):
            raise UserError(f"--amp {amp} and --use_fp16 True ask for two kinds of mixed precision; choose one")
        if device.type != "cuda":
            raise UserError("--use_fp16 True needs a CUDA GPU (loss scaling); use --amp bf16 or none on this device")
        return torch.float16
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA GPU (loss scaling); use --amp bf16 or none on this device")
    return {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def _norm(tensors):
    """Euclidean norm of a list of tensors seen as one vector, in float32."""
    total = sum((t.detach().float() ** 2).sum() for t in tensors)
    return float(torch.as_tensor(total).sqrt())


class Precision:
    """Autocast, loss scaling and the optimizer step over `params`.

    Per step: `zero_grad()`, `backward(loss)` (once per microbatch, the forward under `autocast()`),
    then `step(opt)`, which returns False when a float16 step was skipped for non-finite gradients.
    After `step`, `log_values` holds `grad_norm` and `param_norm` (both before the step) and, with
    float16, `lg_loss_scale` (log2 of the loss scale).

    :param dtype: None (float32), torch.bfloat16 or torch.float16 (loss scaling).
    """

    def __init__(self, params, dtype=None, device_type="cpu", *, initial_lg_loss_scale=20.0, fp16_scale_growth=1e-3):
        self.params = list(params)
        self.dtype = dtype
        self.device_type = device_type
        self.log_values = {}
        self.scaler = None
        if dtype == torch.float16:
            grows = fp16_scale_growth > 0
            self.scaler = torch.amp.GradScaler(
                device_type, init_scale=2.0 ** initial_lg_loss_scale, growth_factor=2.0 if grows else 1.0,
                growth_interval=max(1, round(1 / fp16_scale_growth)) if grows else 1,
            )

    @property
    def lg_loss_scale(self):
        return math.log2(self.scaler.get_scale()) if self.scaler is not None else 0.0

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def backward(self, loss):
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, opt):
        """Take an optimizer step; return False if it was skipped for non-finite gradients."""
        if self.scaler is None:
            self.log_values = {"grad_norm": _norm([p.grad for p in self.params if p.grad is not None]),
                               "param_norm": _norm(self.params)}
            opt.step()
            return True
        self.scaler.unscale_(opt)
        grad_norm = _norm([p.grad for p in self.params if p.grad is not None])
        self.log_values = {"grad_norm": grad_norm, "param_norm": _norm(self.params)} if math.isfinite(grad_norm) else {}
        scale = self.scaler.get_scale()
        self.scaler.step(opt)  # skipped when unscaling found an infinite or NaN gradient
        self.scaler.update()
        self.log_values["lg_loss_scale"] = self.lg_loss_scale
        took = self.scaler.get_scale() >= scale
        if not took:
            self.zero_grad()
        return took

    def state_dict(self):
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state):
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
