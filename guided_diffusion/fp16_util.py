"""Mixed-precision helpers for the `--use_fp16` model-conversion path.

The model's convolutions are cast to float16 while an fp32 master copy of every
parameter is what the optimizer updates. The loss is multiplied by a dynamic
scale 2**lg_loss_scale so that small fp16 gradients do not underflow; a step
with non-finite gradients is skipped and the scale halved. With
`use_fp16=False` the trainer is a plain fp32 trainer (master params are the
model params themselves).
"""

import torch
import torch.nn as nn

INITIAL_LOG_LOSS_SCALE = 20.0

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_module_to_f16(module):
    """Cast a convolution's parameters to float16 (other layers are left alone)."""
    if isinstance(module, _CONV_TYPES):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_f32(module):
    """Undo `convert_module_to_f16`."""
    if isinstance(module, _CONV_TYPES):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()


def _norm(tensors):
    """Euclidean norm of a list of tensors seen as one vector, in float32."""
    total = sum((t.detach().float() ** 2).sum() for t in tensors)
    return float(torch.as_tensor(total).sqrt())


class MixedPrecisionTrainer:
    """Owns the master parameters, the loss scale and the step/skip decision.

    Usage: build the optimizer over `trainer.master_params`, then per step call
    `zero_grad()`, `backward(loss)` (possibly several times for microbatches)
    and `optimize(opt)`. After `optimize`, `trainer.log_values` holds
    `grad_norm`, `param_norm` (both before the step) and, in fp16 mode,
    `lg_loss_scale`.
    """

    def __init__(self, *, model, use_fp16=False, fp16_scale_growth=1e-3,
                 initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE):
        self.model = model
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.param_names = [name for name, _ in model.named_parameters()]
        self.model_params = list(model.parameters())
        self.master_params = self.model_params
        self.lg_loss_scale = initial_lg_loss_scale
        self.log_values = {}
        if use_fp16:
            # The master copy is taken before the cast so it keeps full precision.
            self.master_params = [nn.Parameter(p.detach().float().clone()) for p in self.model_params]
            if hasattr(model, "convert_to_fp16"):
                model.convert_to_fp16()
            else:
                model.apply(convert_module_to_f16)

    def zero_grad(self):
        """Clear the gradients of the model (and of the master copy in fp16 mode)."""
        for p in self.model_params:
            p.grad = None
        if self.use_fp16:
            for p in self.master_params:
                p.grad = None

    def backward(self, loss):
        """Back-propagate `loss`, scaled by the current loss scale in fp16 mode."""
        if self.use_fp16:
            loss = loss * (2.0 ** self.lg_loss_scale)
        loss.backward()

    def optimize(self, opt):
        """Take an optimizer step; return False if it was skipped for non-finite gradients."""
        if self.use_fp16:
            return self._optimize_fp16(opt)
        grads = [p.grad for p in self.master_params if p.grad is not None]
        self.log_values = {"grad_norm": _norm(grads), "param_norm": _norm(self.master_params)}
        opt.step()
        return True

    def _optimize_fp16(self, opt):
        scale = 2.0 ** self.lg_loss_scale
        for master, param in zip(self.master_params, self.model_params):
            master.grad = None if param.grad is None else param.grad.detach().float() / scale
        grads = [p.grad for p in self.master_params if p.grad is not None]
        grad_norm = _norm(grads)
        if not torch.isfinite(torch.tensor(grad_norm)):
            self.lg_loss_scale -= 1
            self.log_values = {"lg_loss_scale": self.lg_loss_scale}
            self.zero_grad()
            return False
        self.log_values = {
            "grad_norm": grad_norm,
            "param_norm": _norm(self.master_params),
            "lg_loss_scale": self.lg_loss_scale,
        }
        opt.step()
        with torch.no_grad():
            for master, param in zip(self.master_params, self.model_params):
                param.copy_(master.to(param.dtype))
        self.lg_loss_scale += self.fp16_scale_growth
        return True

    def master_params_to_state_dict(self, master_params):
        """The model's state dict with its parameters replaced by `master_params` (fp32)."""
        state_dict = self.model.state_dict()
        for name, value in zip(self.param_names, master_params):
            state_dict[name] = value.detach().float()
        return state_dict

    def state_dict_to_master_params(self, state_dict):
        """The list of parameter tensors (fp32) of `state_dict`, in master-param order."""
        return [state_dict[name].detach().float().clone() for name in self.param_names]
