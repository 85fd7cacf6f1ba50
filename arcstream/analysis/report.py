"""`report.md` in the run directory, with PNG plots drawn by matplotlib (Agg: no display needed).

One section per SAE: the held-out reconstruction metrics, dead/dense counts,
the feature density histogram, the mean-activation vs density scatter, and the
best-labelled features. The plots live in `analysis/` beside `features.json`
and are linked by relative paths, so the folder can be copied as a whole.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from arcstream.io import RunLocation, is_url, join_location


def _save(fig, folder: Any, name: str) -> None:
    """A PNG into `folder` (a RunLocation: local or kvstore URL), atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    folder.write_bytes_atomic(name, buf.getvalue())


def _plots(s, folder: Any) -> dict[str, str]:
    import matplotlib  # here, not at import: matplotlib is slow to import and only the report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    safe = s.site.replace("/", "_")
    files = {}
    hist = s.stats.density_histogram()
    fig, ax = plt.subplots(figsize=(5, 3))
    edges = np.asarray(hist["log10_edges"])
    ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", color="#4a7")
    ax.set_xlabel("log10 feature density")
    ax.set_ylabel("latents")
    ax.set_title(f"{s.site}: density ({hist['dead']} dead)", fontsize=9)
    fig.tight_layout()
    files["density"] = f"density_{safe}.png"
    _save(fig, folder, files["density"])
    plt.close(fig)

    alive = s.stats.fire_count_s > 0
    fig, ax = plt.subplots(figsize=(5, 3))
    if alive.any():
        ax.scatter(np.log10(s.stats.density_s[alive]), s.stats.mean_when_firing_s[alive], s=4, color="#36c")
    ax.set_xlabel("log10 feature density")
    ax.set_ylabel("mean activation when firing")
    ax.set_title(f"{s.site}: density vs activation", fontsize=9)
    fig.tight_layout()
    files["scatter"] = f"density_vs_activation_{safe}.png"
    _save(fig, folder, files["scatter"])
    plt.close(fig)
    return files


def write_report(sites: list, out_dir: str | Path, opts: Any) -> str | Path:
    """Writes `out_dir/report.md` and its PNGs under `out_dir/analysis/` (a local folder or a kvstore URL);
    returns the report's path (a `Path`, or the URL string)."""
    out = RunLocation(out_dir)
    folder = RunLocation(join_location(out_dir, "analysis"))
    lines = ["# arcstream analysis report", "", f"Run: `{opts.run_dir}`", "",
             "Dashboard: [dashboard/index.html](dashboard/index.html); per-feature statistics: "
             "[analysis/features.json](analysis/features.json).", ""]
    for s in sites:
        e, st = s.eval, s.stats
        plots = _plots(s, folder)
        dense = int(st.dense_mask(opts.dense_density).sum())
        lines += [f"## {s.site}", "", f"SAE `{s.sae_folder}` ({s.architecture}, d_in {s.d_in}, d_sae {s.d_sae}); "
                  f"{s.rows} rows analysed.", "",
                  "| held-out rows | L0 | FVU | explained variance | MSE |", "|---|---|---|---|---|",
                  f"| {e['start']}:{e['stop']} ({e['rows']}) | {e['l0']:.3f} | {e['fvu']:.4f} | "
                  f"{e['explained_variance']:.4f} | {e['mse']:.4g} |", "",
                  *([f"CE loss recovered on {e['prompts']} held-out prompts ({e['tokens']} tokens): "
                     f"{e['ce_loss_recovered']:.4f} (clean {e['ce_clean']:.4f}, with the SAE {e['ce_sae']:.4f}, "
                     f"zero-ablated {e['ce_zero']:.4f} nats/token).", ""] if "ce_loss_recovered" in e else []),
                  f"Dead latents (never fired): {int(st.dead_mask().sum())} of {s.d_sae}; dense latents "
                  f"(density > {opts.dense_density}): {dense}.", "",
                  "Across augmentations (" + str(s.invariance_groups) + " tasks with several views): " +
                  ", ".join(f"{c} {sum(1 for v in s.invariance if v['class'] == c)}"
                            for c in ("invariant", "equivariant", "view-dependent", "untested")) + ".", "",
                  f"![density histogram](analysis/{plots['density']})",
                  f"![density vs activation](analysis/{plots['scatter']})", "",
                  "Best-labelled features:", "",
                  "| feature | label | phi | precision | recall | density | across views |",
                  "|---|---|---|---|---|---|---|"]
        order = sorted(range(s.d_sae), key=lambda i: -s.labels[i].phi)[:10]
        for i in order:
            lb = s.labels[i]
            lines.append(f"| {i} | {lb.text} | {lb.phi:.3f} | {lb.precision:.3f} | {lb.recall:.3f} | "
                         f"{st.density_s[i]:.4g} | {s.invariance[i]['class']} |")
        lines.append("")
    out.write_bytes_atomic("report.md", ("\n".join(lines) + "\n").encode("utf-8"))
    path = join_location(out_dir, "report.md")
    return str(path) if is_url(out_dir) else Path(path)
