"""Sampling library and the two sampling scripts, on tiny freshly initialised checkpoints."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from guided_diffusion import sample_files, sampling, script_util
from guided_diffusion.checkpoint_util import write_args_json
from guided_diffusion.cli import run_main
from guided_diffusion.guidance import make_classifier_cond_fn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_SCRIPT = os.path.join(REPO, "scripts", "image_tumor_sample.py")
GUIDED_SCRIPT = os.path.join(REPO, "scripts", "classifier_tumor_sample.py")

TINY_MODEL = dict(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16", diffusion_steps=100)
TINY_CLASSIFIER = dict(image_size=32, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="16")


def tiny_model_config(**overrides):
    config = script_util.model_and_diffusion_defaults()
    config.update(TINY_MODEL, **overrides)
    return config


# In-process tests use an even smaller network (16 pixels, two levels).
IN_PROCESS_MODEL = dict(image_size=16, channel_mult="1,2", attention_resolutions="8")


def tiny_model_and_diffusion(respacing="10", **overrides):
    torch.manual_seed(0)
    model, diffusion = script_util.create_model_and_diffusion(
        **tiny_model_config(timestep_respacing=respacing, **IN_PROCESS_MODEL, **overrides)
    )
    return model.eval(), diffusion


def write_model_checkpoint(directory, **overrides):
    config = tiny_model_config(**overrides)
    torch.manual_seed(0)
    model, _ = script_util.create_model_and_diffusion(**config)
    os.makedirs(directory, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(directory, "model000000.pt"))
    write_args_json(directory, config)
    return os.path.join(directory, "model000000.pt")


def write_classifier_checkpoint(directory, **overrides):
    config = script_util.classifier_and_diffusion_defaults()
    config.update(TINY_CLASSIFIER, diffusion_steps=100)
    config.update(overrides)
    torch.manual_seed(1)
    classifier = script_util.create_classifier(**{k: config[k] for k in script_util.classifier_defaults()})
    os.makedirs(directory, exist_ok=True)
    torch.save(classifier.state_dict(), os.path.join(directory, "model000000.pt"))
    write_args_json(directory, config)
    return os.path.join(directory, "model000000.pt")


def run_script(script, *args, launcher=()):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [*launcher, sys.executable, script, *map(str, args)], capture_output=True, text=True, env=env, timeout=240
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "model": write_model_checkpoint(str(root / "ddpm")),
        "classifier": write_classifier_checkpoint(str(root / "classifier")),
        "classifier_other_steps": write_classifier_checkpoint(str(root / "classifier50"), diffusion_steps=50),
        "root": root,
    }


@pytest.fixture(scope="module")
def first_run(checkpoints):
    """One ancestral run with default --save_dir, shared by several tests."""
    result = run_script(SAMPLE_SCRIPT, "--model_path", checkpoints["model"], "--num_samples", 5, "--batch_size", 3,
                        "--timestep_respacing", 10, "--seed", 7)
    assert result.returncode == 0, result.stderr
    return os.path.join(os.path.dirname(checkpoints["model"]), "samples")


# ---------------------------------------------------------------------------------------------
# Library helpers


def test_images_to_uint8_maps_minus_one_to_zero_and_one_to_255():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0, 1.0 / 127.5 - 1.0]).view(1, 6, 1, 1)
    out = sampling.images_to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 1, 6)  # NCHW -> NHWC
    assert out.ravel().tolist() == [0, 0, 128, 255, 255, 1]


@pytest.mark.parametrize("n,k", [(10, 2), (7, 2), (9, 3)])
def test_balanced_labels_counts_and_reproducibility(n, k):
    labels = sampling.balanced_labels(n, k, seed=3)
    counts = np.bincount(labels, minlength=k)
    assert counts.max() - counts.min() <= 1 and counts.sum() == n
    assert np.array_equal(labels, sampling.balanced_labels(n, k, seed=3))
    assert not all(np.array_equal(labels, sampling.balanced_labels(n, k, seed=s)) for s in range(4, 9))


def test_rank_shares_partition_the_samples():
    for n, world in [(5, 2), (2, 4), (12, 3)]:
        shares = [sampling.rank_share(n, r, world) for r in range(world)]
        assert shares[0][0] == 0 and shares[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
        sizes = [b - a for a, b in shares]
        assert max(sizes) - min(sizes) <= 1
    assert sampling.rank_seed(0, 0) != sampling.rank_seed(0, 1)


class CountingModel(torch.nn.Module):
    """Records every call (batch size, timesteps, labels) of the wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = []

    def forward(self, x, t, **kwargs):
        y = kwargs.get("y")
        self.calls.append((x.shape[0], t.tolist(), None if y is None else y.tolist()))
        return self.model(x, t, **kwargs)


