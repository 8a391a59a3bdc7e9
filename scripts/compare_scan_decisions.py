"""Whole-scan decisions (the slice gate, the 3-D rule) side by side on scans with references.

See `python scripts/compare_scan_decisions.py --help` and guided_diffusion/segment/compare_command.py.
"""

from guided_diffusion.cli import run_main
from guided_diffusion.segment.compare_command import main

if __name__ == "__main__":
    run_main(main)
