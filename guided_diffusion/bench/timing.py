"""Where CG-CDM's time goes (`profile_cgcdm`) and how fast its variants run side by side (`benchmark`).

The profile runs one CG-CDM batch with every network call timed: the UNet's forward passes (both
branches in one call per step), the guidance (the classifier's forward and backward passes), the
sampler's arithmetic with the map accumulation (the rest of the batch), the post-processing into
masks, and the data movement (reading the slices, the copies to and from the device).

The benchmark runs each variant in a process of its own (`benchmarks.VariantWorker`, so that the
allocator settings and the switched-off levers of one do not leak into another), warms each up on
its own batch shape, then times them in turns. Variants: the batched CG-CDM (`cdm_saliency` through
`inference.prepare_for_inference`) at given settings, with levers switched off or added
(channels-last, bf16, compile), and the original code's per-image loop
(`benchmarks.original_style_cgcdm`), which runs on the original network's behaviour: F.interpolate
upsampling, strided attention and glibc's default allocator.
"""

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..guidance import make_classifier_cond_fn
from ..inference import prepare_for_inference
from ..metrics import dice
from ..segment.chain import noise_step, per_image_noise
from ..segment.config import OperatingPoint
from ..segment.postprocess import saliency_to_mask
from ..segment.saliency import anomaly_saliency, cdm_saliency
from . import benchmarks


def describe_point(point, num_timesteps):
    """How the benchmarks' tables name an `OperatingPoint`: Q as the step it is, R, tau, s."""
    return (f"Q={noise_step(point.noise_level, num_timesteps)}, R={point.steps}, tau={point.tau:g}, "
            f"s={point.classifier_scale:g}")


@dataclass(frozen=True)
class Inputs:
    """The networks and images of a benchmark at one size: the shipped demo models on `count` evenly
    spaced validation tumour slices of `src_dir` when `shipped`, else random networks of the demo
    configuration, with `ddpm_overrides` / `classifier_overrides` (dicts of config values), on random images."""

    size: int
    count: int
    models_dir: str
    shipped: bool = False
    src_dir: str = ""
    seed: int = 0
    device: str = "cpu"
    ddpm_overrides: dict = None
    classifier_overrides: dict = None


def load_inputs(inputs):
    """{model, diffusion, classifier, x0, y1, noise, masks (or None), device} for `inputs`."""
    device = torch.device(inputs.device)
    if inputs.shipped:
        from ..segment.pipeline import load_slice_set

        model, diffusion, classifier = benchmarks.shipped_networks(inputs.models_dir, device)
        slices = load_slice_set(inputs.src_dir, "validation", image_size=inputs.size, in_channels=model.in_channels,
                                max_images=inputs.count)
        x0, masks = slices.images, slices.masks
    else:
        ddpm_config, classifier_config = benchmarks.demo_configs(inputs.models_dir, inputs.size)
        ddpm_config.update(inputs.ddpm_overrides or {})
        classifier_config.update(inputs.classifier_overrides or {})
        model, diffusion, classifier = benchmarks.random_networks(ddpm_config, classifier_config, device, inputs.seed)
        generator = torch.Generator().manual_seed(inputs.seed + 1)
        x0 = torch.rand(inputs.count, model.in_channels, inputs.size, inputs.size, generator=generator) * 2 - 1
        masks = None
    noise = per_image_noise(x0.shape[1:], inputs.seed, range(len(x0)))
    return dict(model=model, diffusion=diffusion, classifier=classifier, x0=x0.to(device), masks=masks,
                y1=torch.ones(len(x0), dtype=torch.long, device=device), noise=noise.to(device), device=device)


# ---------------------------------------------------------------------------------------------
# Profile