def test_ddim_with_ten_respaced_steps_calls_the_model_ten_times_per_batch():
    model, diffusion = tiny_model_and_diffusion(respacing="10")
    counting = CountingModel(model)
    images, labels = sampling.sample_images(
        counting, diffusion, num_samples=5, batch_size=3, image_shape=(1, 16, 16), num_classes=2,
        use_ddim=True, seed=0, device="cpu",
    )
    assert [c[0] for c in counting.calls] == [3] * 10 + [2] * 10
    # The network sees the original timesteps, from the last kept step down to 0.
    kept = diffusion.timestep_map.tolist()
    assert [c[1][0] for c in counting.calls[:10]] == kept[::-1]
    # Each batch is conditioned on its slice of the returned labels.
    assert counting.calls[0][2] == labels[:3].tolist() and counting.calls[10][2] == labels[3:].tolist()
    assert images.shape == (5, 16, 16, 1) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=2).tolist() in ([3, 2], [2, 3])


def test_fixed_class_label_same_seed_same_images_and_rng_restored():
    model, diffusion = tiny_model_and_diffusion(respacing="10")
    kwargs = dict(num_samples=3, batch_size=2, image_shape=(1, 16, 16), class_label=1, num_classes=2,
                  use_ddim=False, seed=5, device="cpu")
    torch.manual_seed(123)
    first, labels = sampling.sample_images(model, diffusion, **kwargs)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))  # the caller's random stream is untouched
    again, _ = sampling.sample_images(model, diffusion, **kwargs)
    other, _ = sampling.sample_images(model, diffusion, **{**kwargs, "seed": 6})
    assert labels.tolist() == [1, 1, 1]
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


class LinearClassifier(torch.nn.Module):
    """Two-class logits (+s, -s) with s = <w, x> / sqrt(pixels) for a fixed random pattern w; ignores t."""

    def __init__(self, shape, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(shape, generator=generator))

    def forward(self, x, t):
        s = (x.float() * self.w).flatten(1).sum(1) / self.w[0].numel() ** 0.5
        return torch.stack([s, -s], dim=1)


def mean_target_log_prob(classifier, images, labels):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    log_probs = F.log_softmax(classifier(x, torch.zeros(len(x), dtype=torch.long)), dim=1)
    return log_probs[torch.arange(len(x)), torch.from_numpy(labels)].mean().item()


@pytest.mark.parametrize("use_ddim,class_cond", [(False, True), (True, False)])
def test_guidance_raises_the_classifier_log_probability_of_the_target(use_ddim, class_cond):
    model, diffusion = tiny_model_and_diffusion(respacing="10", class_cond=class_cond)
    classifier = LinearClassifier((1, 1, 16, 16))
    scores = []
    for scale in (0.0, 4.0, 40.0):
        images, labels = sampling.sample_images(
            model, diffusion, num_samples=6, batch_size=6, image_shape=(1, 16, 16), num_classes=2,
            class_cond=class_cond, use_ddim=use_ddim, cond_fn=make_classifier_cond_fn(classifier, scale),
            seed=0, device="cpu",
        )
        assert sorted(np.bincount(labels).tolist()) == [3, 3]  # both directions of the pattern are tested
        scores.append(mean_target_log_prob(classifier, images, labels))
    assert scores[0] < scores[1] < scores[2]
    assert scores[2] > np.log(0.9)  # a strong scale makes the classifier confident of the target


def test_sample_grid_and_npz_are_written(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 16, 16, 1), dtype=np.uint8)
    labels = np.array([0, 1, 1])
    npz = sample_files.save_samples_npz(images, labels, str(tmp_path))
    png = sample_files.save_sample_grid(images, labels, str(tmp_path / "grid.png"))
    assert os.path.basename(npz) == "samples_3x16x16x1.npz"
    with np.load(npz) as data:
        assert np.array_equal(data["arr_0"], images) and np.array_equal(data["arr_1"], labels)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "samples_3x16x16x1.npz"]  # no temporary leftovers


# ---------------------------------------------------------------------------------------------
# Scripts


def test_script_writes_npz_and_grid_next_to_checkpoint(first_run):
    assert sorted(os.listdir(first_run)) == ["log.txt", "samples_5x32x32x1.npz", "samples_5x32x32x1.png"]
    with np.load(os.path.join(first_run, "samples_5x32x32x1.npz")) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (5, 32, 32, 1) and images.dtype == np.uint8
    assert images.min() >= 0 and images.max() <= 255 and images.std() > 0
    assert set(labels.tolist()) <= {0, 1} and sorted(np.bincount(labels, minlength=2).tolist()) == [2, 3]


