"""Segment whole NIfTI scans (files or BraTS subject folders) with CDM / CG-CDM; masks in each scan's grid.

See `python scripts/segment_scans.py --help` and guided_diffusion/segment/scans_command.py.
"""

from guided_diffusion.cli import run_main
from guided_diffusion.segment.scans_command import main

if __name__ == "__main__":
    run_main(main)