def profile_cgcdm(state, settings, mask_options=None):
    """Time the phases of one CG-CDM batch on `state` (`load_inputs`); returns a list of rows
    {phase, seconds, calls, flops} (flops None where not counted) and the batch's maps.

    Run it warm (a first batch allocates and picks kernels). The batch runs through
    `prepare_for_inference` at fp32, as segmentation does.
    """
    device = state["device"]
    setup = prepare_for_inference(state["model"], state["classifier"], device=device)
    clock = benchmarks.PhaseClock(device)
    unet = benchmarks.TimedModule(setup.model, clock, "unet")
    classifier = benchmarks.TimedModule(setup.classifier, clock, "classifier_forward")
    guidance = make_classifier_cond_fn(classifier, settings.classifier_scale) if settings.classifier_scale else None
    if guidance is not None:
        guidance = clock.wrap("guidance", guidance)
    host_x0, host_noise = state["x0"].cpu(), state["noise"].cpu()
    x0 = clock.time("to_device", lambda: host_x0.to(device))
    noise = clock.time("to_device", lambda: host_noise.to(device))
    maps = clock.time("batch", lambda: cdm_saliency(unet, state["diffusion"], x0, state["y1"],
                                                    noise_level=settings.noise_level, steps=settings.steps,
                                                    tau=settings.tau, cond_fn=guidance, noise=noise))
    clock.time("postprocess", lambda: saliency_to_mask(maps, options=mask_options, images=host_x0.numpy()))
    flops = _phase_flops(setup, state, settings, x0)

    seconds, calls = clock.seconds, clock.calls
    rows = [dict(phase="UNet forward (both branches, one call per step)", seconds=seconds["unet"],
                 calls=calls["unet"], flops=flops["unet"])]
    if guidance is not None:
        rows += [dict(phase="classifier forward (guidance)", seconds=seconds["classifier_forward"],
                      calls=calls["classifier_forward"], flops=flops["classifier_forward"]),
                 dict(phase="classifier backward (guidance gradient)",
                      seconds=seconds["guidance"] - seconds["classifier_forward"], calls=calls["guidance"],
                      flops=flops["guidance"] - flops["classifier_forward"])]
    rest = seconds["batch"] - seconds["unet"] - seconds["guidance"]
    rows += [dict(phase="sampler arithmetic and map accumulation", seconds=rest, calls=settings.steps, flops=None),
             dict(phase="post-processing (smoothing, Otsu)", seconds=seconds["postprocess"], calls=1, flops=None),
             dict(phase="data to the device", seconds=seconds["to_device"], calls=calls["to_device"], flops=None)]
    return rows, maps


def _phase_flops(setup, state, settings, x0):
    """FLOPs of the batch's UNet calls, classifier forward passes and guidance calls, counted on one call of
    each shape (R UNet calls on the stacked branches; the first guidance call on the B shared images)."""
    steps, batch = settings.steps, len(x0)
    x = x0.repeat(2, 1, 1, 1)
    t = torch.full((2 * batch,), noise_step(settings.noise_level, state["diffusion"].num_timesteps), device=x.device)
    y = torch.cat([state["y1"], torch.zeros_like(state["y1"])])
    with torch.no_grad():
        unet, _ = benchmarks.count_flops(lambda: setup.model(x, t, y=y))
    flops = {"unet": steps * unet, "classifier_forward": 0, "guidance": 0}
    if settings.classifier_scale:
        forward_all, gradient_all = _gradient_flops(setup.classifier, x, t)
        forward_shared, gradient_shared = _gradient_flops(setup.classifier, x[:batch], t[:batch])
        flops["classifier_forward"] = (steps - 1) * forward_all + forward_shared
        flops["guidance"] = (steps - 1) * gradient_all + gradient_shared
    return flops


