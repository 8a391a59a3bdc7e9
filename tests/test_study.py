"""scripts/ablation.py and scripts/demo_results.py end to end on tiny checkpoints (guided_diffusion.segment.study)."""

import json
import os
import shutil

import numpy as np
import pytest

from guided_diffusion.cli import UserError
from guided_diffusion.segment import command, study_command
from guided_diffusion.segment.scan_decision import candidate_decisions
from guided_diffusion.segment.study import best_point
from guided_diffusion.volumes import SliceOptions, export_slice_dataset
from test_image_p_seg import write_classifier, write_model, write_subject


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    cases = [write_subject(str(root / "raw"), f"S{i}", i) for i in range(3)]
    slices = str(root / "slices")
    export_slice_dataset(cases, slices, SliceOptions(image_size=32, min_lesion_pixels=4), input_dir=str(root / "raw"),
                         val_fraction=0.34, seed=0)
    models = root / "models"
    for name, writer in (("ddpm", write_model), ("classifier", write_classifier), ("resnet18", write_classifier)):
        source = writer(str(root / f"train_{name}"))
        os.makedirs(models / name)
        shutil.copyfile(source, models / name / "model.pt")
        shutil.copyfile(os.path.join(os.path.dirname(source), "args.json"), models / name / "args.json")
    return dict(root=root, slices=slices, models=str(models))


GRID = ["--noise_levels", "0.1,0.2", "--record_steps", "1,3", "--taus", "0,0.95", "--scales", "0,10"]


