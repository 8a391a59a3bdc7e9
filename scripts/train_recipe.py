"""From a folder of raw subjects to a model folder: prepare, DDPM, classifier, ablation, validation, export.

    python scripts/train_recipe.py --input_dir /data/BraTS2021 --preset paper --work_dir runs/brats_recipe

See `python scripts/train_recipe.py --help` and guided_diffusion/recipe.py.
"""

from guided_diffusion.cli import run_main
from guided_diffusion.recipe import main

if __name__ == "__main__":
    run_main(main)
