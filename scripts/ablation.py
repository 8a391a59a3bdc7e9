"""The paper's ablation (Fig. 3) on the training split, and the demo settings chosen there.

See `python scripts/ablation.py --help` and guided_diffusion/segment/study.py.
"""

from guided_diffusion.cli import run_main
from guided_diffusion.segment.study_command import ablation_main

if __name__ == "__main__":
    run_main(ablation_main)
