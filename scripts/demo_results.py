"""The results table on the demo data: every method, the same images, one Markdown file.

1. Chooses tau on tumour slices of the *training* split (never on the validation masks): CG-CDM is
   run once with every candidate tau (all branches share one UNet call per step) and the tau with the
   best mean Dice wins.
2. Runs scripts/image_p_seg.py on the validation tumour slices for CG-CDM (chosen tau and the paper's
   0.95), CDM, the original ancestral CG-Diff variant, the reconstruction (anomaly) baseline and the
   CAM family on the ResNet-50, with the shipped models of runs/demo/.
3. Writes `<out_dir>/results.md` (Dice, IoU, HD95 with and without the largest-component step,
   seconds per image) and `<out_dir>/tau_selection.md`, and prints both.
"""

import argparse
import json
import os

from guided_diffusion.cli import UserError, atomic_write_text, run_main

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))


def image_p_seg(argv):
    """Run scripts/image_p_seg.py in this process (same interpreter, no re-import of torch)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("image_p_seg", os.path.join(SCRIPT_DIR, "image_p_seg.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print("+ image_p_seg.py", " ".join(argv), flush=True)
    module.main(argv)


def read_summary(folder):
    with open(os.path.join(folder, "summary.json")) as f:
        return json.load(f)


def fmt(mean, std, digits=3):
    if mean is None or mean != mean:  # NaN
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table_row(name, summary):
    otsu, lcc = summary["otsu"], summary["largest_component"]
    return (
        f"| {name} | {fmt(otsu['dice_mean'], otsu['dice_std'])} | {fmt(otsu['iou_mean'], otsu['iou_std'])} "
        f"| {fmt(otsu['hd95_mean'], otsu['hd95_std'], 1)} | {fmt(lcc['dice_mean'], lcc['dice_std'])} "
        f"| {fmt(lcc['iou_mean'], lcc['iou_std'])} | {fmt(lcc['hd95_mean'], lcc['hd95_std'], 1)} "
        f"| {summary['seconds_per_image']:.3f} |"
    )


HEADER = (
    "| method | Dice | IoU | HD95 (px) | Dice (LCC) | IoU (LCC) | HD95 (LCC, px) | s / image |\n"
    "|---|---|---|---|---|---|---|---|"
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src_dir", default="data/demo/slices", help="demo slice dataset (make_demo_data.py)")
    parser.add_argument("--models", default="runs/demo", help="folder with ddpm/, classifier/ and resnet50/ models")
    parser.add_argument("--out_dir", default="runs/demo_results", help="where every run and the tables go")
    parser.add_argument("--taus", default="0.95,0.8,0.5,0", help="tau candidates tried on the training split")
    parser.add_argument("--select_images", type=int, default=64, help="training tumour slices used to choose tau")
    parser.add_argument("--max_images", type=int, default=0, help="validation tumour slices per method (0: all)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per batch")
    parser.add_argument("--fast_stride", type=int, default=40,
                        help="chain steps per step for the anomaly and CG-Diff baselines (40: 10 steps from Q=400)")
    parser.add_argument("--methods",
                        default="cg-cdm,cg-cdm-paper,cdm,cg-diff,anomaly,cam,gradcam,gradcam++,layercam,gradcam-encoder",
                        help="rows of the table, in order (scorecam is available but needs one ResNet-50 pass "
                             "per feature channel, 2048 per image)")
    args = parser.parse_args()

    ddpm = os.path.join(args.models, "ddpm", "model.pt")
    classifier = os.path.join(args.models, "classifier", "model.pt")
    resnet = os.path.join(args.models, "resnet50", "model.pt")
    for path in (ddpm, classifier, resnet):
        if not os.path.isfile(path):
            raise UserError(f"--models {args.models}: {path} is missing (scripts/train_demo.py makes it)")
    common = ["--src_dir", args.src_dir, "--batch_size", str(args.batch_size), "--grid_images", "8"]

    # 1. tau on the training split
    selection_dir = os.path.join(args.out_dir, "tau_selection")
    image_p_seg(["--method", "cg-cdm", "--model_path", ddpm, "--classifier_path", classifier, "--split", "training",
                 "--max_images", str(args.select_images), "--tau", args.taus, "--out_dir", selection_dir, *common])
    taus = [t.strip() for t in args.taus.split(",")]
    variants = read_summary(selection_dir).get("variants") or {f"tau_{taus[0]}": read_summary(selection_dir)}
    scored = {v: s["otsu"]["dice_mean"] for v, s in variants.items()}
    best_variant = max(scored, key=lambda v: scored[v])
    best_tau = variants[best_variant]["settings"]["tau"]
    selection = [f"CG-CDM on {args.select_images} tumour slices of the training split, tau candidates {args.taus}:", "",
                 HEADER.replace("| method |", "| tau |")]
    selection += [table_row(str(variants[v]["settings"]["tau"]), variants[v]) for v in variants]
    selection += ["", f"Chosen: tau = {best_tau}."]
    atomic_write_text(os.path.join(args.out_dir, "tau_selection.md"), "\n".join(selection) + "\n")
    print("\n".join(selection), flush=True)

    # 2. every method on the validation split
    runs = {
        "cg-cdm": ("CG-CDM (tau {tau}, s = 10)", ["--method", "cg-cdm", "--model_path", ddpm, "--classifier_path", classifier,
                                                 "--tau", str(best_tau)]),
        "cg-cdm-paper": ("CG-CDM (tau 0.95, paper)", ["--method", "cg-cdm", "--model_path", ddpm,
                                                      "--classifier_path", classifier, "--tau", "0.95"]),
        "cdm": ("CDM (tau {tau}, no guidance)", ["--method", "cdm", "--model_path", ddpm, "--tau", str(best_tau)]),
        "cg-diff": ("CG-Diff (original ancestral variant, 10 steps)", ["--method", "cg-diff", "--model_path", ddpm,
                                                                      "--classifier_path", classifier,
                                                                      "--stride", str(args.fast_stride)]),
        "anomaly": ("Reconstruction baseline (L = 400, 10 + 10 DDIM steps)", ["--method", "anomaly", "--model_path", ddpm,
                                                                              "--classifier_path", classifier,
                                                                              "--stride", str(args.fast_stride)]),
    }
    for cam in ("cam", "gradcam", "gradcam++", "layercam", "scorecam"):
        runs[cam] = (f"{cam} (ResNet-50)", ["--method", cam, "--classifier_path", resnet])
    # At 64 px the ResNet's last stage is 2 x 2; the encoder classifier's is 8 x 8.
    runs["gradcam-encoder"] = ("gradcam (encoder classifier, t = 0)", ["--method", "gradcam", "--classifier_path", classifier])
    rows = [f"Validation tumour slices of {args.src_dir}; per-image metrics, mean ± std.", "", HEADER]
    for key in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if key not in runs:
            raise UserError(f"--methods: unknown row {key!r} (choose from {', '.join(runs)})")
        label, flags = runs[key]
        folder = os.path.join(args.out_dir, key)
        image_p_seg([*flags, "--max_images", str(args.max_images), "--out_dir", folder, *common])
        summary = read_summary(folder)
        rows.append(table_row(label.format(tau=best_tau), summary))
        n_images = summary["n_images"]
    rows[0] = f"{n_images} validation tumour slices of {args.src_dir}; per-image metrics, mean ± std."
    atomic_write_text(os.path.join(args.out_dir, "results.md"), "\n".join(rows) + "\n")
    print("\n".join(rows), flush=True)


if __name__ == "__main__":
    run_main(main)
