"""Train the noise-conditioned classifier that guides CG-CDM (--model_type encoder|resnet18|resnet50|resnet101).

Images are noised with the DDPM's own diffusion: pass --diffusion_config pointing at the DDPM's
args.json so that T, the schedule and the timestep scaling agree (a typed flag that disagrees is an
error). Validation (accuracy and AUROC, overall and per quarter of the noise range) goes to
progress.csv every --eval_interval steps. Example:

    CLASSIFIER_FLAGS="--model_type encoder --classifier_width 32 --classifier_depth 1 --classifier_num_head_channels 32"
    TRAIN_FLAGS="--iterations 3000 --batch_size 16 --lr 3e-4 --anneal_lr True --save_interval 1000"
    python scripts/classifier_tumor_train.py --dataset demo --src_dir data/demo/slices \\
        --save_dir runs/demo_classifier --diffusion_config runs/demo_ddpm/args.json \\
        $CLASSIFIER_FLAGS $TRAIN_FLAGS

Several GPUs: prefix with `mpiexec -n 4` or use `torchrun --nproc_per_node 4`.
"""

from guided_diffusion.cli import run_main
from guided_diffusion.train_cli import classifier_main


def main(argv=None):
    return classifier_main(argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    run_main(main)
