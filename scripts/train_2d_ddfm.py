"""Train the class-conditional DDPM on abdominal CT slices (Synapse / BTCV, 128 px).

--src_dir is either the slice layout of `scripts/prepare_synapse.py` (as for BraTS:
SRC_DIR/training/{normal,tumor}/, where `tumor` means the organ chosen there is present) or a
folder of the original code's `.npy` volumes (Z, 2, H, W), labelled here by --class_index.
Example:

    MODEL_FLAGS="--num_channels 64 --num_res_blocks 2"
    TRAIN_FLAGS="--batch_size 8 --max_steps 100000 --save_interval 1000"
    python scripts/train_2d_ddfm.py --src_dir data/synapse/slices --save_dir runs/synapse_ddpm \\
        $MODEL_FLAGS $TRAIN_FLAGS

Several GPUs: prefix with `mpiexec -n 4` or use `torchrun --nproc_per_node 4`.
"""

from guided_diffusion.cli import run_main
from guided_diffusion.train_cli import ddpm_main


def main(argv=None):
    return ddpm_main(argv, description=__doc__.split("\n\n")[0], dataset="synapse", save_dir="runs/ddpm_2d",
                     class_index="1")


if __name__ == "__main__":
    run_main(main)
