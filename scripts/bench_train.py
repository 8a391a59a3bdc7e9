"""Training throughput (images/s) and peak memory of the DDPM TrainLoop, variants side by side.

Configurations: `demo` (64 px, 32 channels, 1 res block, attention at 16 and 8 px, batch 16) and
`brats` (224 px, the BraTS-sized network at a small batch). Variants: `default` (what the scripts
do: fp32 on CPU, `--amp auto` on GPU), `channels_last`, `explicit_attention` (softmax(QK^T)V
written out instead of the fused scaled_dot_product_attention), `compile` (torch.compile, with
--compile) and, on a GPU, `amp_none` and `fp16`.

Throughput: all variants of a configuration live in one process and are timed in turns
(round-robin, best round reported), so that load from other programs hits them alike. Peak
memory (GPU: max allocated; CPU: peak resident set) is measured for each variant in a fresh
process, so that it is its own. Each configuration's UNet forward pass (eval, no autograd, the
training batch) is also given in GFLOP/s, its FLOPs counted by torch.utils.flop_counter, beside a
2048 x 2048 float32 matrix product measured in the same run. Example:

    python scripts/bench_train.py --configs demo,brats --steps 5 --repeats 3
"""

import argparse
import multiprocessing
import os
import resource
import tempfile
import time

CONFIGS = {
    "demo": dict(model=dict(image_size=64, num_channels=32, num_res_blocks=1, channel_mult="1,2,2,2",
                            attention_resolutions="16,8", num_heads=4), batch_size=16),
    "brats": dict(model=dict(image_size=224, num_channels=64, num_res_blocks=2, attention_resolutions="28,14",
                             num_heads=4), batch_size=2),
}
CPU_VARIANTS = ("default", "channels_last", "explicit_attention")
GPU_VARIANTS = ("default", "channels_last", "explicit_attention", "amp_none", "fp16")


def explicit_attention(q, k, v):
    """softmax(q^T k / sqrt(d)) v for (N, heads, d, T) tensors, without the fused kernel."""
    import torch

    scale = q.shape[-2] ** -0.5
    weights = torch.einsum("nhct,nhcs->nhts", q * scale, k).softmax(dim=-1)
    return torch.einsum("nhts,nhcs->nhct", weights, v)


class Variant:
    """A TrainLoop for one configuration and variant, with a fixed batch, ready to time."""

    def __init__(self, config_name, variant, save_dir):
        import torch

        from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
        from guided_diffusion.train.loop import TrainLoop

        spec = CONFIGS[config_name]
        config = {**model_and_diffusion_defaults(), **spec["model"]}
        torch.manual_seed(0)
        model, diffusion = create_model_and_diffusion(**config)
        if variant == "compile":
            model.forward = torch.compile(model.forward)
        amp = {"amp_none": "none", "fp16": "fp16"}.get(variant, "auto")
        self.variant = variant
        self.batch_size = spec["batch_size"]
        self.image_size = config["image_size"]
        self.loop = TrainLoop(model=model, diffusion=diffusion, data=iter(()), batch_size=self.batch_size,
                              lr=1e-4, save_dir=save_dir, amp=amp, channels_last=variant == "channels_last",
                              progress=False)
        self.images = torch.randn(self.batch_size, config["in_channels"], self.image_size, self.image_size)
        self.cond = {"y": torch.arange(self.batch_size) % 2}

    def run(self, steps):
        """Seconds for `steps` training steps."""
        import torch

        from guided_diffusion import unet_blocks

        with unet_blocks.kernels(attention=explicit_attention if self.variant == "explicit_attention" else None):
            start = time.perf_counter()
            for _ in range(steps):
                self.loop.run_step(self.images, self.cond)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter() - start