def test_ablation_points_match_direct_runs_and_choices_follow_the_rows(demo_like, tmp_path):
    out = tmp_path / "study"
    study_command.ablation_main(["--models", demo_like["models"], "--src_dir", demo_like["slices"], "--max_images", "3",
                                 "--batch_size", "2", "--out_dir", str(out), *GRID])
    rows = json.loads((out / "ablation.json").read_text())
    # R sweep: 2 Q x 2 methods x 2 R x 2 tau; tau sweep: 2 methods x 2 tau; s sweep: 2 s x 2 tau;
    # noise draws: K = 2, 5 x R = 1, 2 at the best point's tau
    assert len(rows) == 16 + 4 + 4 + 4
    assert {r["method"] for r in rows} == {"cg-cdm", "cdm"}
    draws = [r for r in rows if r["sweep"] == "noise_draws"]
    assert sorted((r["noise_draws"], r["steps"], r["passes"]) for r in draws) == [(2, 1, 2), (2, 2, 4), (5, 1, 5),
                                                                                   (5, 2, 10)]
    chosen = json.loads((out / "selection.json").read_text())
    best = best_point(rows, "dice", "cg-cdm", max_steps=10)
    assert chosen["mask_tuned_best"]["training_dice"] == best["dice"] and chosen["n_training_images"] == 3
    # the cheapest point within the tolerance of the best Dice
    cg = [r for r in rows if r["method"] == "cg-cdm" and r["steps"] <= 10]
    standard_error = best["dice_std"] / np.sqrt(best["n_images"])  # the one-standard-error rule
    assert chosen["tolerance"] == "se" and chosen["tolerance_dice"] == pytest.approx(standard_error)
    good = [r for r in cg if r["dice"] >= best["dice"] - standard_error]
    assert chosen["mask_tuned"]["passes"] == min(r["steps"] * r["noise_draws"] for r in good)
    assert chosen["mask_tuned"]["training_dice"] >= best["dice"] - standard_error
    # label free: the criterion of highest Spearman rho with Dice across the CG-CDM points, then the one-SE rule
    rhos, criterion = chosen["label_free_criteria"], chosen["label_free"]["criterion"]
    assert {"separability", "separability_pp", "draw_agreement", "compact_agreement", "faithfulness"} <= set(rhos)
    eligible = {k: v for k, v in rhos.items() if v is not None and all(r.get(k) is not None for r in cg)}
    if eligible:
        assert criterion in eligible and eligible[criterion] == max(eligible.values())
    else:
        assert criterion == "separability"
    assert chosen["label_free"]["training_dice"] == best_point(rows, criterion, "cg-cdm", 10, "se")["dice"]
    assert chosen["label_free_by_criterion"]["separability"]["training_dice"] == best_point(
        rows, "separability", "cg-cdm", 10, "se")["dice"]
    detection = chosen["detection"]
    assert 0 <= detection["threshold"] <= 1 and detection["n_training_images"] == detection["n_positive"] + detection["n_negative"]
    assert detection["n_positive"] > 0 and detection["n_negative"] > 0
    assert chosen["mask_tuned_any_steps"]["training_dice"] == max(r["dice"] for r in rows if r["method"] == "cg-cdm")
    # the whole-scan decision: every candidate scored on the training subjects' scans, the best one recorded
    decisions = chosen["scan_decisions"]
    assert decisions["n_scans"] == 2 and len(decisions["subjects"]) == 2  # S0..S2, one in validation
    for name, key in (("mask_tuned", "dice"), ("label_free", "label_score")):
        candidates = json.loads((out / "scan_decisions.json").read_text())[name]
        assert len(candidates) == len(candidate_decisions()) + 1 and candidates[0]["rule"] == "slices"
        assert candidates[0]["threshold"] == detection["threshold"]
        best_row = max(candidates, key=lambda r: r[key])
        assert {k: chosen[name]["scan_decision"][k] for k in best_row if k in chosen[name]["scan_decision"]} == \
            {k: v for k, v in best_row.items() if k in chosen[name]["scan_decision"]}
        rho = decisions["label_score_spearman"][name]
        assert rho is None or -1 <= rho <= 1  # None: one of the scores is the same for every candidate
    assert (out / "ablation.png").stat().st_size > 10000
    # one point of the R sweep (partial sums of a 3-step run) equals a direct 1-step image_p_seg run
    point = next(r for r in rows if r["sweep"] == "steps" and r["steps"] == 1 and r["tau"] == 0.0
                 and r["classifier_scale"] == 10.0 and r["noise_level"] == 0.2)
    direct = tmp_path / "direct"
    command.main(["--method", "cg-cdm", "--model_path", os.path.join(demo_like["models"], "ddpm", "model.pt"),
                  "--classifier_path", os.path.join(demo_like["models"], "classifier", "model.pt"),
                  "--src_dir", demo_like["slices"], "--split", "training", "--max_images", "3", "--noise_level", "0.2",
                  "--steps", "1", "--tau", "0", "--batch_size", "3", "--out_dir", str(direct)])
    summary = json.loads((direct / "summary.json").read_text())
    assert summary["variants"]["tau_0"]["otsu"]["dice_mean"] == pytest.approx(point["dice"], abs=1e-6)


def test_results_table_runs_every_row_on_the_validation_split(demo_like, tmp_path):
    study = tmp_path / "study"
    study_command.ablation_main(["--models", demo_like["models"], "--src_dir", demo_like["slices"], "--max_images", "2",
                                 "--batch_size", "2", "--out_dir", str(study), *GRID])
    out = tmp_path / "results"
    study_command.results_main(["--models", demo_like["models"], "--selection", str(study / "selection.json"),
                                "--src_dir", demo_like["slices"], "--out_dir", str(out), "--batch_size", "4",
                                "--fast_stride", "5", "--rows", "cg-cdm,cg-cdm-paper,cdm,anomaly,gradcam"])
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 4 + 5 and table[0].startswith("4 validation tumour slices")
    assert "| 0.563 |" in table[4] and "| 0.235 |" in table[8] and table[7].endswith("| - | - |")
    for key in ("cg-cdm", "cdm", "gradcam"):
        (variant,) = json.loads((out / key / "summary.json").read_text())["variants"].values()
        assert f"{variant['otsu']['dice_mean']:.3f}" in "".join(table)
    with pytest.raises(UserError, match="--rows"):
        study_command.results_main(["--models", demo_like["models"], "--selection", str(study / "selection.json"),
                                    "--src_dir", demo_like["slices"], "--rows", "magic"])
    with pytest.raises(UserError, match="--selection"):
        study_command.results_main(["--models", demo_like["models"], "--selection", str(tmp_path / "none.json")])
    assert np.isfinite(json.loads((study / "selection.json").read_text())["mask_tuned"]["training_dice"])


