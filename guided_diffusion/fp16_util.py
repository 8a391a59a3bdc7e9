"""Float16 weights for inference (`use_fp16` of the configuration, when sampling): convolutions are
cast to float16, normalisations and embeddings stay float32. Training keeps float32 weights and uses autocast
(`train.precision`)."""

import torch.nn as nn

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
