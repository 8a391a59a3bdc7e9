"""args.json round trips, flag/config merging, and the loaders' refusals of mismatched checkpoints."""

import argparse
import json
import os

import pytest
import torch

from guided_diffusion import checkpoint_util as cu
from guided_diffusion import script_util
from guided_diffusion.cli import UserError, add_flags, explicit_flags

TINY = dict(image_size=16, channel_mult="1,2", attention_resolutions="8", num_channels=32, num_res_blocks=1,
            diffusion_steps=100)
TINY_CLASSIFIER = dict(image_size=16, classifier_channel_mult="1,2", classifier_attention_resolutions="8",
                       classifier_width=32, classifier_depth=1, diffusion_steps=100)


def model_parser():
    parser = argparse.ArgumentParser(allow_abbrev=False)
    defaults = {**script_util.model_and_diffusion_defaults(), **script_util.classifier_defaults()}
    add_flags(parser, defaults, help=script_util.FLAG_HELP, aliases=script_util.FLAG_ALIASES)
    return parser


def parse(argv):
    parser = model_parser()
    return parser.parse_args(argv), explicit_flags(parser, argv)


def save_model(directory, state_from=None, **overrides):
    """A checkpoint whose args.json says TINY + overrides; weights built from `state_from` overrides if given."""
    config = {**script_util.model_and_diffusion_defaults(), **TINY, **overrides}
    weights_config = {**config, **(state_from or {})}
    torch.manual_seed(0)
    model, _ = script_util.create_model_and_diffusion(**weights_config)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "model000010.pt")
    torch.save(model.state_dict(), path)
    cu.write_args_json(directory, config)
    return path, model


def test_explicit_flags_sees_typed_options_aliases_and_equals_form():
    argv = ["--num_channels", "64", "--img_size=32", "--class_cond", "False", "--num_heads", "-1"]
    assert explicit_flags(model_parser(), argv) == {"num_channels", "image_size", "class_cond", "num_heads"}


def test_explicit_flags_counts_typed_defaults_and_bare_switches():
    parser = add_flags(argparse.ArgumentParser(allow_abbrev=False), {"steps": 10, "guided": False, "name": ""},
                       help={"steps": "R"}, switches=("guided",))
    assert explicit_flags(parser, ["--steps", "10", "--guided"]) == {"steps", "guided"}
    assert explicit_flags(parser, ["--name="]) == {"name"}
    assert explicit_flags(parser, []) == set()
    args = parser.parse_args(["--guided"])
    assert args.guided is True and args.steps == 10 and args.name == ""
    assert parser.parse_args(["--guided", "no"]).guided is False


def test_merge_prefers_saved_values_over_untyped_defaults():
    args, explicit = parse([])  # argparse default num_channels=128, saved 32
    merged = cu.merge_config({"num_channels": 32, "timestep_respacing": ""}, args, explicit,
                             ["num_channels", "timestep_respacing", "num_res_blocks"], "args.json")
    assert merged == {"num_channels": 32, "timestep_respacing": "", "num_res_blocks": args.num_res_blocks}


def test_merge_accepts_agreeing_flags_and_overrides_sampling_only_ones():
    args, explicit = parse(["--num_channels", "32", "--timestep_respacing", "ddim10", "--use_fp16", "True"])
    saved = {"num_channels": 32, "timestep_respacing": "", "use_fp16": False}
    merged = cu.merge_config(saved, args, explicit, list(saved), "args.json")
    assert merged == {"num_channels": 32, "timestep_respacing": "ddim10", "use_fp16": True}


@pytest.mark.parametrize("argv,key,saved_value", [
    (["--num_channels", "64"], "num_channels", 32),
    (["--diffusion_steps", "1000"], "diffusion_steps", 4000),
    (["--learn_sigma", "True"], "learn_sigma", False),
    (["--img_size", "128"], "image_size", 64),
])
def test_merge_refuses_disagreeing_shape_and_diffusion_flags(argv, key, saved_value):
    args, explicit = parse(argv)
    with pytest.raises(UserError) as err:
        cu.merge_config({key: saved_value}, args, explicit, [key], "run/args.json")
    message = str(err.value)
    assert f"--{key} {getattr(args, key)}" in message and f"{key}={saved_value}" in message
    assert "run/args.json" in message and "\n" not in message


def test_write_and_read_args_json_round_trip(tmp_path):
    config = {"b": 2, "a": "x", "c": True}
    cu.write_args_json(str(tmp_path), config)
    assert json.loads((tmp_path / "args.json").read_text()) == config
    assert cu.read_args_json(str(tmp_path / "model000001.pt")) == config
    assert cu.read_args_json(str(tmp_path)) == config
    assert os.listdir(tmp_path) == ["args.json"]


def test_unreadable_or_missing_args_json_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no args.json beside it"):
        cu.read_args_json(str(tmp_path / "model.pt"), "--model_path")
    (tmp_path / "args.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable configuration"):
        cu.read_args_json(str(tmp_path / "model.pt"))


