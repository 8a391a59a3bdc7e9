"""Render Algorithm 1 (CDM / CG-CDM saliency, as this code implements it) to pseudo_code.png.

Uses matplotlib's mathtext (no LaTeX install) and the Agg backend; the PNG
carries no version or date metadata, so re-running gives the same file.

    python scripts/render_pseudo_code.py [--output pseudo_code.png] [--dpi 150]
"""

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from guided_diffusion.cli import UserError, atomic_path, run_main  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TITLE = r"Algorithm 1: CDM / CG-CDM saliency as implemented"

# (label, text): a label starts a header entry, an empty label continues the previous one.
HEADER = [
    ("Input:", r"image $x_0$ with label $y_1$;  healthy label $y_0$;  noise level $Q$;  number of steps $R$;"
               r"  mixing weight $\tau$;  guidance scale $s$;"),
    ("", r"noise predictor $\epsilon_\theta(x, t, c)$ with label embedding $e(\cdot)$;"
         r"  noise-conditioned classifier $p_\phi(y \mid x, t)$"),
    ("Output:", r"saliency map $m$ and mask $M$"),
]

# (indent level, statement, comment); line numbers are added when drawing.
BODY = [
    (0, r"$\epsilon \sim \mathcal{N}(0, I)$;   "
        r"$x_Q \leftarrow \sqrt{\bar\alpha_Q}\, x_0 + \sqrt{1 - \bar\alpha_Q}\, \epsilon$",
     r"one draw: closed form of $Q$ noising steps of size $\sqrt{\beta_t}$"),
    (0, r"$x'_Q \leftarrow x_Q$;   $a \leftarrow 0$", r"both branches start from the same $x_Q$"),
    (0, r"for $t = Q,\ Q - \Delta,\ \ldots,\ Q - (R-1)\Delta$ do",
     r"$R$ deterministic DDIM steps ($\eta = 0$)"),
    (1, r"$t_{\mathrm{next}} \leftarrow t - \Delta$", r"the next lower step"),
    (1, r"$\hat\epsilon_1 \leftarrow \epsilon_\theta(x_t,\, t,\, e(y_1))$;   "
        r"$\hat\epsilon_0 \leftarrow \epsilon_\theta(x'_t,\, t,\, \tau\, e(y_1) + (1 - \tau)\, e(y_0))$",
     r"one batched call"),
    (1, r"if CG-CDM then", r"CDM skips lines 7-8"),
    (2, r"$\hat\epsilon_1 \leftarrow \hat\epsilon_1 - \sqrt{1 - \bar\alpha_t}\; s\;"
        r" \nabla_{x_t} \log p_\phi(y_1 \mid x_t, t)$", r"toward the label $y_1$"),
    (2, r"$\hat\epsilon_0 \leftarrow \hat\epsilon_0 - \sqrt{1 - \bar\alpha_t}\; s\;"
        r" \nabla_{x'_t} \log p_\phi(y_0 \mid x'_t, t)$", r"toward the healthy label $y_0$"),
    (1, r"$x_{t_{\mathrm{next}}} \leftarrow \sqrt{\bar\alpha_{t_{\mathrm{next}}}}\, \hat x_0(x_t, \hat\epsilon_1)"
        r" + \sqrt{1 - \bar\alpha_{t_{\mathrm{next}}}}\, \hat\epsilon_1$;   "
        r"$x'_{t_{\mathrm{next}}} \leftarrow$ the same with $x'_t,\, \hat\epsilon_0$",
     r"DDIM update"),
    (2, r"where $\hat x_0(x, \hat\epsilon) = (x - \sqrt{1 - \bar\alpha_t}\, \hat\epsilon) \,/\, \sqrt{\bar\alpha_t}$",
     None),
    (1, r"$a \leftarrow a + (x_{t_{\mathrm{next}}} - x'_{t_{\mathrm{next}}}) \,/\, (1 - \tau)$",
     r"finite difference along the condition"),
    (0, r"end for", None),
    (0, r"$m \leftarrow \Sigma_c\, a_c$;   repeat lines 1-13 for $K$ noise draws and average $m$",
     r"sum over channels; mean over draws"),
    (0, r"optionally $m \leftarrow \max(m, 0)$, then a Gaussian blur of $\sigma$ pixels",
     r"positive part; blur (both off in the paper)"),
    (0, r"$m \leftarrow (m - \min\, m) \,/\, (\max\, m - \min\, m)$", r"per image (constant map: 0)"),
    (0, r"$M \leftarrow m \geq$ Otsu threshold of $m$;   optionally keep the largest 4-connected component",
     r"per image"),
    (0, r"return $m$, $M$", None),
]

