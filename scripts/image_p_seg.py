"""Weakly supervised tumour segmentation with CDM / CG-CDM and baselines, with metrics.

See `python scripts/image_p_seg.py --help` and guided_diffusion/segment/command.py.
"""

from guided_diffusion.cli import run_main
from guided_diffusion.segment.command import main

if __name__ == "__main__":
    run_main(main)
