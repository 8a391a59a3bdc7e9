"""Likelihood helpers for the variational bound: Gaussian KL and a discretised decoder."""

import math

import torch as th

# Pixels are 8-bit values mapped to [-1, 1]: neighbouring levels are 2/255 apart.
_BIN_HALF_WIDTH = 1.0 / 255.0
# Beyond this the pixel is in the first or last bin, which is open towards infinity.
_EDGE = 0.999
_TINY = 1e-12


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Arguments broadcast; at least one must be a tensor (plain numbers are converted).
    """
    reference = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, th.Tensor)), None)
    if reference is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    mean1, logvar1, mean2, logvar2 = (
        a if isinstance(a, th.Tensor) else th.as_tensor(a).to(reference) for a in (mean1, logvar1, mean2, logvar2)
    )
    return 0.5 * (-1.0 + logvar2 - logvar1 + th.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * th.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Standard normal CDF by the tanh approximation (absolute error below 2e-4)."""
    return 0.5 * (1.0 + th.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-probability of 8-bit images in [-1, 1] under a Gaussian discretised into 256 bins.

    Each pixel value owns the interval x ± 1/255; the lowest and highest bins are
    extended to -inf and +inf so that the 256 probabilities sum to one.
    `log_scales` is the log standard deviation. Returns log-probabilities (nats), shape of x.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = th.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + _BIN_HALF_WIDTH))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - _BIN_HALF_WIDTH))
    log_cdf_upper = th.log(cdf_upper.clamp(min=_TINY))
    log_survival_lower = th.log((1.0 - cdf_lower).clamp(min=_TINY))
    log_bin = th.log((cdf_upper - cdf_lower).clamp(min=_TINY))
    return th.where(x < -_EDGE, log_cdf_upper, th.where(x > _EDGE, log_survival_lower, log_bin))
