"""Training throughput (images/s) and peak memory of the DDPM TrainLoop, variants side by side.

Configurations: `demo` (64 px, 32 channels, 1 res block, attention at 16 and 8 px, batch 16) and
`brats` (224 px, the BraTS-sized network at a small batch). Variants: `default` (what the scripts
do: fp32 on CPU, `--amp auto` on GPU), `channels_last`, `explicit_attention` (softmax(QK^T)V
written out instead of the fused scaled_dot_product_attention), `compile` (torch.compile) and, on a
GPU, `amp_none`, `bf16`, `fp16`. Each variant runs in a fresh process so that its peak memory
(GPU: max allocated; CPU: peak resident set) is its own. Example:

    python scripts/bench_train.py --configs demo,brats --steps 10
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
                             num_heads=4), batch_size=4),
}
CPU_VARIANTS = ("default", "channels_last", "explicit_attention")
GPU_VARIANTS = ("default", "channels_last", "explicit_attention", "amp_none", "fp16")


def explicit_attention(q, k, v):
    """softmax(q^T k / sqrt(d)) v for (N, heads, d, T) tensors, without the fused kernel."""
    import torch

    scale = q.shape[-2] ** -0.5
    weights = torch.einsum("nhct,nhcs->nhts", q * scale, k).softmax(dim=-1)
    return torch.einsum("nhts,nhcs->nhct", weights, v)


def measure(config_name, variant, steps, warmup, threads, queue):
    """Run `warmup` + `steps` training steps of one configuration and variant; report through `queue`."""
    import torch

    from guided_diffusion import logger, unet
    from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
    from guided_diffusion.train_util import TrainLoop

    torch.set_num_threads(threads)
    if variant == "explicit_attention":
        unet._attention = explicit_attention
    spec = CONFIGS[config_name]
    config = {**model_and_diffusion_defaults(), **spec["model"]}
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**config)
    if variant == "compile":
        model.forward = torch.compile(model.forward)
    cuda = torch.cuda.is_available()
    amp = {"amp_none": "none", "bf16": "bf16", "fp16": "fp16"}.get(variant, "auto")
    batch_size = spec["batch_size"]
    with tempfile.TemporaryDirectory() as tmp:
        logger.configure(tmp, format_strs=[])
        loop = TrainLoop(model=model, diffusion=diffusion, data=iter(()), batch_size=batch_size, lr=1e-4,
                         save_dir=tmp, amp=amp, channels_last=variant == "channels_last", progress=False)
        size = config["image_size"]
        images = torch.randn(batch_size, config["in_channels"], size, size)
        cond = {"y": torch.arange(batch_size) % 2}
        for _ in range(warmup):
            loop.run_step(images, cond)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            loop.run_step(images, cond)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    if cuda:
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    queue.put(dict(config=config_name, variant=variant, images_per_s=steps * batch_size / seconds,
                   peak_mib=peak_mib, batch=batch_size, size=config["image_size"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="demo,brats", help="comma-separated: demo, brats")
    parser.add_argument("--variants", default="", help="comma-separated variants (default: all for the device)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads per process")
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    variants = [v for v in args.variants.split(",") if v] or list(GPU_VARIANTS if cuda else CPU_VARIANTS)
    if args.compile and "compile" not in variants:
        variants.append("compile")
    device = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} threads"
    print(f"device: {device}; torch {torch.__version__}; {args.steps} timed steps after {args.warmup} warm-up")
    memory = "peak GPU MiB" if cuda else "peak RSS MiB"
    print(f"{'config':<7} {'size':>4} {'batch':>5}  {'variant':<19} {'images/s':>9} {'vs default':>10} {memory:>13}")
    context = multiprocessing.get_context("spawn")
    for config_name in [c for c in args.configs.split(",") if c]:
        baseline = None
        for variant in variants:
            queue = context.Queue()
            proc = context.Process(target=measure, args=(config_name, variant, args.steps, args.warmup,
                                                         args.threads, queue))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                print(f"{config_name:<7} {'':>4} {'':>5}  {variant:<19} failed (exit status {proc.exitcode})")
                continue
            r = queue.get()
            baseline = baseline or r["images_per_s"]
            print(f"{r['config']:<7} {r['size']:>4} {r['batch']:>5}  {r['variant']:<19} {r['images_per_s']:>9.2f} "
                  f"{r['images_per_s'] / baseline:>9.2f}x {r['peak_mib']:>13.0f}", flush=True)


if __name__ == "__main__":
    main()
