"""Gaussian diffusion math against closed forms computed independently here in float64 numpy."""

import math

import numpy as np
import pytest
import torch as th

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.cli import UserError
from guided_diffusion.errors import ParameterError
from guided_diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from guided_diffusion.respace import SpacedDiffusion, space_timesteps

DATA_STD = 0.5  # analytic data distribution x0 ~ N(0, DATA_STD² I)


def linear_alpha_bar(T):
    scale = 1000.0 / T
    betas = np.linspace(scale * 1e-4, scale * 0.02, T)
    return np.cumprod(1.0 - betas)


def make_diffusion(T=50, var_type=gd.ModelVarType.FIXED_LARGE, mean_type=gd.ModelMeanType.EPSILON,
                   loss_type=gd.LossType.MSE, rescale_timesteps=False):
    return gd.GaussianDiffusion(
        betas=gd.get_named_beta_schedule("linear", T), model_mean_type=mean_type,
        model_var_type=var_type, loss_type=loss_type, rescale_timesteps=rescale_timesteps,
    )


def optimal_eps_model(alpha_bar_by_timestep):
    """The exact noise predictor for x0 ~ N(0, s² I): eps* = √(1−ᾱ)·x / (ᾱ s² + 1 − ᾱ).

    Indexed by the timestep value the model receives (an original, unscaled index).
    """
    table = th.as_tensor(alpha_bar_by_timestep, dtype=th.float64)

    def model(x, t, **kwargs):
        ab = table[t.long()].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return th.sqrt(1 - ab) * x / (ab * DATA_STD**2 + 1 - ab)

    return model


def bcast(values, ndim=4):
    return th.as_tensor(np.asarray(values), dtype=th.float64).view(-1, *([1] * (ndim - 1)))


# ----- schedules ------------------------------------------------------------------------------------


def test_linear_schedule_endpoints_and_reference_alpha_bars():
    b1000 = gd.get_named_beta_schedule("linear", 1000)
    b4000 = gd.get_named_beta_schedule("linear", 4000)
    assert b1000.dtype == np.float64 and b1000.shape == (1000,)
    np.testing.assert_allclose(b1000, np.linspace(1e-4, 0.02, 1000), rtol=0, atol=1e-15)
    # T=4000 spans the T=1000 range scaled by 1000/4000.
    np.testing.assert_allclose([b4000[0], b4000[-1]], [1e-4 / 4, 0.02 / 4], rtol=1e-12)
    np.testing.assert_allclose(np.diff(b4000), (0.02 - 1e-4) / 4 / 3999, rtol=1e-9)
    assert np.cumprod(1 - b4000)[400] == pytest.approx(0.896, abs=5e-4)
    assert np.cumprod(1 - b1000)[400] == pytest.approx(0.194, abs=5e-4)
    assert np.cumprod(1 - b1000)[500] == pytest.approx(0.078, abs=5e-4)