def _gradient_flops(classifier, x, t):
    """FLOPs of the classifier's forward pass and of forward plus input gradient (the guidance) on x.

    Counted with .backward() (the counter does not follow autograd.grad) and the parameters frozen, so
    that, as in the guidance, no weight gradient is computed.
    """
    frozen = [p for p in classifier.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            forward, _ = benchmarks.count_flops(lambda: classifier(x, t))

        def gradient():
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                torch.log_softmax(classifier(x_in, t).float(), dim=-1)[:, 0].sum().backward()

        total, _ = benchmarks.count_flops(gradient)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return forward, total


# ---------------------------------------------------------------------------------------------
# Benchmark variants


@dataclass(frozen=True)
class Variant:
    """One row of the benchmark: a method, its settings and how it runs.

    kind: "batched" (`cdm_saliency`, every branch and image in one UNet call per step), "original"
    (the original code's loop) or "anomaly" (the reconstruction baseline, `settings.noise_level` its
    integer L), on the first `images` of the inputs. levers_off: names of `benchmarks.LEVERS`; the
    original loop always runs with the network and allocator levers off.
    """

    label: str
    settings: OperatingPoint
    kind: str = "batched"
    images: int = 0  # 0: every image of the inputs
    levers_off: tuple = ()
    precision: str = "fp32"
    compile: bool = False
    channels_last: bool = False
    score: bool = True  # Dice against the masks, where the inputs have masks

    def describe(self, num_timesteps):
        s = self.settings
        if self.kind == "anomaly":
            return f"L={int(s.noise_level)} measured, s={s.classifier_scale:g}"
        return describe_point(s, num_timesteps)


ORIGINAL_LEVERS_OFF = ("upsample_copy", "contiguous_attention", "heap_reuse", "shared_first_step")


def prepare_variant(inputs, variant):
    """In a worker process: the state of `variant` on `inputs`, with `run(steps=None)` computing its maps."""
    levers_off = ORIGINAL_LEVERS_OFF if variant.kind == "original" else variant.levers_off
    benchmarks.switch_off(levers_off)
    state = load_inputs(inputs)
    s = variant.settings
    device = state["device"]
    count = variant.images or len(state["x0"])
    x0, y1, noise = state["x0"][:count], state["y1"][:count], state["noise"][:count]
    if variant.kind == "original":
        q = noise_step(s.noise_level, state["diffusion"].num_timesteps)

        def run(steps=None, images=None):
            n = images or count
            return benchmarks.original_style_cgcdm(state["model"], state["diffusion"], state["classifier"], x0[:n],
                                                   q, steps or s.steps, s.tau, s.classifier_scale, noise[:n])
    else:
        setup = prepare_for_inference(state["model"], state["classifier"], precision=variant.precision,
                                      compile=variant.compile, device=device,
                                      reuse_cpu_memory="heap_reuse" not in levers_off)
        if variant.channels_last:
            for net in (state["model"], state["classifier"]):
                net.to(memory_format=torch.channels_last)
        cond_fn = make_classifier_cond_fn(setup.classifier, s.classifier_scale) if s.classifier_scale else None
        if cond_fn is not None and "shared_first_step" in levers_off:
            cond_fn = benchmarks.without_shared_first_step(cond_fn)

        def run(steps=None, images=None):
            if variant.kind == "anomaly":
                return anomaly_saliency(setup.model, state["diffusion"], x0, y1, noise_level=steps or s.noise_level,
                                        cond_fn=cond_fn)
            return cdm_saliency(setup.model, state["diffusion"], x0, y1, noise_level=s.noise_level,
                                steps=steps or s.steps, tau=s.tau, cond_fn=cond_fn, noise=noise)
    masks = state["masks"][:count] if state["masks"] is not None else None
    return dict(run=run, device=device, images=count, masks=masks, x0=x0.cpu().numpy(),
                num_timesteps=state["diffusion"].num_timesteps, warmup_steps=min(2, s.steps))


def time_run(state):
    """(seconds, maps) of one full run of the variant."""
    return benchmarks.timed(state["run"], state["device"])


def score(maps, state, mask_options):
    """Mean Dice of the maps' masks against the variant's reference masks (None without masks)."""
    if state["masks"] is None:
        return None
    masks = saliency_to_mask(maps, options=mask_options, images=state["x0"])
    return float(np.mean([dice(m, g) for m, g in zip(masks, state["masks"])]))


def benchmark(inputs, variants, *, repeats=1, mask_options=None, threads=0, log=print):
    """Time `variants` on `inputs`, each in its own worker, in turns; best of `repeats` rounds.

    Returns one row per variant: label, images, seconds (best round), seconds_per_image, warmup_seconds,
    dice (None without masks or when not scored).
    """
    workers = {}
    try:
        for variant in variants:
            build = functools.partial(prepare_variant, inputs, variant)
            workers[variant.label] = benchmarks.VariantWorker(build, threads=threads)
        warmup = {}
        for variant in variants:
            warmup[variant.label] = workers[variant.label].run(_warm_up_task)
            log(f"  {inputs.size} px {variant.label}: warmed up in {warmup[variant.label]:.1f} s")
        best = {v.label: (float("inf"), None) for v in variants}
        for _ in range(repeats):
            for variant in variants:
                seconds, maps = workers[variant.label].run(time_run)
                if seconds < best[variant.label][0]:
                    best[variant.label] = (seconds, maps)
        rows = []
        for variant in variants:
            seconds, maps = best[variant.label]
            info = workers[variant.label].run(_describe_task)
            dice_value = None
            if variant.score:
                dice_value = workers[variant.label].run(functools.partial(_score_task, maps, mask_options))
            rows.append(dict(size=inputs.size, label=variant.label, images=info["images"], seconds=seconds,
                             seconds_per_image=seconds / info["images"], warmup_seconds=warmup[variant.label],
                             dice=dice_value, settings=variant.describe(info["num_timesteps"]),
                             kind=variant.kind, levers_off=list(variant.levers_off), precision=variant.precision,
                             compile=variant.compile, channels_last=variant.channels_last))
        return rows
    finally:
        for worker in workers.values():
            worker.close()


def _warm_up_task(state):
    """Two untimed steps (one when R = 1) on the variant's batch shapes, the shared first step's and a
    later step's (the original loop: one image); their seconds, compilation included."""
    seconds, _ = benchmarks.timed(lambda: state["run"](steps=state["warmup_steps"], images=1), state["device"])
    return seconds


def _describe_task(state):
    return {"images": state["images"], "num_timesteps": state["num_timesteps"]}


def _score_task(maps, mask_options, state):
    return score(maps, state, mask_options)
