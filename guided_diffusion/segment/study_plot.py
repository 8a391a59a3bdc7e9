"""ablation.png: the study's rows as one panel per parameter, beside the paper's Fig. 3."""

import textwrap

import numpy as np

from ..files import atomic_path

# Fig. 3 of the paper (BraTS), read off its plots: what our curves are compared with.
PAPER_ABLATION = {
    "steps": "Dice rises with R up to about 50 steps (Q = 400 best of 200, 400, 700; 700 much worse)",
    "tau": "tau = 0.95 best (about 0.60); tau = 0 about 0.33; tau = 0.99 about 0.52",
    "classifier_scale": "s of about 100 best; s = 1000 about 0.47",
}


def _paper(text, width=62):
    return "\n".join(textwrap.wrap("paper: " + text, width))


def _standard_error(row):
    return float(row.get("dice_std", 0.0)) / max(int(row.get("n_images", 1)), 1) ** 0.5


def _sweep_line(ax, rows, x_key, label, color, style="-", x_of=None):
    """One line of mean Dice with standard-error bars against `x_key`."""
    rows = sorted(rows, key=lambda r: r[x_key])
    x = [x_of(r) if x_of else r[x_key] for r in rows]
    ax.errorbar(x, [r["dice"] for r in rows], yerr=[_standard_error(r) for r in rows], fmt=style, marker="o", ms=3,
                capsize=2, lw=1, color=color, label=label)


def plot_ablation(rows, path, correlations=None, criterion=None, chosen=None):
    """One panel per parameter (Q, R, tau, s, noise draws), mean training Dice with standard-error bars, CG-CDM
    solid and CDM dashed, the paper's reading in each title and the chosen point (`chosen`, the mask_tuned
    record) starred where the panel holds it; with `correlations` ({label-free criterion: Spearman rho with
    Dice}) a last panel of them, `criterion` (the label-free choice's) marked."""
    from matplotlib.figure import Figure

    panels = 5 + bool(correlations)
    fig = Figure(figsize=(3.6 * panels, 4.2), dpi=100)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    colors = {"cg-cdm": "C0", "cdm": "C1"}
    styles = {"cg-cdm": "-", "cdm": "--"}
    best = chosen or {}
    steps_rows = [r for r in rows if r["sweep"] == "steps"]
    tau_of_steps = best.get("tau", 0.0) if any(r["tau"] == best.get("tau") for r in steps_rows) else 0.0
    steps_of_q = best.get("steps", 1)
    # Q: Dice vs noise level at the chosen R (or the nearest recorded), tau of the R sweep
    for method in ("cg-cdm", "cdm"):
        part = [r for r in steps_rows if r["method"] == method and r["tau"] == tau_of_steps]
        recorded = sorted({r["steps"] for r in part})
        if not part:
            continue
        r_shown = min(recorded, key=lambda v: abs(v - steps_of_q))
        _sweep_line(axes[0], [r for r in part if r["steps"] == r_shown], "noise_level", f"{method}, R = {r_shown}",
                    colors[method], styles[method])
    axes[0].set(xlabel="noise level Q (fraction of T)", ylabel="Dice (training subset)",
                title=f"Q (tau = {tau_of_steps:g}, s as swept)\n" + _paper("Q = 400 best of 200, 400, 700", 44))
    # R: Dice vs steps at the chosen Q
    q_best = best.get("noise_level", 0.1)
    for method in ("cg-cdm", "cdm"):
        part = [r for r in steps_rows if r["method"] == method and r["tau"] == tau_of_steps
                and abs(r["noise_level"] - q_best) < 1e-9]
        if part:
            _sweep_line(axes[1], part, "steps", method, colors[method], styles[method])
    axes[1].set(xlabel="DDIM steps R", title=f"R (Q = {q_best:g} T, tau = {tau_of_steps:g})\n"
                + _paper("Dice rises with R up to about 50 steps", 44))
    for method in ("cg-cdm", "cdm"):
        part = [r for r in rows if r["sweep"] == "tau" and r["method"] == method]
        if part:
            _sweep_line(axes[2], part, "tau", method, colors[method], styles[method])
    axes[2].set(xlabel="tau", title="tau (Q = 0.1 T, R = 10)\n" + _paper(PAPER_ABLATION["tau"], 44))
    scale_rows = [r for r in rows if r["sweep"] == "classifier_scale"]
    for k, tau in enumerate(sorted({r["tau"] for r in scale_rows})):
        _sweep_line(axes[3], [r for r in scale_rows if r["tau"] == tau], "classifier_scale", f"tau = {tau:g}",
                    f"C{k + 2}", x_of=lambda r: max(r["classifier_scale"], 0.1))
    axes[3].set(xscale="log", xlabel="classifier scale s (s = 0, CDM, at 0.1)",
                title="s (Q = 0.1 T, R = 10)\n" + _paper(PAPER_ABLATION["classifier_scale"], 44))
    draw_rows = [r for r in rows if r["sweep"] == "noise_draws"]
    one_draw = [r for r in steps_rows if r["method"] == "cg-cdm" and abs(r["noise_level"] - q_best) < 1e-9
                and r["tau"] == best.get("tau", 0.0) and r["classifier_scale"] == best.get("classifier_scale")]
    for k, steps in enumerate(sorted({r["steps"] for r in draw_rows})):
        part = [r for r in draw_rows if r["steps"] == steps] + [r for r in one_draw if r["steps"] == steps]
        _sweep_line(axes[4], part, "noise_draws", f"R = {steps}", f"C{k + 4}")
    axes[4].set(xlabel="noise draws K (mean of K maps)", title="noise draws (chosen Q, tau, s)\nnot in the paper")
    if best:
        star = dict(marker="*", ms=12, color="red", zorder=5, ls="none")
        point = (best["noise_level"], best["steps"], best["tau"], best["classifier_scale"], best.get("noise_draws", 1))
        axes[0].plot([point[0]], [best["training_dice"]], label="chosen", **star)
        axes[1].plot([point[1]], [best["training_dice"]], **star)
        axes[3].plot([max(point[3], 0.1)], [best["training_dice"]], **star)
        axes[4].plot([point[4]], [best["training_dice"]], **star)
        if any(r["tau"] == point[2] for r in rows if r["sweep"] == "tau"):
            axes[2].plot([point[2]], [best["training_dice"]], **star)
    if correlations:
        names = list(correlations)
        values = [0.0 if v is None or not np.isfinite(v) else v for v in correlations.values()]
        axes[5].barh(range(len(names)), values, color=["C3" if n == criterion else "C7" for n in names])
        axes[5].set_yticks(range(len(names)), names, fontsize=7)
        axes[5].invert_yaxis()
        axes[5].axvline(0.8, color="gray", ls=":", lw=1)
        axes[5].set(xlim=(-1, 1), xlabel="Spearman rho with Dice",
                    title=f"label-free criteria vs Dice\nchosen: {criterion}")
    for ax in axes:
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="lower right", framealpha=0.6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
