"""Train the class-conditional DDPM on BraTS-style slices (or the demo data).

Reads SRC_DIR/training/{normal,tumor}/ and writes model/ema/opt checkpoints, args.json, log.txt,
progress.csv and loss_curve.png into --save_dir. Example (the demo configuration):

    MODEL_FLAGS="--img_size 64 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2,2,2"
    DIFFUSION_FLAGS="--diffusion_steps 4000 --noise_schedule linear"
    TRAIN_FLAGS="--lr 2e-4 --batch_size 16 --ema_rate 0.999 --max_steps 2000 --save_interval 500"
    python scripts/train_tumor_ddfm.py --dataset demo --src_dir data/demo/slices --save_dir runs/demo_ddpm \\
        $MODEL_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS

Several GPUs (data-parallel): `mpiexec -n 4 python scripts/train_tumor_ddfm.py ...` or
`torchrun --nproc_per_node 4 scripts/train_tumor_ddfm.py ...`.
"""

from guided_diffusion.cli import run_main
from guided_diffusion.train_cli import ddpm_main


def main(argv=None):
    return ddpm_main(argv, description=__doc__.split("\n\n")[0], dataset="brats", save_dir="runs/ddpm_tumor")


if __name__ == "__main__":
    run_main(main)