def test_cosine_schedule_matches_independent_formula_and_reference():
    for T, ref400 in [(1000, 0.646), (4000, 0.972)]:
        betas = gd.get_named_beta_schedule("cosine", T)
        u = np.arange(T + 1) / T
        f = np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
        expected = np.minimum(1 - f[1:] / f[:-1], 0.999)
        np.testing.assert_allclose(betas, expected, rtol=1e-12, atol=1e-15)
        assert betas[-1] == 0.999  # the clip is active at the very end
        abar = np.cumprod(1 - betas)
        assert abar[400] == pytest.approx(ref400, abs=5e-4)
        # Away from the clip, ᾱ_t is the ratio f(t+1)/f(0).
        np.testing.assert_allclose(abar[: T // 2], f[1 : T // 2 + 1] / f[0], rtol=1e-10)
    abar = np.cumprod(1 - gd.get_named_beta_schedule("cosine", 1000))
    assert abar[500] == pytest.approx(0.492, abs=5e-4)


def test_unknown_schedule_names_the_parameter():
    with pytest.raises(ParameterError, match="^schedule_name: unknown schedule 'quadratic'") as info:
        gd.get_named_beta_schedule("quadratic", 100)
    assert isinstance(info.value, ValueError) and not isinstance(info.value, UserError)
    assert info.value.named("--noise_schedule").startswith("--noise_schedule: unknown schedule")


def test_loss_type_is_vb():
    assert gd.LossType.KL.is_vb() and gd.LossType.RESCALED_KL.is_vb()
    assert not gd.LossType.MSE.is_vb() and not gd.LossType.RESCALED_MSE.is_vb()


# ----- buffers, forward process, posterior -------------------------------------------------------------


def test_buffers_match_bayes_posterior():
    T = 50
    d = make_diffusion(T)
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    abar = np.cumprod(1 - betas)
    for name in ["alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"]:
        assert getattr(d, name).dtype == np.float64, name
    np.testing.assert_allclose(d.alphas_cumprod, abar, rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod_prev, np.r_[1.0, abar[:-1]], rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod_next, np.r_[abar[1:], 0.0], rtol=1e-12)
    # Gaussian product: precisions add, q(x_{t-1}|x_0) ⋅ q(x_t|x_{t-1}).
    prec = 1 / (1 - abar[:-1]) + (1 - betas[1:]) / betas[1:]
    var = 1 / prec
    np.testing.assert_allclose(d.posterior_variance[1:], var, rtol=1e-10)
    assert d.posterior_variance[0] == 0
    np.testing.assert_allclose(d.posterior_log_variance_clipped, np.log(np.r_[var[0], var]), rtol=1e-10)
    np.testing.assert_allclose(d.posterior_mean_coef1[1:], var * np.sqrt(abar[:-1]) / (1 - abar[:-1]), rtol=1e-10)
    np.testing.assert_allclose(d.posterior_mean_coef2[1:], var * np.sqrt(1 - betas[1:]) / betas[1:], rtol=1e-10)
    # At t=0 the posterior is x_0 itself.
    assert d.posterior_mean_coef1[0] == pytest.approx(1.0) and d.posterior_mean_coef2[0] == 0


def test_q_sample_and_q_mean_variance_with_fixed_noise():
    T = 100
    d = make_diffusion(T)
    abar = linear_alpha_bar(T)
    g = th.Generator().manual_seed(0)
    x0 = th.randn(3, 2, 4, 4, generator=g, dtype=th.float64)
    noise = th.randn(3, 2, 4, 4, generator=g, dtype=th.float64)
    t = th.tensor([0, 37, 99])
    got = d.q_sample(x0, t, noise=noise)
    expected = bcast(np.sqrt(abar[[0, 37, 99]])) * x0 + bcast(np.sqrt(1 - abar[[0, 37, 99]])) * noise
    th.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    mean, var, log_var = d.q_mean_variance(x0, t)
    th.testing.assert_close(mean, bcast(np.sqrt(abar[[0, 37, 99]])) * x0, rtol=1e-6, atol=1e-7)
    th.testing.assert_close(var, (1 - bcast(abar[[0, 37, 99]])).expand_as(x0).float(), rtol=1e-5, atol=1e-7)
    th.testing.assert_close(log_var, th.log(var), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        d.q_sample(x0, t, noise=noise[:, :1])


def test_extract_into_tensor_gathers_per_example():
    arr = np.arange(10, dtype=np.float64) * 0.5
    out = gd._extract_into_tensor(arr, th.tensor([3, 7]), (2, 3, 5))
    assert out.shape == (2, 3, 5) and out.dtype == th.float32
    assert (out[0] == 1.5).all() and (out[1] == 3.5).all()


def test_q_posterior_mean_variance_vs_gaussian_product():
    T = 30
    d = make_diffusion(T)
    abar = linear_alpha_bar(T)
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    g = th.Generator().manual_seed(1)
    x0 = th.randn(3, 1, 3, 3, generator=g, dtype=th.float64)
    xt = th.randn(3, 1, 3, 3, generator=g, dtype=th.float64)
    ts = [1, 12, 29]
    mean, var, _ = d.q_posterior_mean_variance(x0, xt, th.tensor(ts))
    for i, t in enumerate(ts):
        # Product of N(x; √ᾱ_{t-1} x0, 1-ᾱ_{t-1}) and N(x_t; √α_t x, β_t) in x.
        prec = 1 / (1 - abar[t - 1]) + (1 - betas[t]) / betas[t]
        m = (np.sqrt(abar[t - 1]) * x0[i].numpy() / (1 - abar[t - 1])
             + np.sqrt(1 - betas[t]) * xt[i].numpy() / betas[t]) / prec
        np.testing.assert_allclose(mean[i].numpy(), m, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var[i].numpy(), 1 / prec, rtol=1e-5)


# ----- p_mean_variance -------------------------------------------------------------------------------------


def constant_model(output):
    return lambda x, t, **kwargs: output


def test_p_mean_variance_fixed_variances_and_eps_mean():
    T = 40
    abar = linear_alpha_bar(T)
    betas = 1 - abar / np.r_[1.0, abar[:-1]]
    post = betas * (1 - np.r_[1.0, abar[:-1]]) / (1 - abar)
    g = th.Generator().manual_seed(2)
    x = th.randn(2, 1, 4, 4, generator=g, dtype=th.float64) * 0.3
    eps = th.randn(2, 1, 4, 4, generator=g, dtype=th.float64) * 0.3
    t = th.tensor([0, 25])
    large = make_diffusion(T, gd.ModelVarType.FIXED_LARGE).p_mean_variance(
        constant_model(eps), x, t, clip_denoised=False)
    small = make_diffusion(T, gd.ModelVarType.FIXED_SMALL).p_mean_variance(
        constant_model(eps), x, t, clip_denoised=False)
    np.testing.assert_allclose(large["variance"][:, 0, 0, 0].numpy(), [post[1], betas[25]], rtol=1e-5)
    np.testing.assert_allclose(small["variance"][:, 0, 0, 0].numpy(), [0.0, post[25]], atol=1e-9, rtol=1e-5)
    np.testing.assert_allclose(small["log_variance"][:, 0, 0, 0].numpy(), np.log([post[1], post[25]]), rtol=1e-5)
    x0_hat = (x - bcast(np.sqrt(1 - abar[[0, 25]])) * eps) / bcast(np.sqrt(abar[[0, 25]]))
    th.testing.assert_close(large["pred_xstart"], x0_hat, rtol=1e-5, atol=1e-5)
    # Mean at t=25 from the Gaussian-product posterior with x̂0.
    prec = 1 / (1 - abar[24]) + (1 - betas[25]) / betas[25]
    m = (np.sqrt(abar[24]) * x0_hat[1] / (1 - abar[24]) + np.sqrt(1 - betas[25]) * x[1] / betas[25]) / prec
    th.testing.assert_close(large["mean"][1], m, rtol=1e-5, atol=1e-5)
    th.testing.assert_close(large["mean"][0], x0_hat[0], rtol=1e-5, atol=1e-5)  # t=0: the mean is x̂0


def test_p_mean_variance_learned_range_interpolates_log_variance():
    T = 40
    abar = linear_alpha_bar(T)
    betas = 1 - abar / np.r_[1.0, abar[:-1]]
    post = betas * (1 - np.r_[1.0, abar[:-1]]) / (1 - abar)
    log_post_clipped = np.log(np.r_[post[1], post[1:]])
    d = make_diffusion(T, gd.ModelVarType.LEARNED_RANGE)
    x = th.zeros(3, 2, 2, 2, dtype=th.float64)
    v = th.tensor([-1.0, 0.0, 0.6], dtype=th.float64).view(3, 1, 1, 1).expand(3, 2, 2, 2)
    out = d.p_mean_variance(constant_model(th.cat([th.zeros_like(x), v], dim=1)), x, th.tensor([0, 10, 30]))
    frac = (np.array([-1.0, 0.0, 0.6]) + 1) / 2
    ts = [0, 10, 30]
    expected = frac * np.log(betas[ts]) + (1 - frac) * log_post_clipped[ts]
    np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0].numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(out["variance"][:, 1, 1, 1].numpy(), np.exp(expected), rtol=1e-5)
    with pytest.raises(ValueError, match="learned-variance"):
        d.p_mean_variance(constant_model(x), x, th.tensor([0, 10, 30]))
    # LEARNED: the variance channels are the log-variance itself.
    learned = make_diffusion(T, gd.ModelVarType.LEARNED).p_mean_variance(
        constant_model(th.cat([th.zeros_like(x), v], dim=1)), x, th.tensor([0, 10, 30]))
    th.testing.assert_close(learned["log_variance"], v)


def test_p_mean_variance_start_x_previous_x_clip_and_denoised_fn():
    T = 40
    x = th.full((1, 1, 2, 2), 0.5, dtype=th.float64)
    t = th.tensor([20])
    start = make_diffusion(T, mean_type=gd.ModelMeanType.START_X)
    out = start.p_mean_variance(constant_model(th.full_like(x, 3.0)), x, t, clip_denoised=True)
    assert (out["pred_xstart"] == 1.0).all()  # clamped to [-1, 1]
    out = start.p_mean_variance(constant_model(th.full_like(x, 3.0)), x, t, clip_denoised=True,
                                denoised_fn=lambda x0: x0 / 10)
    assert th.allclose(out["pred_xstart"], th.full_like(x, 0.3))  # denoised_fn runs before the clamp
    prev = make_diffusion(T, mean_type=gd.ModelMeanType.PREVIOUS_X)
    target_x0 = th.full_like(x, 0.2)
    mean, _, _ = prev.q_posterior_mean_variance(target_x0, x, t)
    out = prev.p_mean_variance(constant_model(mean), x, t, clip_denoised=False)
    assert th.equal(out["mean"], mean)
    th.testing.assert_close(out["pred_xstart"], target_x0, rtol=1e-5, atol=1e-5)


def test_rescale_timesteps_feeds_scaled_times_to_the_model():
    seen = []

    def model(x, t, **kwargs):
        seen.append(t)
        return th.zeros_like(x)

    d = make_diffusion(4000, rescale_timesteps=True)
    d.p_mean_variance(model, th.zeros(2, 1, 2, 2), th.tensor([400, 3999]))
    th.testing.assert_close(seen[-1], th.tensor([100.0, 999.75]))
    make_diffusion(4000).p_mean_variance(model, th.zeros(2, 1, 2, 2), th.tensor([400, 3999]))
    assert th.equal(seen[-1], th.tensor([400, 3999]))


# ----- single steps: DDPM, DDIM, guidance -------------------------------------------------------------------


def test_p_sample_adds_scaled_noise_except_at_t0():
    T = 30
    d = make_diffusion(T)
    x = th.randn(2, 1, 4, 4, dtype=th.float64)
    eps = th.randn_like(x)
    noise = th.randn_like(x)
    t = th.tensor([0, 15])
    out = d.p_mean_variance(constant_model(eps), x, t, clip_denoised=False)
    sample = d.p_sample(constant_model(eps), x, t, clip_denoised=False, noise=noise)["sample"]
    th.testing.assert_close(sample[0], out["mean"][0])
    th.testing.assert_close(sample[1], out["mean"][1] + th.exp(0.5 * out["log_variance"][1]) * noise[1])


def ddim_closed_form(x, eps, ab, ab_prev, eta, noise):
    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
    return math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sigma**2) * eps + sigma * noise


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_closed_form(eta):
    T = 60
    d = make_diffusion(T)
    abar = linear_alpha_bar(T)
    g = th.Generator().manual_seed(3)
    x = th.randn(2, 1, 4, 4, generator=g, dtype=th.float64) * 0.5
    eps = th.randn(2, 1, 4, 4, generator=g, dtype=th.float64) * 0.5
    noise = th.randn(2, 1, 4, 4, generator=g, dtype=th.float64)
    out = d.ddim_sample(constant_model(eps), x, th.tensor([33, 0]), clip_denoised=False, eta=eta, noise=noise)
    expected_33 = ddim_closed_form(x[0], eps[0], abar[33], abar[32], eta, noise[0])
    th.testing.assert_close(out["sample"][0], expected_33, rtol=1e-5, atol=1e-5)
    # t=0: ᾱ_prev = 1 and no noise term, the output is x̂0.
    th.testing.assert_close(out["sample"][1], (x[1] - math.sqrt(1 - abar[0]) * eps[1]) / math.sqrt(abar[0]),
                            rtol=1e-5, atol=1e-5)
    if eta > 0:
        without = d.ddim_sample(constant_model(eps), x, th.tensor([33, 0]), clip_denoised=False, eta=eta,
                                noise=th.zeros_like(x))
        assert (out["sample"][0] - without["sample"][0]).abs().max() > 1e-3  # the σ·z term is present


def test_ddim_reverse_step_matches_closed_form():
    T = 60
    d = make_diffusion(T)
    abar = linear_alpha_bar(T)
    x = th.randn(1, 1, 4, 4, dtype=th.float64) * 0.5
    eps = th.randn_like(x) * 0.5
    out = d.ddim_reverse_sample(constant_model(eps), x, th.tensor([20]), clip_denoised=False)
    x0 = (x - math.sqrt(1 - abar[20]) * eps) / math.sqrt(abar[20])
    th.testing.assert_close(out["sample"], math.sqrt(abar[21]) * x0 + math.sqrt(1 - abar[21]) * eps,
                            rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="eta"):
        d.ddim_reverse_sample(constant_model(eps), x, th.tensor([20]), eta=0.5)


def test_cond_fn_shifts_ancestral_mean_by_variance_times_gradient():
    T = 50
    g_value = 0.3
    seen = {}

    def cond_fn(x, t, **kwargs):
        seen.update(kwargs, t=t)
        return th.full_like(x, g_value)

    soft_y = th.tensor([[0.05, 0.95], [1.0, 0.0]])
    for var_type in [gd.ModelVarType.FIXED_LARGE, gd.ModelVarType.FIXED_SMALL, gd.ModelVarType.LEARNED_RANGE]:
        d = make_diffusion(T, var_type)
        x = th.randn(2, 1, 4, 4, dtype=th.float64) * 0.5
        channels = 2 if var_type == gd.ModelVarType.LEARNED_RANGE else 1
        output = th.randn(2, channels, 4, 4, dtype=th.float64) * 0.3
        t = th.tensor([30, 7])
        noise = th.randn_like(x)
        kwargs = {"y": soft_y}
        plain = d.p_sample(constant_model(output), x, t, model_kwargs=kwargs, noise=noise)
        guided = d.p_sample(constant_model(output), x, t, model_kwargs=kwargs, noise=noise, cond_fn=cond_fn)
        variance = d.p_mean_variance(constant_model(output), x, t)["variance"]
        th.testing.assert_close(guided["sample"] - plain["sample"], variance.double() * g_value, rtol=1e-6, atol=1e-9)
        assert seen["y"] is soft_y and th.equal(seen["t"], t)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_cond_fn_shifts_ddim_eps_and_output_by_closed_form(eta):
    T = 50
    abar = linear_alpha_bar(T)
    d = make_diffusion(T)
    gradient = th.randn(1, 1, 4, 4, dtype=th.float64)
    x = th.randn(1, 1, 4, 4, dtype=th.float64) * 0.5
    eps = th.randn_like(x) * 0.5
    noise = th.randn_like(x)
    t = th.tensor([30])
    cond_fn = lambda x, t, **kwargs: gradient  # noqa: E731
    plain = d.ddim_sample(constant_model(eps), x, t, clip_denoised=False, eta=eta, noise=noise)
    guided = d.ddim_sample(constant_model(eps), x, t, clip_denoised=False, eta=eta, noise=noise, cond_fn=cond_fn)
    ab, abp = abar[30], abar[29]
    sigma = eta * math.sqrt((1 - abp) / (1 - ab)) * math.sqrt(1 - ab / abp)
    shifted_eps = eps - math.sqrt(1 - ab) * gradient
    expected = ddim_closed_form(x, shifted_eps, ab, abp, eta, noise)
    th.testing.assert_close(guided["sample"], expected, rtol=1e-5, atol=1e-5)
    delta = (math.sqrt(abp) * (1 - ab) / math.sqrt(ab) - math.sqrt(1 - abp - sigma**2) * math.sqrt(1 - ab)) * gradient
    th.testing.assert_close(guided["sample"] - plain["sample"], delta, rtol=1e-5, atol=1e-5)
    # condition_score: ε' = ε − √(1−ᾱ)·g, and x̂0' from ε' without re-clamping.
    out = d.condition_score(cond_fn, d.p_mean_variance(constant_model(eps), x, t, clip_denoised=False), x, t)
    th.testing.assert_close(d._predict_eps_from_xstart(x, t, out["pred_xstart"]), shifted_eps, rtol=1e-5, atol=1e-5)


# ----- samplers against the analytic model -------------------------------------------------------------------


def spaced_linear(spec, T=1000):
    return SpacedDiffusion(space_timesteps(T, spec), betas=gd.get_named_beta_schedule("linear", T),
                           model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.FIXED_LARGE,
                           loss_type=gd.LossType.MSE)


def predicted_sample_variance(kept, abar_full, sampler):
    """Sample variance after sampling from N(0, 1) with the optimal eps model (each step is linear in x)."""
    ab = abar_full[kept]
    abp = np.r_[1.0, ab[:-1]]
    beta = 1 - ab / abp
    post = beta * (1 - abp) / (1 - ab)
    fixed_large = np.r_[post[1], beta[1:]]
    v = 1.0
    for i in range(len(kept) - 1, -1, -1):
        denom = ab[i] * DATA_STD**2 + 1 - ab[i]
        x0_gain = np.sqrt(ab[i]) * DATA_STD**2 / denom  # x̂0 = gain·x_t
        if sampler == "ddim":
            gain = np.sqrt(abp[i]) * x0_gain + np.sqrt(1 - abp[i]) * np.sqrt(1 - ab[i]) / denom
            v = gain**2 * v
        else:
            gain = beta[i] * np.sqrt(abp[i]) / (1 - ab[i]) * x0_gain + (1 - abp[i]) * np.sqrt(1 - beta[i]) / (1 - ab[i])
            v = gain**2 * v + (fixed_large[i] if i > 0 else 0.0)
    return v


@pytest.mark.parametrize("sampler,coarse,fine", [("ddpm", "100", "250"), ("ddim", "ddim50", "ddim250")])
def test_samplers_reproduce_the_data_variance(sampler, coarse, fine):
    abar_full = linear_alpha_bar(1000)
    model = optimal_eps_model(abar_full)
    th.manual_seed(4)
    shape = (16, 1, 64, 64)  # 65536 values: the variance estimate has 0.6 % standard error
    for spec in [coarse, fine]:
        d = spaced_linear(spec)
        loop = d.p_sample_loop if sampler == "ddpm" else d.ddim_sample_loop
        sample = loop(model, shape, clip_denoised=False)
        kept = d.timestep_map.numpy()
        predicted = predicted_sample_variance(kept, abar_full, sampler)
        # The sampler does exactly the linear map predicted (coarse steps included)...
        assert sample.var().item() == pytest.approx(predicted, rel=0.025)
        if spec == fine:
            # ...and with fine steps that is the data variance.
            assert predicted / DATA_STD**2 == pytest.approx(1.0, abs=0.025)
            assert sample.var().item() == pytest.approx(DATA_STD**2, rel=0.04)
            assert abs(sample.mean().item()) < 0.01


def test_ddim_inversion_round_trip():
    # Paper setting: T=4000 linear, encode to Q=400 and decode back, every step.
    T, K = 4000, 400
    abar = linear_alpha_bar(T)
    d = make_diffusion(T)
    model = optimal_eps_model(abar)
    x0 = th.randn(1, 1, 64, 64, dtype=th.float64, generator=th.Generator().manual_seed(5)) * DATA_STD
    x = x0
    for i in range(K):
        x = d.ddim_reverse_sample(model, x, th.tensor([i]), clip_denoised=False)["sample"]
    encoded = x
    for out in _ddim_down(d, model, x, K):
        x = out["sample"]
    assert (x - x0).abs().max().item() < 1e-3 * x0.abs().max().item()
    # The encoding is the ODE solution up to the discretisation: x_K / x_0 = exact scale factor.
    exact_gain = np.sqrt((abar[K] * DATA_STD**2 + 1 - abar[K]) / (abar[0] * DATA_STD**2 + 1 - abar[0]))
    np.testing.assert_allclose((encoded / x0).numpy(), exact_gain, rtol=2e-3)


def _ddim_down(d, model, x, start):
    for i in range(start, 0, -1):
        out = d.ddim_sample(model, x, th.tensor([i]), clip_denoised=False)
        x = out["sample"]
        yield out


def test_respaced_ddim_round_trip_is_the_predicted_linear_map():
    d = spaced_linear("ddim50")
    abar_full = linear_alpha_bar(1000)
    model = optimal_eps_model(abar_full)
    kept = d.timestep_map.numpy()
    x0 = th.randn(1, 1, 16, 16, dtype=th.float64) * DATA_STD
    K = 20
    x = x0
    for i in range(K):
        x = d.ddim_reverse_sample(model, x, th.tensor([i]), clip_denoised=False)["sample"]
    for i in range(K, 0, -1):
        x = d.ddim_sample(model, x, th.tensor([i]), clip_denoised=False)["sample"]
    # Each up/down pair multiplies by cos² of the angle between (√ᾱ s, √(1−ᾱ)) at neighbouring steps.
    ab = abar_full[kept]
    u = np.stack([np.sqrt(ab) * DATA_STD, np.sqrt(1 - ab)], axis=1)
    cos2 = (u[:-1] * u[1:]).sum(1) ** 2 / ((u[:-1] ** 2).sum(1) * (u[1:] ** 2).sum(1))
    np.testing.assert_allclose((x / x0).numpy(), np.prod(cos2[:K]), rtol=1e-5)


def test_progressive_loops_start_from_given_noise_and_yield_every_step():
    d = spaced_linear("10")
    model = optimal_eps_model(linear_alpha_bar(1000))
    noise = th.randn(2, 1, 4, 4, dtype=th.float64)
    steps = list(d.ddim_sample_loop_progressive(model, noise.shape, noise=noise, clip_denoised=False))
    assert len(steps) == 10
    x = noise
    for i in range(9, -1, -1):
        x = d.ddim_sample(model, x, th.tensor([i, i]), clip_denoised=False)["sample"]
    th.testing.assert_close(steps[-1]["sample"], x)
    th.testing.assert_close(d.ddim_sample_loop(model, noise.shape, noise=noise, clip_denoised=False), x)
    assert len(list(d.p_sample_loop_progressive(model, noise.shape, noise=noise))) == 10
    with pytest.raises(ValueError):
        d.p_sample_loop(model, (3, 1, 4, 4), noise=noise)


# ----- losses ---------------------------------------------------------------------------------------------------


def test_normal_kl_matches_textbook_formula():
    m1, m2 = th.tensor([0.3, -1.0]), th.tensor([-0.2, 0.5])
    s1, s2 = th.tensor([0.7, 1.3]), th.tensor([1.1, 0.4])
    expected = th.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    th.testing.assert_close(normal_kl(m1, 2 * th.log(s1), m2, 2 * th.log(s2)), expected)
    th.testing.assert_close(normal_kl(m1, 0.0, m1, 0.0), th.zeros(2))


def test_discretized_log_likelihood_is_a_distribution_over_256_levels():
    levels = th.linspace(-1, 1, 256, dtype=th.float64)
    for mean, std in [(0.1, 0.1), (-0.9, 0.03), (0.95, 0.5)]:
        log_p = discretized_gaussian_log_likelihood(
            levels, means=th.full_like(levels, mean), log_scales=th.full_like(levels, math.log(std)))
        probs = log_p.exp()
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
        phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
        exact = [phi((-1 + 1 / 255 - mean) / std)]
        exact += [phi((v + 1 / 255 - mean) / std) - phi((v - 1 / 255 - mean) / std) for v in levels[1:-1].tolist()]
        exact += [1 - phi((1 - 1 / 255 - mean) / std)]
        np.testing.assert_allclose(probs.numpy(), exact, atol=5e-4)


# ----- training losses ----------------------------------------------------------------------------------------


ALL_LOSS_SETTINGS = [
    (loss, var) for loss in gd.LossType
    for var in [gd.ModelVarType.FIXED_LARGE, gd.ModelVarType.FIXED_SMALL, gd.ModelVarType.LEARNED_RANGE]
]


@pytest.mark.parametrize("loss_type,var_type", ALL_LOSS_SETTINGS)
def test_training_losses_are_finite_for_every_type(loss_type, var_type):
    d = make_diffusion(25, var_type, loss_type=loss_type)
    channels = 2 if var_type == gd.ModelVarType.LEARNED_RANGE else 1
    weight = th.nn.Parameter(th.tensor(0.1))
    seen = {}

    def model(x, t, y=None):
        seen["y"] = y
        return weight * x.repeat(1, channels, 1, 1)

    y = th.tensor([[0.2, 0.8], [0.9, 0.1], [0.5, 0.5]])
    x0 = th.rand(3, 1, 4, 4) * 2 - 1
    terms = d.training_losses(model, x0, th.tensor([0, 5, 24]), model_kwargs={"y": y})
    assert seen["y"] is y
    assert terms["loss"].shape == (3,) and th.isfinite(terms["loss"]).all()
    if not loss_type.is_vb():
        assert "mse" in terms
        assert ("vb" in terms) == (var_type == gd.ModelVarType.LEARNED_RANGE)
    terms["loss"].mean().backward()
    assert weight.grad is not None and th.isfinite(weight.grad)


def test_hybrid_loss_with_perfect_eps_has_zero_mse_and_closed_form_vb():
    T = 100
    abar = linear_alpha_bar(T)
    betas = 1 - abar / np.r_[1.0, abar[:-1]]
    post = betas * (1 - np.r_[1.0, abar[:-1]]) / (1 - abar)
    x0 = (th.randint(0, 256, (3, 1, 4, 4)).double() / 127.5 - 1)
    noise = th.randn_like(x0)
    t = th.tensor([0, 10, 70])
    mean_out = noise.clone().requires_grad_(True)
    var_out = th.ones_like(noise).requires_grad_(True)  # v = 1: the variance is β_t
    model = lambda x, t, **kwargs: th.cat([mean_out, var_out], dim=1)  # noqa: E731
    results = {}
    for loss_type in [gd.LossType.MSE, gd.LossType.RESCALED_MSE]:
        d = make_diffusion(T, gd.ModelVarType.LEARNED_RANGE, loss_type=loss_type)
        results[loss_type] = d.training_losses(model, x0, t, noise=noise)
    terms = results[gd.LossType.MSE]
    assert th.equal(terms["mse"], th.zeros(3, dtype=terms["mse"].dtype))
    # Perfect mean: the KL reduces to the variance mismatch between β̃_t and β_t, in bits.
    for i, step in [(1, 10), (2, 70)]:
        kl = 0.5 * (-1 + np.log(betas[step]) - np.log(post[step]) + post[step] / betas[step]) / np.log(2)
        assert terms["vb"][i].item() == pytest.approx(kl, rel=1e-3)
    # t=0: the decoder NLL of the true pixel under N(x0, β_0) discretised into 256 bins.
    std0 = math.sqrt(betas[0])
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    nll = []
    for v in x0[0].flatten().tolist():
        if v < -0.999:
            p = phi((1 / 255) / std0)
        elif v > 0.999:
            p = 1 - phi((-1 / 255) / std0)
        else:
            p = phi((1 / 255) / std0) - phi((-1 / 255) / std0)
        nll.append(-math.log(p) / math.log(2))
    assert terms["vb"][0].item() == pytest.approx(np.mean(nll), rel=1e-3, abs=1e-4)
    th.testing.assert_close(terms["loss"], terms["vb"])
    th.testing.assert_close(results[gd.LossType.RESCALED_MSE]["vb"], terms["vb"] * T / 1000)
    # The bound trains the variance only: no gradient reaches the mean channels through vb.
    terms["vb"].sum().backward()
    assert mean_out.grad is None or (mean_out.grad == 0).all()
    assert var_out.grad.abs().sum() > 0


def test_kl_losses_equal_the_vb_term_and_rescale_by_T():
    T = 30
    x0 = th.rand(2, 1, 4, 4) * 2 - 1
    noise = th.randn_like(x0)
    t = th.tensor([3, 17])
    model = lambda x, t, **kwargs: 0.5 * x  # noqa: E731
    kl = make_diffusion(T, loss_type=gd.LossType.KL)
    rkl = make_diffusion(T, loss_type=gd.LossType.RESCALED_KL)
    loss = kl.training_losses(model, x0, t, noise=noise)["loss"]
    x_t = kl.q_sample(x0, t, noise=noise)
    vb = kl._vb_terms_bpd(model, x0, x_t, t, clip_denoised=False)["output"]
    th.testing.assert_close(loss, vb)
    th.testing.assert_close(rkl.training_losses(model, x0, t, noise=noise)["loss"], loss * T)
    # The same KL computed here from the textbook formula.
    true_mean, true_var, _ = kl.q_posterior_mean_variance(x0, x_t, t)
    out = kl.p_mean_variance(model, x_t, t, clip_denoised=False)
    s1, s2 = true_var.sqrt(), out["variance"].sqrt()
    textbook = th.log(s2 / s1) + (s1**2 + (true_mean - out["mean"]) ** 2) / (2 * s2**2) - 0.5
    th.testing.assert_close(loss, textbook.mean(dim=(1, 2, 3)) / math.log(2), rtol=1e-4, atol=1e-6)


def test_calc_bpd_loop_shapes_and_prior():
    T = 25
    abar = linear_alpha_bar(T)
    d = make_diffusion(T)
    x0 = th.rand(2, 1, 4, 4, dtype=th.float64) * 2 - 1
    out = d.calc_bpd_loop(optimal_eps_model(abar), x0, clip_denoised=True)
    assert out["vb"].shape == out["mse"].shape == out["xstart_mse"].shape == (2, T)
    assert out["total_bpd"].shape == out["prior_bpd"].shape == (2,)
    for value in out.values():
        assert th.isfinite(value).all()
    th.testing.assert_close(out["total_bpd"], out["vb"].sum(dim=1) + out["prior_bpd"])
    # Prior: KL(N(√ᾱ x0, 1−ᾱ) ‖ N(0, 1)) at the last step, per dimension in bits.
    m, var = np.sqrt(abar[-1]) * x0.numpy(), 1 - abar[-1]
    prior = (0.5 * (var + m**2 - 1 - np.log(var))).mean(axis=(1, 2, 3)) / np.log(2)
    np.testing.assert_allclose(out["prior_bpd"].numpy(), prior, rtol=1e-5)
    assert (out["vb"][:, 1:] >= -1e-6).all()  # KL terms are non-negative


def test_linear_schedule_too_short_is_a_parameter_error():
    with pytest.raises(ParameterError, match="^num_diffusion_timesteps: the linear schedule needs more than 20"):
        gd.get_named_beta_schedule("linear", 20)
    assert gd.get_named_beta_schedule("linear", 21).max() < 1