def test_load_model_rebuilds_saved_architecture_and_weights(tmp_path):
    path, original = save_model(str(tmp_path))
    args, explicit = parse(["--timestep_respacing", "10", "--num_res_blocks", "1"])
    model, diffusion, config = cu.load_model_and_diffusion(path, args, explicit, device="cpu")
    assert config["num_channels"] == 32 and config["image_size"] == 16 and config["timestep_respacing"] == "10"
    assert diffusion.num_timesteps == 10 and diffusion.original_num_steps == 100
    assert not model.training
    for (name, a), (_, b) in zip(original.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_model_accepts_a_state_dict_wrapped_under_model(tmp_path):
    path, original = save_model(str(tmp_path))
    torch.save({"model": original.state_dict(), "step": 10}, path)
    model, _, _ = cu.load_model_and_diffusion(path, device="cpu")
    assert torch.equal(next(model.parameters()), next(original.parameters()))


def test_load_model_refuses_a_typed_flag_that_disagrees(tmp_path):
    path, _ = save_model(str(tmp_path))
    args, explicit = parse(["--num_channels", "64"])
    with pytest.raises(UserError, match=r"--num_channels 64 disagrees with .*args\.json \(num_channels=32\)"):
        cu.load_model_and_diffusion(path, args, explicit, device="cpu")


def test_load_model_refuses_weights_of_another_shape(tmp_path):
    path, _ = save_model(str(tmp_path), state_from={"num_channels": 64})  # args.json says 32
    expected = r"--model_path .*parameter \S+ has shape \(256, 64\) but the configuration builds \(128, 32\)"
    with pytest.raises(UserError, match=expected):
        cu.load_model_and_diffusion(path, device="cpu")


def test_load_model_refuses_missing_and_unexpected_parameters(tmp_path):
    path, original = save_model(str(tmp_path))
    state = original.state_dict()
    dropped = next(iter(state))
    torch.save({k: v for k, v in state.items() if k != dropped}, path)
    with pytest.raises(UserError, match=f"missing.*{dropped}"):
        cu.load_model_and_diffusion(path, device="cpu")
    torch.save({**state, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="unexpected.*extra.weight"):
        cu.load_model_and_diffusion(path, device="cpu")


def test_load_model_refuses_corrupt_missing_and_non_state_dict_files(tmp_path):
    path, _ = save_model(str(tmp_path))
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        cu.load_model_and_diffusion(path, device="cpu")
    torch.save([1, 2, 3], path)
    with pytest.raises(UserError, match="expected a state dict of tensors, found list"):
        cu.load_model_and_diffusion(path, device="cpu")
    with pytest.raises(UserError, match="no such checkpoint file"):
        cu.load_model_and_diffusion(str(tmp_path / "absent.pt"), device="cpu")
    with pytest.raises(UserError, match=r"--model_path \(empty\)"):
        cu.load_model_and_diffusion("", device="cpu")


def save_classifier(directory, **overrides):
    config = {**script_util.classifier_and_diffusion_defaults(), **TINY_CLASSIFIER, **overrides}
    torch.manual_seed(0)
    classifier = script_util.create_classifier(**{k: config[k] for k in script_util.classifier_defaults()})
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "model000005.pt")
    torch.save(classifier.state_dict(), path)
    cu.write_args_json(directory, config)
    return path, classifier


def test_load_classifier_round_trip_and_typed_flag_mismatch(tmp_path):
    path, original = save_classifier(str(tmp_path))
    classifier, config = cu.load_classifier(path, device="cpu")
    assert config["classifier_width"] == 32 and config["diffusion_steps"] == 100
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0, 50])
    with torch.no_grad():
        assert torch.allclose(classifier(x, t), original.eval()(x, t))
    args, explicit = parse(["--classifier_width", "64"])
    with pytest.raises(UserError, match="--classifier_width 64 disagrees"):
        cu.load_classifier(path, args, explicit, device="cpu")


def test_check_same_diffusion_names_the_differing_key():
    ddpm = {"diffusion_steps": 100, "noise_schedule": "linear", "rescale_timesteps": False}
    cu.check_same_diffusion(dict(ddpm), ddpm, "cls.pt", "ddpm.pt")
    cu.check_same_diffusion({"diffusion_steps": None}, ddpm, "cls.pt", "ddpm.pt")  # unknown: nothing to compare
    for key, other in [("diffusion_steps", 50), ("noise_schedule", "cosine"), ("rescale_timesteps", True)]:
        with pytest.raises(UserError) as err:
            cu.check_same_diffusion({**ddpm, key: other}, ddpm, "cls.pt", "ddpm.pt")
        assert f"{key}={other}" in str(err.value) and f"{key}={ddpm[key]}" in str(err.value)


def test_latest_checkpoint_and_step_numbers(tmp_path):
    for name in ["model000010.pt", "model000200.pt", "model000030.pt", "ema_0.9999_000900.pt", "opt000900.pt",
                 "modelbest.pt"]:
        (tmp_path / name).write_bytes(b"")
    assert os.path.basename(cu.latest_checkpoint(str(tmp_path))) == "model000200.pt"
    assert os.path.basename(cu.latest_checkpoint(str(tmp_path), prefix="opt")) == "opt000900.pt"
    assert cu.latest_checkpoint(str(tmp_path / "absent")) is None
    assert cu.parse_step("runs/x/ema_0.9999_000900.pt") == 900 and cu.parse_step("model.pt") == 0
