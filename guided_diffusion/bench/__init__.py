"""Benchmarks, profiling and the precision check: code that exists for the scripts `bench_seg.py`,
`bench_seg_memory.py`, `bench_train.py`, `profile_seg.py` and `check_gpu.py`, outside the library core.

- `benchmarks`: what they share (the demo networks, timing, FLOPs, the original code's loop, the
  speed levers and the worker processes that switch them off, plain-text tables);
- `timing`: where CG-CDM's time goes (`profile_cgcdm`) and its variants side by side (`benchmark`);
- `precision_check`: the same maps and losses in reduced precision (`check_precisions`).

The library does not import this package; it reaches the networks through their public switches
(`unet_blocks.set_kernels`), never by replacing private functions.
"""
