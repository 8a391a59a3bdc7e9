"""Draw images from a trained class-conditional DDPM (ancestral DDPM or DDIM).

Example:
    python scripts/image_tumor_sample.py --model_path runs/diff_brats/model010000.pt \
        --num_samples 64 --batch_size 16 --use_ddim True --timestep_respacing ddim50

Writes samples_{N}x{H}x{W}x{C}.npz (arr_0: uint8 images, arr_1: labels) and a labelled PNG grid into
--save_dir (default: a samples/ folder next to the checkpoint). Under `mpiexec -n K` each process draws
its share and rank 0 writes the files.
"""

from guided_diffusion.cli import run_main
from guided_diffusion.sampling import sample_main


def main(argv=None):
    sample_main(argv, guided=False)


if __name__ == "__main__":
    run_main(main)
