"""Noise-conditioned classifier training: AUROC, noise buckets, timestep feeding, validation, resume."""

import csv
import itertools
import os

import numpy as np
import pytest
import torch

from guided_diffusion import logger
from guided_diffusion.classifier_util import (
    ClassifierTrainLoop,
    auroc,
    binary_auroc,
    classification_metrics,
    evaluate_classifier,
    noise_bucket,
    timestep_model,
)
from guided_diffusion.script_util import create_classifier, create_gaussian_diffusion
from guided_diffusion.train.checkpoints import checkpoint_files
from guided_diffusion.train.stream import ShuffledBatches

TINY_ENCODER = dict(image_size=16, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="8",
                    classifier_channel_mult="1,2", classifier_num_head_channels=32, classifier_pool="attention")


def pairwise_auroc(scores, labels):
    """The definition: fraction of (positive, negative) pairs ordered correctly, ties counting 1/2."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_binary_auroc_matches_the_pairwise_definition(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=40) / 5.0  # many ties
    labels = rng.random(40) < 0.4
    assert binary_auroc(scores, labels) == pytest.approx(pairwise_auroc(scores, labels), abs=1e-12)


def test_auroc_special_cases():
    assert binary_auroc([0.1, 0.2, 0.9], [0, 0, 1]) == 1.0
    assert binary_auroc([0.9, 0.2, 0.1], [0, 0, 1]) == 0.0
    assert np.isnan(binary_auroc([0.1, 0.2], [1, 1]))
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    assert auroc(probs, np.array([0, 1, 2, 0])) == 1.0  # every class separated one-vs-rest


def test_noise_buckets_are_quarters_of_the_chain():
    assert noise_bucket(np.array([0, 999, 1000, 1999, 2000, 3999]), 4000).tolist() == [0, 0, 1, 1, 2, 3]


def test_classification_metrics_overall_and_per_bucket():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    metrics = classification_metrics(probs, labels, timesteps=np.array([0, 10, 90, 95]), num_timesteps=100)
    assert metrics["val_acc"] == 0.75
    assert metrics["val_auroc"] == 1.0  # 0.8, 0.7 > 0.6 > 0.1
    assert metrics["val_acc_q0"] == 1.0 and metrics["val_acc_q3"] == 0.5
    assert metrics["val_loss_q0"] == pytest.approx(-(np.log(0.9) + np.log(0.8)) / 2)
    assert "val_acc_q1" not in metrics and "val_acc_q2" not in metrics  # no images there


def test_classifier_receives_timesteps_as_during_guided_sampling():
    seen = []

    def spy(x, t):
        seen.append(t)
        return torch.zeros(x.shape[0], 2)

    diffusion = create_gaussian_diffusion(steps=4000, rescale_timesteps=True)
    timestep_model(spy, diffusion)(torch.zeros(2, 1, 4, 4), torch.tensor([400, 3999]))
    assert torch.allclose(seen[0].float(), torch.tensor([100.0, 999.75]))
    plain = create_gaussian_diffusion(steps=4000, rescale_timesteps=False)
    timestep_model(spy, plain)(torch.zeros(1, 1, 4, 4), torch.tensor([400]))
    assert seen[1].tolist() == [400]


def brightness_dataset(n, seed):
    """Class 1 images are brighter: learnable in a few steps, impossible if labels were misaligned."""
    g = torch.Generator().manual_seed(seed)
    return [dict(image=(torch.rand(1, 16, 16, generator=g) - 0.5) * 0.4 + (0.5 if i % 2 else -0.5), label=i % 2)
            for i in range(n)]


def classifier_loop(save_dir, max_steps, resume="", init_seed=0, noised=True, **kwargs):
    logger.configure(str(save_dir), format_strs=["csv"])
    torch.manual_seed(init_seed)
    model = create_classifier(**TINY_ENCODER)
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    options = dict(batch_size=8, lr=1e-3, ema_rate="0.99", log_interval=2, save_interval=3, eval_interval=3,
                   max_steps=max_steps, seed=1, progress=False)
    options.update(kwargs)
    return ClassifierTrainLoop(
        model=model, diffusion=diffusion, noised=noised, data=ShuffledBatches(brightness_dataset(32, 0), 8, seed=2),
        val_dataset=brightness_dataset(24, 1), save_dir=str(save_dir), resume_checkpoint=resume, **options)


def test_classifier_learns_and_validates_by_noise_bucket(tmp_path):
    loop = classifier_loop(tmp_path, max_steps=12, noised=False, lr=3e-3)
    loop.run_loop()
    rows = list(csv.DictReader(open(tmp_path / "progress.csv")))
    assert {"train_loss", "train_acc@1", "val_acc", "val_auroc", "val_loss", "val_acc_q0"} <= set(rows[0])
    last = [r for r in rows if r.get("val_acc")][-1]
    assert float(last["val_acc"]) >= 0.9 and float(last["val_auroc"]) >= 0.95
    assert not last.get("val_acc_q3")  # clean training: every validation image at t=0

    again = evaluate_classifier(loop.model, loop.diffusion, brightness_dataset(24, 1), noised=True, seed=1)
    assert again == evaluate_classifier(loop.model, loop.diffusion, brightness_dataset(24, 1), noised=True, seed=1)
    assert {f"val_acc_q{b}" for b in range(4)} <= set(again)


def test_max_noise_level_limits_training_and_validation_timesteps(tmp_path, monkeypatch):
    loop = classifier_loop(tmp_path, max_steps=3, max_noise_level=0.25)
    seen = []
    original = loop.diffusion.q_sample
    monkeypatch.setattr(loop.diffusion, "q_sample", lambda x, t, noise=None: seen.append(t.clone()) or original(x, t, noise))
    loop.run_loop()
    drawn = torch.cat(seen)
    assert loop.max_timestep == 250 and len(drawn) > 24
    assert int(drawn.max()) < 250 and int(drawn.max()) > 60  # uniform over [0, 250), not the whole chain
    with pytest.raises(ValueError, match="max_noise_level"):
        classifier_loop(tmp_path / "bad", max_steps=1, max_noise_level=1.5)


def test_classifier_resume_is_bitwise_identical(tmp_path):
    classifier_loop(tmp_path / "straight", max_steps=4, save_interval=2, eval_interval=2).run_loop()
    classifier_loop(tmp_path / "resumed", max_steps=2, save_interval=2, eval_interval=2).run_loop()
    resumed = classifier_loop(tmp_path / "resumed", max_steps=4, save_interval=2, eval_interval=2, resume="auto",
                              init_seed=5)
    assert resumed.step == 2
    resumed.run_loop()
    a = checkpoint_files(str(tmp_path / "straight"), 4, [0.99])
    b = checkpoint_files(str(tmp_path / "resumed"), 4, [0.99])
    for x, y in [(a["model"], b["model"]), (a["opt"], b["opt"]), (a["ema"][0.99], b["ema"][0.99])]:
        assert same_tensors(torch.load(x, weights_only=False), torch.load(y, weights_only=False))
    assert not same_tensors(torch.load(a["model"]), torch.load(a["ema"][0.99]))


def same_tensors(a, b):
    """Bitwise equality of nested containers of tensors and plain values."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


