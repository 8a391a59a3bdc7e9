"""What the benchmarks, the profile and the GPU check share (scripts/bench_seg.py, profile_seg.py,
bench_train.py, check_gpu.py).

- the networks: `demo_configs` (the shipped demo models' configuration at any image size),
  `random_networks` (that configuration with random weights), `shipped_networks` (the demo models);
- timing: `timed` (waits for the device), `PhaseClock` (seconds, calls and FLOPs of wrapped calls);
- FLOPs: `count_flops` (torch.utils.flop_counter), `matmul_flops_per_second` (the machine's reference);
- `original_style_cgcdm`: the original code's CG-CDM loop, one image at a time, for comparison;
- `VariantWorker`: a benchmark variant in a process of its own (its own allocator settings and
  switched-off levers), run in turns with the others so that load on the machine hits all alike;
- `LEVERS`: the speed levers of inference, each of which a worker can switch off;
- `format_table`: the scripts' plain-text tables.
"""

import copy
import multiprocessing
import os
import time
from collections import defaultdict

import torch

from ..checkpoint_util import load_classifier, load_model_and_diffusion, read_args_json
from ..inference import NetworkWrapper
from ..script_util import (
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    diffusion_from_config,
    model_and_diffusion_defaults,
)
from ..train.flags import SIZE_DEFAULTS


# ---------------------------------------------------------------------------------------------
# Networks


def demo_configs(models_dir, image_size=None):
    """(DDPM config, classifier config) of the shipped demo models in `models_dir` ({ddpm,classifier}/args.json).

    At another `image_size` the widths, depths and heads stay; the channel multipliers and attention
    resolutions are what a run at that size gets by default (224 px: 1,1,2,2,4,4 and 28,14 / 28,14,7).
    """
    ddpm = {**model_and_diffusion_defaults(), **read_args_json(os.path.join(models_dir, "ddpm", "model.pt"))}
    classifier = {**classifier_defaults(), **read_args_json(os.path.join(models_dir, "classifier", "model.pt"),
                                                            "--models")}
    ddpm = {k: ddpm[k] for k in model_and_diffusion_defaults()}
    classifier = {k: classifier[k] for k in classifier_defaults()}
    if image_size is not None and image_size != ddpm["image_size"]:
        sized = SIZE_DEFAULTS.get(image_size, {})
        ddpm.update(image_size=image_size, channel_mult="",
                    attention_resolutions=sized.get("attention_resolutions", ddpm["attention_resolutions"]))
        classifier.update(image_size=image_size, classifier_channel_mult="",
                          classifier_attention_resolutions=sized.get("classifier_attention_resolutions",
                                                                     classifier["classifier_attention_resolutions"]))
    return ddpm, classifier


def random_networks(ddpm_config, classifier_config, device, seed=0, scale=0.02):
    """(model, diffusion, classifier) of these configurations with random weights, in eval mode.

    Every parameter gets N(0, scale^2) added, so that the zero-initialised output layers do not make
    the networks constant (the timing does not depend on the values; the agreement checks do).
    """
    torch.manual_seed(seed)
    model, _ = create_model_and_diffusion(**ddpm_config)
    classifier = create_classifier(**classifier_config) if classifier_config is not None else None
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in (model, classifier):
            for p in net.parameters() if net is not None else ():
                p.add_(torch.randn(p.shape, generator=generator) * scale)
    diffusion = diffusion_from_config({**ddpm_config, "timestep_respacing": ""})
    return model.to(device).eval(), diffusion, classifier.to(device).eval() if classifier is not None else None


def shipped_networks(models_dir, device):
    """(model, diffusion, classifier) of the shipped demo models (the unspaced diffusion, as segmentation uses)."""
    model, _, config = load_model_and_diffusion(os.path.join(models_dir, "ddpm", "model.pt"), device=device,
                                                flag="--models")
    classifier, _ = load_classifier(os.path.join(models_dir, "classifier", "model.pt"), device=device,
                                    flag="--models")
    return model, diffusion_from_config({**config, "timestep_respacing": ""}), classifier


# ---------------------------------------------------------------------------------------------
# Timing and FLOPs


def synchronize(device):
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device):
    """Seconds `fn()` takes on `device` (queued GPU work included); returns (seconds, its result)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def count_flops(fn):
    """FLOPs of `fn()` (matrix products, convolutions and attention, forward and backward), counted by
    torch.utils.flop_counter; returns (flops, its result)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), result


def matmul_flops_per_second(device, size=2048, repeats=5):
    """FLOP/s of a float32 `size` x `size` matrix product on `device`, best of `repeats`."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    timed(lambda: a @ b, device)
    best = min(timed(lambda: a @ b, device)[0] for _ in range(repeats))
    return 2 * size**3 / best


class PhaseClock:
    """Seconds and calls of wrapped callables, by phase name; the device is synchronised around each
    call, so a phase's seconds are its own even on a GPU. Phases may nest (a classifier forward
    inside the guidance call): each phase counts its own calls in full."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)

    def wrap(self, name, fn):
        def call(*args, **kwargs):
            seconds, result = timed(lambda: fn(*args, **kwargs), self.device)
            self.seconds[name] += seconds
            self.calls[name] += 1
            return result

        return call

    def time(self, name, fn):
        """Run `fn()` as one call of phase `name`; returns its result."""
        return self.wrap(name, fn)()


