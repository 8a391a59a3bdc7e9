"""Equal-compute comparison of DDPM training ranges (--max_noise_level 1, 0.25, 0.1).

Run `python scripts/train_demo.py --noise_range_study True` first. See --help.
"""

from guided_diffusion.cli import run_main
from guided_diffusion.segment.study_command import noise_range_main

if __name__ == "__main__":
    run_main(noise_range_main)