FOOTNOTE = [
    r"$\bar\alpha_t = (1 - \beta_1) \cdots (1 - \beta_t)$ on the training chain;  $\Delta$ = spacing of the"
    r" $R$ steps on that chain, 1 by default (the paper's $t = Q \ldots Q - R$).",
    r"Paper defaults: $Q = 400$, $R = 10$, $\tau = 0.95$, $s = 10$, $K = 1$, no positive part, no blur (flags"
    r" --noise_level, --steps,",
    r"--tau, --classifier_scale, --noise_draws, --positive_part, --smooth_sigma).",
    r"The demo's operating point (runs/demo/selection.json, chosen on the training split): $Q = 400$ of $T = 4000$,"
    r" $R = 1$, $\tau = 0$, $s = 1$, $K = 2$, positive part, $\sigma = 1$.",
]

FONT_SIZE = 12
WIDTH_IN = 13.0
LINE_IN = 0.34          # height of one line
MARGIN_IN = 0.3
LABEL_IN = 0.75         # width of the Input:/Output: column
INDENT_IN = 0.35
NUMBER_IN = 0.45        # width of the line-number column
COMMENT_X_IN = 8.1      # comments start here unless the statement is longer
COMMENT_GAP_IN = 0.25


def render(output, dpi):
    """Draw the algorithm and write it to `output` atomically."""
    # Rows: title, header, body, footnote (footnote rows are 0.8 high), plus the gaps added below.
    n_rows = 1.2 + len(HEADER) + 0.15 + len(BODY) + 0.2 + 0.8 * len(FOOTNOTE)
    height_in = 2 * MARGIN_IN + LINE_IN * n_rows
    fig = plt.figure(figsize=(WIDTH_IN, height_in), dpi=dpi, facecolor="white")
    renderer = fig.canvas.get_renderer()
    right_in = WIDTH_IN - MARGIN_IN

    def x_frac(inches):
        return inches / WIDTH_IN

    def y_frac(row):
        return 1 - (MARGIN_IN + LINE_IN * (row + 0.5)) / height_in

    def rule(row, width):
        y = 1 - (MARGIN_IN + LINE_IN * row) / height_in
        fig.add_artist(plt.Line2D([x_frac(MARGIN_IN), x_frac(right_in)], [y, y],
                                  color="black", linewidth=width))

    def put(x_in, row, string, **style):
        drawn = fig.text(x_frac(x_in), y_frac(row), string, va="center", **style)
        if drawn.get_window_extent(renderer).x1 / dpi > right_in:
            raise RuntimeError(f"text overflows the figure: {string!r}")
        return drawn

    text = dict(fontsize=FONT_SIZE, color="black")
    rule(0.0, 1.4)
    put(MARGIN_IN, 0.05, TITLE, fontweight="bold", **text)
    rule(1.05, 0.8)
    row = 1.2
    for label, line in HEADER:
        put(MARGIN_IN, row, label, **text)
        put(MARGIN_IN + LABEL_IN, row, line, **text)
        row += 1
    row += 0.15
    for number, (indent, statement, comment) in enumerate(BODY, start=1):
        put(MARGIN_IN + NUMBER_IN - 0.12, row, f"{number}:", ha="right", **text)
        drawn = put(MARGIN_IN + NUMBER_IN + indent * INDENT_IN, row, statement, **text)
        if comment is not None:
            end_in = drawn.get_window_extent(renderer).x1 / dpi
            put(max(COMMENT_X_IN, end_in + COMMENT_GAP_IN), row, "\u25b7 " + comment,
                fontsize=FONT_SIZE - 1, color="#505050", fontstyle="italic")
        row += 1
    rule(row + 0.1, 1.4)
    row += 0.2
    for line in FOOTNOTE:
        put(MARGIN_IN, row, line, fontsize=FONT_SIZE - 1.5, color="#303030")
        row += 0.8

    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white", metadata={"Software": None})
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join(REPO_ROOT, "pseudo_code.png"),
                        help="PNG file to write (default: pseudo_code.png at the repository root)")
    parser.add_argument("--dpi", type=int, default=150, help="resolution in dots per inch")
    args = parser.parse_args()
    if args.dpi < 50:
        raise UserError(f"--dpi {args.dpi}: use at least 50 for a readable figure")
    render(args.output, args.dpi)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_main(main)
