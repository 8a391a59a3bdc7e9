"""The results table on the demo data: every method on the validation split, beside the paper's Table 1.

Run scripts/ablation.py first (it chooses the settings on the training split). See
`python scripts/demo_results.py --help` and guided_diffusion/segment/results.py.
"""

from guided_diffusion.cli import run_main
from guided_diffusion.segment.study_command import results_main

if __name__ == "__main__":
    run_main(results_main)
