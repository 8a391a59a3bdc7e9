"""Timestep respacing and schedule samplers."""

import math

import numpy as np
import pytest
import torch as th
import torch.distributed as dist
import torch.multiprocessing as mp

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.cli import UserError
from guided_diffusion.errors import ParameterError
from guided_diffusion.resample import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)
from guided_diffusion.respace import SpacedDiffusion, space_timesteps


def linear_alpha_bar(T):
    scale = 1000.0 / T
    return np.cumprod(1.0 - np.linspace(scale * 1e-4, scale * 0.02, T))


def spaced(spec, T=1000, rescale_timesteps=False, var_type=gd.ModelVarType.FIXED_LARGE):
    return SpacedDiffusion(space_timesteps(T, spec), betas=gd.get_named_beta_schedule("linear", T),
                           model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=var_type,
                           loss_type=gd.LossType.MSE, rescale_timesteps=rescale_timesteps)


def tiny_diffusion(T):
    return gd.GaussianDiffusion(betas=np.linspace(0.01, 0.2, T), model_mean_type=gd.ModelMeanType.EPSILON,
                                model_var_type=gd.ModelVarType.FIXED_LARGE, loss_type=gd.LossType.MSE)


# ----- space_timesteps -------------------------------------------------------------------------------------


def test_space_timesteps_ddim_form_is_an_exact_stride():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(10, "ddim4") == {0, 3, 6, 9}  # stride 3
    for bad in ["ddim7", "ddimx"]:
        with pytest.raises(ParameterError, match="^section_counts: ") as info:
            space_timesteps(10, bad)
        assert not isinstance(info.value, UserError)  # the library names its parameter, not a flag


def test_space_timesteps_single_count_spans_first_to_last():
    steps = sorted(space_timesteps(1000, "250"))
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    gaps = np.diff(steps)
    assert set(gaps) <= {math.floor(999 / 249), math.ceil(999 / 249)}
    assert space_timesteps(1000, "1000") == set(range(1000))
    assert space_timesteps(1000, [1000]) == set(range(1000))
    assert space_timesteps(1000, "") == set(range(1000))
    assert space_timesteps(100, "1") == {0}


def test_space_timesteps_sections():
    # Hand-worked: two sections of 7, stride 2 within each.
    assert space_timesteps(14, "4,4") == {0, 2, 4, 6, 7, 9, 11, 13}
    # 10 steps in 3 sections: sizes 4, 3, 3 (the first absorbs the remainder); stride 1.5 rounds 0, 2, 3.
    assert space_timesteps(10, "3,3,3") == {0, 2, 3, 4, 5, 6, 7, 8, 9}
    assert space_timesteps(10, [3, 3, 3]) == space_timesteps(10, "3,3,3")
    steps = space_timesteps(300, "10,15,20")
    for (lo, hi), count in zip([(0, 99), (100, 199), (200, 299)], [10, 15, 20]):
        section = sorted(s for s in steps if lo <= s <= hi)
        assert len(section) == count and section[0] == lo and section[-1] == hi
        stride = (hi - lo) / (count - 1)
        assert set(np.diff(section)) <= {math.floor(stride), math.ceil(stride)}
    with pytest.raises(ValueError, match="^section_counts: section 1 has 10 steps"):
        space_timesteps(20, "5,20")  # a section of 10 cannot keep 20
    with pytest.raises(ValueError, match="^section_counts: 'ten'"):
        space_timesteps(20, "ten")


# ----- SpacedDiffusion -----------------------------------------------------------------------------------------


def test_spaced_diffusion_keeps_alpha_bar_and_q_sample():
    T = 1000
    abar = linear_alpha_bar(T)
    d = spaced("ddim25", T)
    kept = list(range(0, 1000, 40))
    assert d.original_num_steps == T and d.num_timesteps == 25
    assert isinstance(d.timestep_map, th.Tensor) and d.timestep_map.tolist() == kept
    np.testing.assert_allclose(d.alphas_cumprod, abar[kept], rtol=1e-12)
    # Respaced betas: 1 − ᾱ_{k_i}/ᾱ_{k_{i−1}}.
    np.testing.assert_allclose(d.betas, 1 - abar[kept] / np.r_[1.0, abar[kept][:-1]], rtol=1e-10)
    full = spaced("", T)
    np.testing.assert_allclose(full.betas, gd.get_named_beta_schedule("linear", T), rtol=1e-9, atol=1e-15)
    x0 = th.randn(3, 1, 4, 4, dtype=th.float64)
    noise = th.randn_like(x0)
    i = th.tensor([0, 10, 24])
    th.testing.assert_close(d.q_sample(x0, i, noise=noise), full.q_sample(x0, d.timestep_map[i], noise=noise))