# ---------------------------------------------------------------------------------------------
# The script, end to end after a DDPM run

CLASSIFIER_FLAGS = ["--classifier_width", "32", "--classifier_depth", "1", "--classifier_attention_resolutions", "8",
                    "--classifier_channel_mult", "1,2", "--classifier_num_head_channels", "32", "--batch_size", "4",
                    "--log_interval", "1", "--eval_interval", "2", "--save_interval", "2", "--workers", "0",
                    "--amp", "none", "--val_max_images", "6"]


def classifier_script(argv):
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        module = importlib.import_module("classifier_tumor_train")
    finally:
        sys.path.pop(0)
    return module.main(argv)


def test_classifier_script_uses_the_ddpm_diffusion_and_logs_validation(tmp_path, capsys):
    import json

    from test_train import SCRIPT_FLAGS, run_cli, train_tumor, write_slices

    data = write_slices(tmp_path / "data")
    ddpm = tmp_path / "ddpm"
    train_tumor(["--src_dir", str(data), "--save_dir", str(ddpm), "--max_steps", "1", "--workers", "0", *SCRIPT_FLAGS,
                 "--rescale_timesteps", "True"])
    run = tmp_path / "classifier"
    classifier_script(["--src_dir", str(data), "--save_dir", str(run), "--diffusion_config", str(ddpm / "args.json"),
                       "--iterations", "2", *CLASSIFIER_FLAGS])
    config = json.loads((run / "args.json").read_text())
    # Taken from the DDPM, not from the classifier's defaults (T=4000, 64 px, no rescaling).
    assert (config["diffusion_steps"], config["image_size"], config["rescale_timesteps"]) == (50, 16, True)
    assert {"model000002.pt", "opt000002.pt", "progress.csv", "loss_curve.png", "log.txt"} <= set(os.listdir(run))
    rows = list(csv.DictReader(open(run / "progress.csv")))
    assert rows[-1]["val_acc"] and rows[-1]["val_auroc"] and "train_acc@1" in rows[-1]
    assert any(rows[-1].get(f"val_acc_q{b}") for b in range(4))

    status, err = run_cli(["--src_dir", str(data), "--save_dir", str(tmp_path / "other"), "--diffusion_config",
                           str(ddpm / "args.json"), "--diffusion_steps", "1000", *CLASSIFIER_FLAGS],
                          capsys, main=classifier_script)
    assert status == 2 and "--diffusion_steps 1000 disagrees" in err and str(ddpm / "args.json") in err
    status, err = run_cli(["--src_dir", str(data), "--save_dir", str(tmp_path / "other"), "--diffusion_config",
                           str(tmp_path / "nothing.json"), *CLASSIFIER_FLAGS], capsys, main=classifier_script)
    assert status == 2 and "--diffusion_config" in err


