import argparse

import pytest
import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.script_util import (
    FLAG_ALIASES,
    FLAG_HELP,
    attention_downsample_factors,
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    parse_channel_mult,
)
from guided_diffusion.cli import add_flags, str2bool


def tiny_config(**overrides):
    config = model_and_diffusion_defaults()
    config.update(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16", diffusion_steps=100)
    config.update(overrides)
    return config


@pytest.mark.parametrize(
    "size,expected",
    [(32, (1, 2, 2, 2)), (64, (1, 2, 3, 4)), (128, (1, 1, 2, 3, 4)), (224, (1, 1, 2, 2, 4, 4)), (256, (1, 1, 2, 2, 4, 4))],
)
def test_default_channel_mult_by_size(size, expected):
    assert parse_channel_mult(size, "") == expected


def test_explicit_channel_mult_and_errors_name_the_flag():
    assert parse_channel_mult(96, "1,2,2") == (1, 2, 2)
    with pytest.raises(ValueError, match="--channel_mult"):
        parse_channel_mult(96, "")  # no default for 96
    with pytest.raises(ValueError, match="--image_size 100"):
        parse_channel_mult(100, "1,2,2,4")  # 100 cannot be halved three times
    with pytest.raises(ValueError, match="--channel_mult"):
        parse_channel_mult(64, "1,x")


def test_attention_resolutions_map_to_downsample_factors():
    assert attention_downsample_factors(64, "16,8", 4) == (4, 8)
    assert attention_downsample_factors(224, "28,14", 6) == (8, 16)
    with pytest.raises(ValueError, match=r"--attention_resolutions 16,8: resolution 16 never occurs at --image_size 224"):
        attention_downsample_factors(224, "16,8", 6)
    with pytest.raises(ValueError, match="--classifier_attention_resolutions"):
        create_classifier(224, classifier_attention_resolutions="32,16,8")


def test_the_factories_name_the_flag_where_the_library_names_its_parameter():
    from guided_diffusion.cli import UserError, flag_names
    from guided_diffusion.errors import ParameterError
    from guided_diffusion.script_util import create_gaussian_diffusion

    for kwargs, expected in [(dict(steps=100, noise_schedule="quadratic"), "--noise_schedule: unknown schedule"),
                             (dict(steps=20), "--diffusion_steps: the linear schedule needs more than 20 steps"),
                             (dict(steps=100, timestep_respacing="ddim99"), "--timestep_respacing: no integer stride")]:
        with pytest.raises(UserError, match="^" + expected):
            create_gaussian_diffusion(**kwargs)
    with pytest.raises(ParameterError, match="^other: "):  # a parameter no flag fed stays the library's error
        with flag_names({"schedule_name": "--noise_schedule"}):
            raise ParameterError("other", "not a flag")


def test_factory_builds_learned_sigma_model_and_spaced_diffusion():
    model, diffusion = create_model_and_diffusion(**tiny_config(learn_sigma=True, in_channels=2, timestep_respacing="10"))
    out = model(torch.randn(3, 2, 32, 32), torch.tensor([0, 5, 9]), y=torch.tensor([0, 1, 1]))
    assert out.shape == (3, 4, 32, 32)
    assert diffusion.num_timesteps == 10 and diffusion.original_num_steps == 100
    assert diffusion.model_var_type == gd.ModelVarType.LEARNED_RANGE
    assert diffusion.loss_type == gd.LossType.RESCALED_MSE


@pytest.mark.parametrize("model_type,expected", [("encoder", "EncoderUNetModel"), ("resnet50", "ResNetClassifier")])
def test_create_classifier_types(model_type, expected):
    cfg = classifier_defaults()
    cfg.update(image_size=32, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="16",
               classifier_num_head_channels=32, model_type=model_type)
    classifier = create_classifier(**cfg)
    assert type(classifier).__name__ == expected
    assert classifier(torch.randn(2, 1, 32, 32), torch.tensor([0, 3])).shape == (2, 2)
    with pytest.raises(ValueError, match="--model_type"):
        create_classifier(**{**cfg, "model_type": "vgg"})


def test_argparser_roundtrip_with_img_size_alias_and_booleans():
    parser = argparse.ArgumentParser()
    add_flags(parser, tiny_config(), help=FLAG_HELP, aliases=FLAG_ALIASES)
    args = parser.parse_args(["--img_size", "64", "--learn_sigma", "True", "--class_cond", "no"])
    config = {k: getattr(args, k) for k in tiny_config()}
    assert config["image_size"] == 64 and config["learn_sigma"] is True and config["class_cond"] is False
    assert str2bool("Y") and not str2bool("0")
    with pytest.raises(SystemExit):
        parser.parse_args(["--learn_sigma", "maybe"])


def test_tiny_unet_overfits_four_images_with_hybrid_loss():
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**tiny_config(learn_sigma=True, diffusion_steps=1000, channel_mult="1,2"))
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    y = torch.tensor([0, 1, 0, 1])
    t = torch.tensor([100, 300, 500, 700])
    noise = torch.randn_like(x0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_now():
        terms = diffusion.training_losses(model, x0, t, model_kwargs={"y": y}, noise=noise)
        assert set(terms) >= {"loss", "mse", "vb"} and torch.isfinite(terms["loss"]).all()
        return terms["loss"].mean()

    first = loss_now().item()
    for _ in range(40):
        opt.zero_grad()
        loss = loss_now()
        loss.backward()
        opt.step()
    assert loss_now().item() < first / 20