class TimedModule(NetworkWrapper):
    """A network whose forward calls are timed by a PhaseClock; its other attributes are the network's."""

    def __init__(self, net, clock, name):
        super().__init__()
        self.net = net
        self._call = clock.wrap(name, net)

    def forward(self, *args, **kwargs):
        return self._call(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# The original code's loop


def original_style_cgcdm(model, diffusion, classifier, x0, q, steps, tau, scale, noise):
    """The original code's CG-CDM, one image at a time: a cloned model whose label-embedding row 0 holds
    tau*E[1] + (1-tau)*E[0], two UNet calls and two guidance calls per step, the difference copied
    to the host every step, its step indices (noised to Q, first step at Q - 1). Returns maps (N, H, W)."""
    from ..guidance import make_classifier_cond_fn

    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.label_emb.weight[0] = tau * model.label_emb.weight[1] + (1 - tau) * model.label_emb.weight[0]
    cond_fn = make_classifier_cond_fn(classifier, scale) if classifier is not None and scale else None
    maps = []
    for i in range(len(x0)):
        image = x0[i:i + 1]
        t = torch.full((1,), q, device=image.device, dtype=torch.long)
        x_a = x_b = diffusion.q_sample(image, t, noise=noise[i:i + 1])
        diff = torch.zeros(image.shape)
        with torch.no_grad():
            for _ in range(steps):
                t = t - 1
                x_a = diffusion.ddim_sample(model, x_a, t, cond_fn=cond_fn,
                                            model_kwargs={"y": torch.ones_like(t)})["sample"]
                x_b = diffusion.ddim_sample(clone, x_b, t, cond_fn=cond_fn,
                                            model_kwargs={"y": torch.zeros_like(t)})["sample"]
                diff += (x_a - x_b).cpu()
        maps.append(diff.sum(dim=1)[0].numpy() / (1 - tau))
    import numpy as np

    return np.stack(maps).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Levers and workers


def _interpolate_nearest_2x(x):
    size = (*x.shape[2:-2], x.shape[-2] * 2, x.shape[-1] * 2)
    return torch.nn.functional.interpolate(x, size, mode="nearest")


def _strided_attention(q, k, v):
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                                           v.transpose(-1, -2))
    return out.transpose(-1, -2)


def without_shared_first_step(cond_fn):
    """`cond_fn` computing the guidance on every row, without sharing the first step's (a lever off)."""
    def every_row(x, t, guide_copies=None, **kwargs):
        return cond_fn(x, t, **kwargs)

    return every_row


# Levers that are on by default, and how a worker switches one off (in its own process).
LEVERS = {
    "upsample_copy": "nearest x2 upsampling as a broadcast copy (off: F.interpolate)",
    "contiguous_attention": "q, k, v made contiguous for the fused SDPA kernel (off: strided views)",
    "heap_reuse": "freed CPU memory kept for reuse (off: glibc's defaults)",
    "shared_first_step": "the guidance classifier runs once on the images all branches share at x_Q",
}


def switch_off(levers):
    """Switch off the network levers among `levers` in this process (for a worker), through the
    networks' public switch `unet_blocks.set_kernels`."""
    from .. import unet_blocks

    unknown = set(levers) - set(LEVERS)
    if unknown:
        raise ValueError(f"unknown levers {sorted(unknown)}; known: {', '.join(LEVERS)}")
    unet_blocks.set_kernels(upsample_2x=_interpolate_nearest_2x if "upsample_copy" in levers else None,
                            attention=_strided_attention if "contiguous_attention" in levers else None)


def _worker_main(connection, build, threads):
    """A worker process: builds its networks and inputs with `build()`, then runs the variants it is sent."""
    if threads:
        torch.set_num_threads(threads)
    state = build()
    while True:
        message = connection.recv()
        if message is None:
            break
        try:
            connection.send(("ok", message(state)))
        except Exception as err:  # reported in the parent, with the variant's name
            connection.send(("error", f"{type(err).__name__}: {err}"))


class VariantWorker:
    """A process that builds its state once (`build()`, a picklable callable) and runs `task(state)`
    for each `run(task)` (picklable callables too), returning the result. Only one worker runs at a time."""

    def __init__(self, build, threads=0):
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, build, threads), daemon=True)
        self.process.start()

    def run(self, task):
        self.connection.send(task)
        status, result = self.connection.recv()
        if status != "ok":
            raise RuntimeError(result)
        return result

    def close(self):
        if self.process.is_alive():
            self.connection.send(None)
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def format_table(rows, columns):
    """Rows (dicts) as a plain-text table; `columns` is a list of (key, title, format spec or callable)."""
    def cell(row, key, spec):
        value = row.get(key)
        if value is None:
            return ""
        return spec(value) if callable(spec) else format(value, spec)

    cells = [[title for _, title, _ in columns]] + [[cell(r, k, f) for k, _, f in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     .rstrip() for line in cells)