def test_noise_range_table_reports_each_checkpoint(demo_like, tmp_path):
    ddpm = os.path.join(demo_like["models"], "ddpm", "model.pt")
    out = tmp_path / "noise_range.md"
    study_command.noise_range_main(["--checkpoints", f"a:{ddpm},b:{ddpm}", "--classifier_path",
                                    os.path.join(demo_like["models"], "classifier", "model.pt"), "--src_dir",
                                    demo_like["slices"], "--max_images", "2", "--val_images", "4", "--out", str(out)])
    lines = out.read_text().splitlines()
    assert lines[2].startswith("| run | trained on t < | eps-MSE at Q | Dice tau 0 | Dice tau 0.95 |")
    assert lines[4].split("|")[2:] == lines[5].split("|")[2:]  # the same checkpoint twice: the same numbers
    assert float(lines[4].split("|")[3]) > 0
    with pytest.raises(UserError, match="--checkpoints"):
        study_command.noise_range_main(["--checkpoints", f"a:{tmp_path / 'none.pt'}"])


def test_best_point_respects_the_method_and_the_step_cap():
    rows = [{"method": "cg-cdm", "steps": 50, "dice": 0.9}, {"method": "cg-cdm", "steps": 10, "dice": 0.7},
            {"method": "cg-cdm", "steps": 5, "dice": 0.7}, {"method": "cdm", "steps": 10, "dice": 0.95}]
    assert best_point(rows, "dice", "cg-cdm") is rows[0]
    assert best_point(rows, "dice", "cg-cdm", max_steps=10) is rows[2]  # a tie goes to fewer steps
    assert best_point(rows, "dice") is rows[3]


def test_best_point_within_a_tolerance_takes_the_fewest_passes():
    rows = [{"method": "cg-cdm", "steps": 10, "dice": 0.644}, {"method": "cg-cdm", "steps": 1, "dice": 0.643},
            {"method": "cg-cdm", "steps": 1, "noise_draws": 5, "dice": 0.650},
            {"method": "cg-cdm", "steps": 2, "dice": 0.630}]
    assert best_point(rows, "dice", "cg-cdm") is rows[2]
    assert best_point(rows, "dice", "cg-cdm", tolerance=0.01) is rows[1]  # 1 pass, 0.007 below the best
    assert best_point(rows, "dice", "cg-cdm", tolerance=0.005) is rows[2]  # 5 passes beat 10
    assert best_point(rows, "dice", "cg-cdm", tolerance=1.0) is rows[1]  # ties in passes: the higher Dice
    for row, std in zip(rows, (0.1, 0.1, 0.04, 0.1)):
        row.update(dice_std=std, n_images=16)
    assert best_point(rows, "dice", "cg-cdm", tolerance="se") is rows[1]  # 0.007 below, within 0.04 / 4
    rows[2]["dice_std"] = 0.02
    assert best_point(rows, "dice", "cg-cdm", tolerance="se") is rows[2]  # 0.005: only the best itself


def test_the_detection_threshold_maximises_balanced_accuracy_on_training_labels():
    from guided_diffusion.segment.detect import choose_threshold, detection_scores

    probability = np.array([0.1, 0.2, 0.35, 0.4, 0.6, 0.7, 0.9])
    labels = np.array([0, 0, 0, 1, 0, 1, 1])
    threshold = choose_threshold(probability, labels)
    assert 0.35 < threshold <= 0.4  # the single split with balanced accuracy (3/3 + 3/4) / 2
    scores = detection_scores(probability, labels, threshold)
    assert scores["sensitivity"] == 1.0 and scores["specificity"] == 0.75
    assert scores["auroc"] == pytest.approx(11 / 12)  # 11 of 12 positive-negative pairs ordered
    perfect = choose_threshold([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert 0.2 < perfect < 0.8
    with pytest.raises(ValueError, match="both labels"):
        choose_threshold([0.1, 0.2], [1, 1])