def forward_rate(config_name, repeats):
    """(GFLOP of one forward pass of the configuration's batch, seconds of it, best of `repeats`)."""
    import torch

    from guided_diffusion.bench.benchmarks import count_flops, timed
    from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    spec = CONFIGS[config_name]
    config = {**model_and_diffusion_defaults(), **spec["model"]}
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    batch, size = spec["batch_size"], config["image_size"]
    x = torch.randn(batch, config["in_channels"], size, size, device=device)
    t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
    y = torch.arange(batch, device=device) % 2
    with torch.no_grad():
        flops, _ = count_flops(lambda: model(x, t, y=y))
        timed(lambda: model(x, t, y=y), device)
        seconds = min(timed(lambda: model(x, t, y=y), device)[0] for _ in range(repeats))
    return flops / 1e9, seconds


def peak_memory(config_name, variant, threads, queue):
    """In a fresh process: MiB at the peak of two training steps of one variant."""
    import torch

    from guided_diffusion import logger

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        logger.configure(tmp, format_strs=[])
        Variant(config_name, variant, tmp).run(2)
    if torch.cuda.is_available():
        queue.put(torch.cuda.max_memory_allocated() / 2**20)
    else:
        queue.put(peak_rss_mib())


def peak_rss_mib():
    """Peak resident set of this process. VmHWM, unlike ru_maxrss, is not inherited across fork+exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="demo,brats", help="comma-separated: demo, brats")
    parser.add_argument("--variants", default="", help="comma-separated variants (default: all for the device)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per variant; the best is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads per process")
    parser.add_argument("--skip_memory", action="store_true", help="time only; no per-variant memory processes")
    args = parser.parse_args()

    import torch

    from guided_diffusion import logger

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    variants = [v for v in args.variants.split(",") if v] or list(GPU_VARIANTS if cuda else CPU_VARIANTS)
    if args.compile and "compile" not in variants:
        variants.append("compile")
    device = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} threads"
    print(f"device: {device}; torch {torch.__version__}; best of {args.repeats} rounds of {args.steps} steps "
          f"after {args.warmup} warm-up, variants in turns")
    memory = "peak GPU MiB" if cuda else "peak RSS MiB"
    print(f"{'config':<7} {'size':>4} {'batch':>5}  {'variant':<19} {'images/s':>9} {'vs default':>10} {memory:>13}")
    from guided_diffusion.bench.benchmarks import matmul_flops_per_second

    matmul = matmul_flops_per_second(torch.device("cuda" if cuda else "cpu")) / 1e9
    context = multiprocessing.get_context("spawn")
    forward_lines = []
    with tempfile.TemporaryDirectory() as tmp:
        logger.configure(tmp, format_strs=[])
        for config_name in [c for c in args.configs.split(",") if c]:
            runs = {v: Variant(config_name, v, tmp) for v in variants}
            for run in runs.values():
                run.run(args.warmup)
            best = {v: float("inf") for v in variants}
            for _ in range(args.repeats):
                for v, run in runs.items():
                    best[v] = min(best[v], run.run(args.steps))
            batch, size = runs[variants[0]].batch_size, runs[variants[0]].image_size
            del runs
            baseline = args.steps * batch / best[variants[0]]
            for v in variants:
                peak = float("nan")
                if not args.skip_memory:
                    queue = context.Queue()
                    proc = context.Process(target=peak_memory, args=(config_name, v, args.threads, queue))
                    proc.start()
                    proc.join()
                    peak = queue.get() if proc.exitcode == 0 else float("nan")
                rate = args.steps * batch / best[v]
                print(f"{config_name:<7} {size:>4} {batch:>5}  {v:<19} {rate:>9.2f} {rate / baseline:>9.2f}x "
                      f"{peak:>13.0f}", flush=True)
            gflop, seconds = forward_rate(config_name, args.repeats)
            forward_lines.append(f"{config_name:<7} {size:>4} {batch:>5}  UNet forward {gflop:.1f} GFLOP in "
                                 f"{seconds:.3f} s: {gflop / seconds:.0f} GFLOP/s = {gflop / seconds / matmul:.0%} "
                                 f"of the matmul's")
    print(f"forward passes (eval, no autograd); 2048 x 2048 float32 matmul: {matmul:.0f} GFLOP/s")
    for line in forward_lines:
        print(line)


if __name__ == "__main__":
    main()
