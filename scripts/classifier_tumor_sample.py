"""Draw images from a trained DDPM steered by a noise-conditioned classifier (classifier guidance).

Example:
    python scripts/classifier_tumor_sample.py --model_path runs/diff_brats/model010000.pt \
        --classifier_path runs/cls_brats/model005000.pt --classifier_scale 10 --class_label 1

The gradient s * grad log p(y | x_t, t) shifts the mean of each ancestral step, or the predicted noise of
each DDIM step (--use_ddim True). The classifier must have been trained on the DDPM's diffusion
(diffusion_steps, noise_schedule, rescale_timesteps); its args.json is checked against the DDPM's.
Outputs as in image_tumor_sample.py.
"""

from guided_diffusion.cli import run_main
from guided_diffusion.sampling import sample_main


def main(argv=None):
    sample_main(argv, guided=True)


if __name__ == "__main__":
    run_main(main)
