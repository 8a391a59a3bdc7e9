"""Write a model folder: everything a segmentation needs, in one folder that can be copied anywhere.

    python scripts/export_model.py --ddpm runs/my_ddpm/ema_0.9999_100000.pt \\
        --classifier runs/my_classifier/model020000.pt --dataset_json data/brats/flair \\
        --selection runs/my_study/selection.json --out_dir models/brats_flair

Writes OUT/ddpm/{model.pt,args.json}, OUT/classifier/{model.pt,args.json}, OUT/preprocessing.json (the
training data's preprocessing), OUT/selection.json (paths made relative to the folder or removed),
OUT/model.json and OUT/README.md (the model card), all at once: the folder appears only complete, and
replaces an earlier model folder there (other files in it, such as figures, are kept). Use the EMA
weights of the DDPM (ema_<rate>_<step>.pt): they segment better than the raw ones. Each network is
rebuilt from its args.json and its weights loaded first, so a file of another configuration is an
error naming it. Then:

    python scripts/segment_scans.py --model_dir models/brats_flair --input scan_flair.nii.gz --out_dir masks
"""

import argparse

from guided_diffusion.cli import ArgumentParser, run_main
from guided_diffusion.model_folder import DEFAULT_CHOICE, DEFAULT_METHOD, WEIGHT_KINDS, export_model_folder
from guided_diffusion.script_util import str2bool


def create_argparser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--ddpm", required=True, help="DDPM weights (preferably its EMA, ema_<rate>_<step>.pt) with "
                                                 "args.json beside them")
    p.add_argument("--classifier", required=True,
                   help="noise-conditioned classifier weights with args.json beside them")
    p.add_argument("--dataset_json", required=True,
                   help="dataset.json (or its folder) of the prepared slice dataset the networks were trained on")
    p.add_argument("--selection", default="", help="selection.json of scripts/ablation.py (default: none; the folder "
                                                   "then segments with untuned defaults)")
    p.add_argument("--choice", default=DEFAULT_CHOICE, help="the choice of --selection that --model_dir applies "
                                                            "(default: %(default)s)")
    p.add_argument("--method", default=DEFAULT_METHOD, help="the method that --model_dir runs (default: %(default)s)")
    p.add_argument("--validation", nargs="*", default=[], metavar="SUMMARY",
                   help="summary.json of image_p_seg.py or segment_scans.py runs on held-out data: their scores "
                        "go into the model card")
    for network in ("ddpm", "classifier"):
        p.add_argument(f"--{network}_weights", default="auto", choices=WEIGHT_KINDS,
                       help=f"what the --{network} file holds, for the model card: the EMA or the raw weights "
                            f"(default auto: ema_<rate>_<step>.pt is EMA, model<step>.pt raw)")
    p.add_argument("--half", type=str2bool, default=False,
                   help="store the weights in float16 (half the size; the demo models are shipped so) (default: False)")
    p.add_argument("--out_dir", required=True, help="the model folder to write")
    return p


def main(argv=None):
    args = create_argparser().parse_args(argv)
    export_model_folder(args.out_dir, ddpm=args.ddpm, classifier=args.classifier, dataset_json=args.dataset_json,
                        selection=args.selection or None, validation=args.validation, choice=args.choice,
                        method=args.method, half=args.half,
                        weight_kinds=(args.ddpm_weights, args.classifier_weights))


if __name__ == "__main__":
    run_main(main)