def test_spaced_ddim_step_goes_between_kept_steps():
    T = 1000
    abar = linear_alpha_bar(T)
    d = spaced("10,15,20", T)
    kept = d.timestep_map.numpy()
    x = th.randn(1, 1, 4, 4, dtype=th.float64) * 0.5
    eps = th.randn_like(x) * 0.5
    i = 17
    out = d.ddim_sample(lambda x, t, **kw: eps, x, th.tensor([i]), clip_denoised=False)
    ab, abp = abar[kept[i]], abar[kept[i - 1]]
    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    th.testing.assert_close(out["sample"], math.sqrt(abp) * x0 + math.sqrt(1 - abp) * eps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rescale", [False, True])
def test_wrapper_maps_timesteps_and_forwards_kwargs(rescale):
    T = 4000
    d = spaced("ddim100", T, rescale_timesteps=rescale, var_type=gd.ModelVarType.LEARNED_RANGE)
    seen = []

    def model(x, t, y=None):
        seen.append((t, y))
        return th.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    soft_y = th.tensor([[0.05, 0.95], [0.5, 0.5]])
    x = th.zeros(2, 1, 4, 4)
    i = th.tensor([10, 99])
    expected = th.tensor([400, 3960])
    if rescale:
        expected = expected.float() / 4  # t·1000/T_original
    d.p_mean_variance(model, x, i, model_kwargs={"y": soft_y})
    d.training_losses(model, x, i, model_kwargs={"y": soft_y})
    for t, y in seen:
        assert th.equal(t, expected) and y is soft_y
    # Guidance functions see the same original timesteps, whether in mean or score form.
    cond_seen = []

    def cond_fn(x, t, y=None):
        cond_seen.append((t, y))
        return th.zeros_like(x)

    d.p_sample(model, x, i, cond_fn=cond_fn, model_kwargs={"y": soft_y})
    d.ddim_sample(model, x, i, cond_fn=cond_fn, model_kwargs={"y": soft_y})
    assert len(cond_seen) == 2
    for t, y in cond_seen:
        assert th.equal(t, expected) and y is soft_y
    # Wrapping is idempotent: a wrapped model is not mapped twice.
    wrapped = d.wrap_model(model)
    assert d.wrap_model(wrapped) is wrapped


def test_spaced_diffusion_rejects_out_of_range_steps():
    with pytest.raises(ValueError):
        SpacedDiffusion({0, 100}, betas=gd.get_named_beta_schedule("linear", 100),
                        model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.FIXED_LARGE,
                        loss_type=gd.LossType.MSE)


# ----- schedule samplers -------------------------------------------------------------------------------------


def test_named_samplers():
    d = spaced("100", 1000)
    assert isinstance(create_named_schedule_sampler("uniform", d), UniformSampler)
    assert isinstance(create_named_schedule_sampler("loss-second-moment", d), LossSecondMomentResampler)
    with pytest.raises(ParameterError, match="^name: unknown sampler 'importance'"):
        create_named_schedule_sampler("importance", d)


def test_uniform_sampler_has_unit_weights():
    sampler = UniformSampler(spaced("100", 1000))
    np.random.seed(0)
    t, w = sampler.sample(500, th.device("cpu"))
    assert t.dtype == th.long and t.min() >= 0 and t.max() < 100
    assert th.equal(w, th.ones(500))
    counts = np.bincount(t.numpy(), minlength=100)
    assert counts.max() < 20  # 5 expected per step


def test_loss_second_moment_sampler():
    T = 5
    d = tiny_diffusion(T)
    sampler = LossSecondMomentResampler(d, history_per_term=3, uniform_prob=0.1)
    losses = {0: [1.0, 1.0, 1.0], 1: [2.0, 0.0, 2.0], 2: [3.0, 3.0, 3.0], 3: [0.5, 0.5, 0.5], 4: [1.0, 1.0]}
    for t, values in losses.items():
        sampler.update_with_local_losses(th.tensor([t] * len(values)), th.tensor(values))
    np.testing.assert_array_equal(sampler.weights(), np.ones(T))  # step 4 has only 2 of 3 losses
    # Filling step 4, then pushing one more loss at step 0 drops its oldest entry.
    sampler.update_with_all_losses([4, 0], [4.0, 7.0])
    second_moment = np.sqrt([np.mean(np.square(h)) for h in [[1, 1, 7], [2, 0, 2], [3, 3, 3], [0.5] * 3, [1, 1, 4]]])
    expected = second_moment / second_moment.sum() * 0.9 + 0.1 / T
    np.testing.assert_allclose(sampler.weights(), expected, rtol=1e-12)
    np.random.seed(1)
    t, w = sampler.sample(20000, th.device("cpu"))
    p = expected / expected.sum()
    np.testing.assert_allclose(w.numpy(), 1 / (T * p[t.numpy()]), rtol=1e-6)
    freq = np.bincount(t.numpy(), minlength=T) / 20000
    np.testing.assert_allclose(freq, p, atol=0.015)
    # Importance weighting keeps the loss estimate unbiased: E_p[w·L] = mean over t of L.
    assert np.mean(w.numpy() * second_moment[t.numpy()]) == pytest.approx(second_moment.mean(), rel=0.03)


def _gather_worker(rank, world_size, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        sampler = LossSecondMomentResampler(tiny_diffusion(4), history_per_term=2)
        recorded = []
        sampler.update_with_all_losses = lambda ts, losses: recorded.append((list(ts), list(losses)))
        # Unequal batch sizes: rank 0 has three examples, rank 1 two.
        if rank == 0:
            sampler.update_with_local_losses(th.tensor([0, 1, 2]), th.tensor([0.5, 1.5, 2.5]))
        else:
            sampler.update_with_local_losses(th.tensor([3, 3]), th.tensor([4.0, 5.0]))
        if rank == 0:
            th.save(recorded, result_file)
    finally:
        dist.destroy_process_group()


def test_update_with_local_losses_gathers_unequal_batches(tmp_path):
    result_file = str(tmp_path / "gathered.pt")
    # fork: the children reuse the already imported torch (spawn would re-import it twice).
    mp.start_processes(_gather_worker, args=(2, str(tmp_path / "rendezvous"), result_file), nprocs=2,
                       join=True, start_method="fork")
    [(ts, losses)] = th.load(result_file)
    assert ts == [0, 1, 2, 3, 3]
    assert losses == [0.5, 1.5, 2.5, 4.0, 5.0]
