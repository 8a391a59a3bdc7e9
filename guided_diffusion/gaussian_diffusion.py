"""Gaussian diffusion: noise schedules, forward/posterior math, training losses and samplers.

Conventions (those of improved/guided diffusion, so checkpoints and flags carry over):
timestep index t in [0, T) means t+1 steps of noise were added; `alphas_cumprod[t]` is
ᾱ_t; the model is called as `model(x_t, t_model, **model_kwargs)` where t_model is t,
or t·1000/T when `rescale_timesteps`. `model_kwargs` is passed through untouched, so the
class label `y` may be a LongTensor of indices or a float (B, num_classes) soft label.
Guidance functions are called the same way: `cond_fn(x_t, t_model, **model_kwargs)`,
returning a gradient of log p(y | x_t) already multiplied by the guidance scale.
"""

import enum
import math

import numpy as np
import torch as th
from tqdm.auto import tqdm

from .errors import ParameterError
from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """Return the float64 betas of the schedule `schedule_name` ("linear" or "cosine") over T steps."""
    if schedule_name == "linear":
        # Scaled so that any T spans the same noise range as the original T=1000 schedule.
        scale = 1000.0 / num_diffusion_timesteps
        if scale * 0.02 >= 1.0:
            raise ParameterError("num_diffusion_timesteps",
                                 f"the linear schedule needs more than 20 steps, got {num_diffusion_timesteps}")
        return np.linspace(scale * 1e-4, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ParameterError("schedule_name", f"unknown schedule {schedule_name!r} (expected 'linear' or 'cosine')")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Betas whose cumulative product follows `alpha_bar(u)`, u in [0, 1]; each beta ≤ max_beta."""
    steps = num_diffusion_timesteps
    betas = [min(1.0 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)]
    return np.array(betas, dtype=np.float64)


class ModelMeanType(enum.Enum):
    """What the network's first C output channels predict."""

    PREVIOUS_X = enum.auto()  # the posterior mean of x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """How the reverse-process variance is chosen."""

    LEARNED = enum.auto()  # the network outputs log-variance
    FIXED_SMALL = enum.auto()  # posterior variance β̃_t
    FIXED_LARGE = enum.auto()  # β_t (with β̃_1 at t=0 for a sane decoder)
    LEARNED_RANGE = enum.auto()  # the network interpolates between the two fixed choices


class LossType(enum.Enum):
    MSE = enum.auto()  # plain MSE (plus the VLB term if the variance is learned)
    RESCALED_MSE = enum.auto()  # MSE + VLB·T/1000 (the improved-DDPM hybrid loss)
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the variational bound times T

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """Gather `arr[timesteps]` (numpy, per batch element) as float32 broadcastable to `broadcast_shape`."""
    # Cast before moving: some devices (MPS) have no float64.
    table = th.from_numpy(np.asarray(arr, dtype=np.float32)).to(timesteps.device)
    values = table[timesteps.long()]
    while values.ndim < len(broadcast_shape):
        values = values[..., None]
    return values.expand(broadcast_shape)


class GaussianDiffusion:
    """Diffusion process with T = len(betas) steps; see the module docstring for conventions."""

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError("betas must be a non-empty 1-D array")
        if not ((betas > 0).all() and (betas < 1).all()):
            raise ValueError("betas must lie in (0, 1)")
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(coef1·x_0 + coef2·x_t, β̃_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0, so its log is replaced by log β̃_1.
        if self.num_timesteps > 1:
            first_log = self.posterior_variance[1]
        else:
            first_log = betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first_log, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # ----- forward process and posterior -------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) = N(√ᾱ_t·x_0, (1−ᾱ_t)I), using `noise` if given."""
        if noise is None:
            noise = th.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_start shape {tuple(x_start.shape)}")
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance = _extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ----- reverse process ------------------------------------------------------------------------

    def wrap_model(self, model):
        """`model` (or a `cond_fn`) as this diffusion calls it: `f(x, t, **kwargs)` with `t` this
        diffusion's timestep index, handed on as the timestep the network was trained with (t, or
        t·1000/T as float when rescale_timesteps; respacing maps to the original step first).
        Wrapping a wrapped model returns it unchanged."""
        if isinstance(model, TimestepModel):
            return model
        return TimestepModel(model, None, self.rescale_timesteps, self.num_timesteps)

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        # Invert the posterior mean: xprev = coef1·x_0 + coef2·x_t.
        return (
            _extract_into_tensor(1.0 / self.posterior_mean_coef1, t, x_t.shape) * xprev
            - _extract_into_tensor(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t.shape) * x_t
        )

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the model and return p(x_{t-1} | x_t) as a dict.

        Keys: "mean", "variance", "log_variance", "pred_xstart" (x̂_0, after `denoised_fn`
        and clamping to [-1, 1] when `clip_denoised`).
        """
        if model_kwargs is None:
            model_kwargs = {}
        batch, channels = x.shape[:2]
        model_output = self.wrap_model(model)(x, t, **model_kwargs)

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            expected = (batch, channels * 2, *x.shape[2:])
            if tuple(model_output.shape) != expected:
                raise ValueError(
                    f"a learned-variance model must output {expected} (mean and variance channels), "
                    f"got {tuple(model_output.shape)}"
                )
            model_output, var_values = th.split(model_output, channels, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                log_variance = var_values
            else:
                min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _extract_into_tensor(np.log(self.betas), t, x.shape)
                frac = (var_values + 1) / 2  # the network outputs [-1, 1]
                log_variance = frac * max_log + (1 - frac) * min_log
            variance = th.exp(log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                # β_t, except at t=0 where β̃_1 gives a decoder with a sensible scale.
                var_table = np.append(np.exp(self.posterior_log_variance_clipped[0]), self.betas[1:])
                log_var_table = np.log(var_table)
            else:
                var_table = self.posterior_variance
                log_var_table = self.posterior_log_variance_clipped
            variance = _extract_into_tensor(var_table, t, x.shape)
            log_variance = _extract_into_tensor(log_var_table, t, x.shape)

        def process_xstart(x_0):
            if denoised_fn is not None:
                x_0 = denoised_fn(x_0)
            return x_0.clamp(-1, 1) if clip_denoised else x_0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x, t, model_output))
            mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Guided ancestral mean: μ + Σ·g with g = cond_fn(x, t, **model_kwargs) (Dhariwal & Nichol)."""
        if model_kwargs is None:
            model_kwargs = {}
        gradient = self.wrap_model(cond_fn)(x, t, **model_kwargs)
        return p_mean_var["mean"] + p_mean_var["variance"] * gradient

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Guided score: ε' = ε − √(1−ᾱ_t)·g; returns a copy of `p_mean_var` with x̂_0 and mean redone.

        ε is re-derived from the (possibly clamped) x̂_0; the new x̂_0 is not clamped again.
        """
        if model_kwargs is None:
            model_kwargs = {}
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - th.sqrt(1 - alpha_bar) * self.wrap_model(cond_fn)(x, t, **model_kwargs)
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    @staticmethod
    def _nonzero_mask(t, x):
        """1 where t ≠ 0 (a sampling step adds noise), 0 at the last step; shaped to broadcast with x."""
        return (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                 noise=None):
        """One ancestral step x_t → x_{t-1}; returns {"sample", "pred_xstart"}. `noise` defaults to N(0, I)."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        if noise is None:
            noise = th.randn_like(x)
        sample = out["mean"] + self._nonzero_mask(t, x) * th.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False):
        """Ancestral sampling from x_{T-1} = `noise` (default N(0, I)) down to x_0; returns the sample."""
        final = None
        for final in self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, device=device, progress=progress,
        ):
            pass
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  cond_fn=None, model_kwargs=None, device=None, progress=False):
        """Generator over the ancestral steps, yielding each p_sample output dict."""
        img = self._initial_noise(model, shape, noise, device)
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), desc="sampling", disable=not progress):
            t = th.full((shape[0],), i, device=img.device, dtype=th.long)
            with th.no_grad():
                out = self.p_sample(model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                    cond_fn=cond_fn, model_kwargs=model_kwargs)
            yield out
            img = out["sample"]

    @staticmethod
    def _initial_noise(model, shape, noise, device):
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} differs from requested shape {tuple(shape)}")
            return noise if device is None else noise.to(device)
        if device is None:
            # A plain callable (no parameters) samples on the CPU.
            params = getattr(model, "parameters", None)
            first = next(iter(params()), None) if callable(params) else None
            device = first.device if first is not None else th.device("cpu")
        return th.randn(*shape, device=device)

    # ----- DDIM -------------------------------------------------------------------------------------

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                    eta=0.0, noise=None):
        """One DDIM step x_t → x_{t-1} (Song et al.); guidance through `condition_score`.

        x_{t-1} = √ᾱ_{t-1}·x̂_0 + √(1−ᾱ_{t-1}−σ²)·ε + σ·z (z only when t ≠ 0), with
        σ = η·√((1−ᾱ_{t-1})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t-1}). Returns {"sample", "pred_xstart"}.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # ε consistent with the final (clamped or guided) x̂_0.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * th.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * th.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_prev) + th.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        if noise is None:
            noise = th.randn_like(x)
        sample = mean_pred + self._nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0):
        """One deterministic DDIM encoding step x_t → x_{t+1} (uses ᾱ_{t+1}); only eta=0 is defined."""
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample is deterministic: eta must be 0")
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = _extract_into_tensor(self.alphas_cumprod_next, t, x.shape)
        sample = out["pred_xstart"] * th.sqrt(alpha_bar_next) + th.sqrt(1 - alpha_bar_next) * eps
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0):
        """DDIM sampling from `noise` (default N(0, I)) at the last step down to x_0; returns the sample."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, eta=eta,
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0):
        """Generator over the DDIM steps, yielding each ddim_sample output dict."""
        img = self._initial_noise(model, shape, noise, device)
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), desc="DDIM sampling", disable=not progress):
            t = th.full((shape[0],), i, device=img.device, dtype=th.long)
            with th.no_grad():
                out = self.ddim_sample(model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                       cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta)
            yield out
            img = out["sample"]

    # ----- training and likelihood -------------------------------------------------------------------

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound in bits per dimension: {"output", "pred_xstart"}.

        KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t)) for t > 0; the decoder NLL -log p(x_0|x_1) at t = 0.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        ) / math.log(2.0)
        return {"output": th.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-example training losses at timesteps t: dict with "loss" and, as applicable, "mse", "vb"."""
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = th.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = self.wrap_model(model)(x_t, t, **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            channels = x_t.shape[1]
            if model_output.shape[1] != 2 * channels:
                raise ValueError(f"a learned-variance model must output {2 * channels} channels, "
                                 f"got {model_output.shape[1]}")
            model_output, var_values = th.split(model_output, channels, dim=1)
            # The bound trains only the variance; the mean is fitted by the MSE alone.
            frozen = th.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *args, **kwargs: frozen, x_start, x_t, t,
                                             clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # Same weight as the MSE for T=1000 (hybrid loss, λ = 0.001 per step).
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        if model_output.shape != target.shape:
            raise ValueError(f"model output {tuple(model_output.shape)} does not match target {tuple(target.shape)}")
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start):
        """KL(q(x_{T-1} | x_0) ‖ N(0, I)) in bits per dimension, per example."""
        t = th.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=th.long)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None, progress=False):
        """The full variational bound, term by term.

        Returns "total_bpd" and "prior_bpd" (shape B) and "vb", "xstart_mse", "mse" (shape B × T).
        """
        batch = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), desc="bpd", disable=not progress):
            t = th.full((batch,), i, device=x_start.device, dtype=th.long)
            noise = th.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise=noise)
            with th.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=clip_denoised,
                                         model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        # Collected from t = T-1 down; store in timestep order.
        vb = th.stack(vb[::-1], dim=1)
        xstart_mse = th.stack(xstart_mse[::-1], dim=1)
        mse = th.stack(mse[::-1], dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": mse,
        }


class TimestepModel:
    """Calls `model(x, t_model, **kwargs)` with t_model the trained timestep of diffusion index t:
    `timestep_map[t]` when respaced (else t itself), times 1000/`original_num_steps` as float when
    `rescale_timesteps`."""

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps

    def __call__(self, x, ts, **kwargs):
        if self.timestep_map is not None:
            ts = self.timestep_map.to(ts.device)[ts.long()]
        if self.rescale_timesteps:
            ts = ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, ts, **kwargs)