def test_resnet_classifier_trains_through_the_script(tmp_path):
    from test_train import write_slices

    data = write_slices(tmp_path / "data")
    classifier_script(["--src_dir", str(data), "--save_dir", str(tmp_path / "run"), "--model_type", "resnet50",
                       "--image_size", "16", "--dataset", "demo", "--iterations", "1", *CLASSIFIER_FLAGS])
    state = torch.load(tmp_path / "run" / "model000001.pt")
    assert any(k.startswith("layer4") or ".layer4." in k for k in state)


def test_classifier_configuration_follows_the_ddpm_image_size(tmp_path):
    import json

    from guided_diffusion.cli import explicit_flags
    from guided_diffusion.train_cli import classifier_config, classifier_parser

    ddpm_args = tmp_path / "args.json"
    ddpm_args.write_text(json.dumps({"image_size": 64, "diffusion_steps": 4000, "noise_schedule": "cosine",
                                     "rescale_timesteps": True, "in_channels": 4, "num_classes": 2}))
    parser = classifier_parser("test")
    for argv, expected in [
        (["--diffusion_config", str(ddpm_args)], (64, "32,16,8", 4000, "cosine", 4)),
        ([], (224, "28,14,7", 4000, "linear", 1)),  # --dataset brats: 224 px, attention maps that exist there
        (["--dataset", "synapse", "--diffusion_steps", "1000"], (128, "32,16,8", 1000, "linear", 1)),
    ]:
        config = classifier_config(parser.parse_args(argv), explicit_flags(parser, argv), None)
        keys = ("image_size", "classifier_attention_resolutions", "diffusion_steps", "noise_schedule", "in_channels")
        assert tuple(config[k] for k in keys) == expected, argv