def test_same_seed_gives_identical_samples(checkpoints, first_run, tmp_path):
    # In-process this time: the global random state differs from the fresh subprocess of `first_run`.
    torch.manual_seed(999)
    sampling.sample_main(["--model_path", checkpoints["model"], "--num_samples", "5", "--batch_size", "3",
                          "--timestep_respacing", "10", "--seed", "7", "--save_dir", str(tmp_path)])
    with np.load(os.path.join(first_run, "samples_5x32x32x1.npz")) as a, \
            np.load(tmp_path / "samples_5x32x32x1.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_guided_script_with_class_label(checkpoints, tmp_path):
    result = run_script(GUIDED_SCRIPT, "--model_path", checkpoints["model"], "--classifier_path",
                        checkpoints["classifier"], "--num_samples", 2, "--batch_size", 2, "--class_label", 1,
                        "--use_ddim", "True", "--timestep_respacing", "ddim10", "--classifier_scale", 2,
                        "--save_dir", tmp_path, "--img_size", 32)
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "samples_2x32x32x1.npz") as data:
        assert data["arr_0"].shape == (2, 32, 32, 1) and data["arr_1"].tolist() == [1, 1]
    assert (tmp_path / "samples_2x32x32x1.png").is_file()


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_flag_disagreeing_with_args_json_is_a_clear_error(checkpoints, tmp_path):
    result = run_script(SAMPLE_SCRIPT, "--model_path", checkpoints["model"], "--num_channels", 64,
                        "--save_dir", tmp_path)
    assert_one_line_error(result, "--num_channels 64", "num_channels=32")
    assert not os.listdir(tmp_path)


def test_classifier_with_other_diffusion_steps_is_a_clear_error(checkpoints, tmp_path, capsys):
    argv = ["--model_path", checkpoints["model"], "--classifier_path", checkpoints["classifier_other_steps"],
            "--save_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        run_main(sampling.sample_main, argv, guided=True)  # what the guided script's __main__ does
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "diffusion_steps=50" in lines[0] and "diffusion_steps=100" in lines[0]
    assert not os.listdir(tmp_path)


@pytest.mark.skipif(shutil.which("mpiexec", path=os.path.dirname(sys.executable)) is None
                    and shutil.which("mpiexec") is None, reason="no mpiexec")
def test_mpiexec_two_processes_share_the_samples(checkpoints, first_run, tmp_path):
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    result = run_script(SAMPLE_SCRIPT, "--model_path", checkpoints["model"], "--num_samples", 5, "--batch_size", 3,
                        "--timestep_respacing", 10, "--seed", 7, "--save_dir", tmp_path,
                        launcher=(mpiexec, "-n", "2"))
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "samples_5x32x32x1.npz") as two, \
            np.load(os.path.join(first_run, "samples_5x32x32x1.npz")) as one:
        # Labels are drawn for the whole run, so they do not depend on the number of processes.
        assert np.array_equal(two["arr_1"], one["arr_1"])
        # Rank 0 draws samples 0-2 in one batch of 3, as the single process did: same seed, same images.
        assert np.array_equal(two["arr_0"][:3], one["arr_0"][:3])
        # Rank 1 has its own seed.
        assert not np.array_equal(two["arr_0"][3:], one["arr_0"][3:])
    assert (tmp_path / "log-rank001.txt").is_file()


def test_bf16_sampling_follows_the_fp32_samples_and_a_bad_precision_is_one_line(checkpoints, tmp_path):
    # Random weights everywhere (a fresh UNet's zero output layer would look the same in any precision).
    model_path = write_model_checkpoint(str(tmp_path / "ddpm"))
    state = torch.load(model_path)
    generator = torch.Generator().manual_seed(0)
    torch.save({k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                for k, v in state.items()}, model_path)
    common = ["--model_path", model_path, "--classifier_path", checkpoints["classifier"], "--num_samples", "3",
              "--batch_size", "3", "--timestep_respacing", "10", "--seed", "3", "--classifier_scale", "2"]
    for precision in ("fp32", "bf16"):
        sampling.sample_main(common + ["--precision", precision, "--save_dir", str(tmp_path / precision)], guided=True)
    with np.load(tmp_path / "fp32" / "samples_3x32x32x1.npz") as a, np.load(tmp_path / "bf16" / "samples_3x32x32x1.npz") as b:
        difference = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
        assert np.array_equal(a["arr_1"], b["arr_1"]) and a["arr_0"].std() > 10
    assert 0 < difference.mean() < 4  # bfloat16 rounding moves some grey levels, the images stay the same
    with open(tmp_path / "bf16" / "log.txt") as f:
        assert '"precision": "bf16"' in f.read()
    result = run_script(GUIDED_SCRIPT, *common, "--precision", "fp8", "--save_dir", tmp_path / "fp8")
    assert_one_line_error(result, "--precision", "fp8")
