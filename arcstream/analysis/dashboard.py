"""The static feature dashboard: one self-contained HTML file, opened from disk.

No server, no network, no external script or font: the grids are plain HTML
tables drawn in the ten ARC colours, so the page is readable (and testable
with `html.parser`) without running any JavaScript. A few lines of inline
JavaScript add search and sort to the feature list; each feature page is a
`<section>` shown through the URL fragment (`#f-<site>-<index>`, CSS
`:target`), so links work even with scripts off.

Page contract (the tests rely on it):
  - the list is `<table id="features">`, one `<tr class="feature-row">` per
    latent with `data-site`, `data-index`, `data-label`, `data-density`,
    `data-phi`, `data-invariance` (invariance.py's class);
  - a feature page is `<section class="feature" id="f-<site>-<index>">`;
  - a grid is `<table class="grid" data-kind=... data-pair=...>`, a cell
    `<td class="cN">` (N the colour; `cx` unknown), and a cell where the
    feature fires also has class `hit` and `data-a` = activation / the
    example's largest activation (the highlight strength); the top token's
    cell has class `top`.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from arcstream.analysis.stats import ACT_LOG10_EDGES, ATTRIBUTES
from arcstream.data.records import GRID_KIND_NAMES
from arcstream.io import file_location, is_url

# The ten ARC colours (the palette of the ARC testing interface).
ARC_COLOURS = ("#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00", "#AAAAAA", "#F012BE", "#FF851B", "#7FDBFF",
               "#870C25")
_KIND_TITLE = {"train_input": "train input", "train_output": "train output", "test_input": "test input",
               "answer": "answer"}

_CSS = """
body{font-family:system-ui,sans-serif;margin:0;display:flex;height:100vh;color:#222}
#list-pane{width:34em;overflow:auto;border-right:1px solid #ccc;padding:.5em}
#pages{flex:1;overflow:auto;padding:.5em 1em}
#features{border-collapse:collapse;font-size:12px;width:100%}
#features th{cursor:pointer;position:sticky;top:0;background:#eee;text-align:left}
#features td,#features th{padding:2px 4px;border-bottom:1px solid #eee}
#search{width:100%;margin-bottom:.4em}
section.feature{display:none}section.feature:target{display:block}
#intro:target, #intro{display:block}
.example{margin:.6em 0 1.2em;border-top:1px solid #ddd;padding-top:.4em}
.grids{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
figure{margin:0}figcaption{font-size:11px;color:#555}
table.grid{border-collapse:collapse;background:#444}
table.grid td{width:12px;height:12px;padding:0;border:1px solid #444}
table.grid td.hit{box-shadow:inset 0 0 0 3px rgba(255,255,255,var(--a));}
table.grid td.top{outline:2px solid #ff00ff;outline-offset:-1px}
.pair{display:flex;gap:4px;align-items:center;border:1px dashed #bbb;padding:3px}
.muted{color:#777;font-size:12px}
""" + "".join(f"td.c{i}{{background:{c}}}" for i, c in enumerate(ARC_COLOURS)) + \
    "td.cx{background:repeating-linear-gradient(45deg,#666,#666 2px,#999 2px,#999 4px)}"

_JS = """
const q=document.getElementById('search'),tb=document.querySelector('#features tbody');
q.addEventListener('input',()=>{const s=q.value.toLowerCase();for(const r of tb.rows){
 const text=[r.dataset.label,r.dataset.index,r.dataset.site,r.dataset.invariance].join(' ').toLowerCase();
 r.style.display=text.includes(s)?'':'none';}});
let dir={};for(const th of document.querySelectorAll('#features th')){th.addEventListener('click',()=>{
 const k=th.dataset.key,num=th.dataset.type==='num';dir[k]=-(dir[k]||(num?1:-1));
 const rows=[...tb.rows].sort((a,b)=>{const x=a.dataset[k],y=b.dataset[k];
  return dir[k]*(num?(parseFloat(x)-parseFloat(y)):x.localeCompare(y));});
 for(const r of rows)tb.appendChild(r);});}
"""


def page_id(site: str, index: int) -> str:
    return f"f-{site}-{index}"


def _grid_table(grid: dict[str, Any], hits: dict[tuple[int, int], float], top: tuple[int, int] | None) -> str:
    cells = grid["cells"]
    parts = [f'<table class="grid" data-kind="{grid["kind"]}" data-pair="{grid["pair"]}">']
    for r, line in enumerate(cells):
        parts.append("<tr>")
        for c, colour in enumerate(line):
            cls = [f"c{colour}" if colour >= 0 else "cx"]
            attrs = ""
            if (r, c) in hits:
                a = hits[(r, c)]
                cls.append("hit")
                attrs = f' data-a="{a:.3f}" style="--a:{a:.3f}" title="{a:.3f}"'
            if top == (r, c):
                cls.append("top")
            parts.append(f'<td class="{" ".join(cls)}"{attrs}></td>')
        parts.append("</tr>")
    parts.append("</table>")
    return "".join(parts)


def _example_html(ex: dict[str, Any], prompt: dict[str, Any]) -> str:
    peak = max([c[4] for c in ex["cells"]] + [n[2] for n in ex["non_grid"]] + [1e-12])
    by_grid: dict[tuple[int, int], dict[tuple[int, int], float]] = {}
    for kind, pair, r, c, a in ex["cells"]:
        by_grid.setdefault((kind, pair), {})[(r, c)] = a / peak
    top_cell = ex["cell"]
    aug = prompt.get("augmentation") or {}
    aug_text = ", ".join(f"{k}={v}" for k, v in aug.items() if v is not None) if isinstance(aug, dict) else str(aug)
    where = (f"cell ({top_cell[2]}, {top_cell[3]}) of {_KIND_TITLE.get(_kind_name(top_cell[0]), '?')} "
             f"{top_cell[1]}" if top_cell else f"non-grid token id {ex['token_id']}")
    head = (f'<div class="example" data-prompt="{ex["prompt"]}"><div><b>task {html.escape(str(prompt["task_id"]))}'
            f'</b> test {prompt["test_index"]} <span class="muted">prompt {ex["prompt"]}; augmentation '
            f'{html.escape(aug_text)}</span></div><div>top activation <b>{ex["act"]:.4g}</b> at position '
            f'{ex["position"]}, {where}</div>')
    figures = []
    for g in prompt["grids"]:
        key = (g["kind_code"], g["pair"])
        top = (top_cell[2], top_cell[3]) if top_cell and (top_cell[0], top_cell[1]) == key else None
        figures.append(f'<figure><figcaption>{_KIND_TITLE.get(g["kind"], g["kind"])} {g["pair"]}</figcaption>'
                       f'{_grid_table(g, by_grid.get(key, {}), top)}</figure>')
    extra = ""
    if ex["non_grid"]:
        extra = ('<div class="muted">also fires on non-grid tokens (position:token id=activation): ' +
                 ", ".join(f"{p}:{t}={a:.3g}" for p, t, a in ex["non_grid"][:20]) + "</div>")
    return head + f'<div class="grids">{"".join(figures)}</div>{extra}</div>'


def _kind_name(code: int) -> str:
    return GRID_KIND_NAMES.get(code, "?")


def _histogram_svg(counts: list[int] | np.ndarray, width: int = 320, height: int = 60) -> str:
    counts = np.asarray(counts)
    peak = max(int(counts.max()) if counts.size else 0, 1)
    bw = width / max(len(counts), 1)
    bars = "".join(f'<rect x="{i * bw:.1f}" y="{height - height * c / peak:.1f}" width="{bw - 1:.1f}" '
                   f'height="{height * c / peak:.1f}" fill="#4a7"/>' for i, c in enumerate(counts) if c)
    lo, hi = ACT_LOG10_EDGES[0], ACT_LOG10_EDGES[-1]
    return (f'<svg class="hist" width="{width}" height="{height + 14}" xmlns="http://www.w3.org/2000/svg">{bars}'
            f'<text x="0" y="{height + 12}" font-size="10">1e{lo:g}</text><text x="{width - 24}" y="{height + 12}" '
            f'font-size="10">1e{hi:g}</text></svg>')


def _feature_page(site, i: int, s, attrs_top: list[tuple[str, float, float, float]]) -> str:
    st, lb = s.stats, s.labels[i]
    rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{phi:.3f}</td><td>{p:.3f}</td><td>{r:.3f}</td></tr>"
                   for n, phi, p, r in attrs_top)
    examples = "".join(_example_html(ex, s.prompts[ex["prompt"]]) for ex in s.examples.get(i, []))
    return (f'<section class="feature" id="{html.escape(page_id(site, i))}" data-site="{html.escape(site)}" '
            f'data-index="{i}"><h2>{html.escape(site)} #{i}: {html.escape(lb.text)}</h2>'
            f'<p>density {st.density_s[i]:.4g} ({int(st.fire_count_s[i])} of {st.rows} rows), mean when firing '
            f'{st.mean_when_firing_s[i]:.4g}, max {float(st.act_max_s[i]):.4g}; label phi {lb.phi:.3f}, precision '
            f'{lb.precision:.3f}, recall {lb.recall:.3f}</p>'
            f'{_invariance_html(s.invariance[i], s.invariance_groups)}'
            f'<h3>Activation histogram (log10 bins)</h3>{_histogram_svg(st.hist_sb[i])}'
            f'<h3>Best-correlated cell attributes</h3><table><tr><th>attribute = value</th><th>phi</th>'
            f'<th>P(value|fires)</th><th>P(fires|value)</th></tr>{rows}</table>'
            f'<h3>Top activations, whole ARC context</h3>{examples or "<p>no examples</p>"}</section>')


def _invariance_html(inv: dict[str, Any], groups: int) -> str:
    if inv["class"] == "untested":
        return (f'<p class="invariance" data-class="untested">Across augmentations: untested (no view pair of the '
                f'{groups} augmented tasks studied made it fire).</p>')
    return (f'<p class="invariance" data-class="{inv["class"]}">Across augmentations: <b>{inv["class"]}</b> '
            f'(mean Jaccard overlap of firing cells between views of a task: {inv["jaccard_original"]:.2f} on the '
            f'original cells, {inv["jaccard_view"]:.2f} in the view\'s own frame; {inv["view_pairs"]} view pairs '
            f'from {groups} tasks).</p>')


def _top_attributes(s, i: int, phi_sv: np.ndarray, n: int = 6) -> list[tuple[str, float, float, float]]:
    names = [f"{a}={v}" for a, values in ATTRIBUTES.items() for v in values]
    order = np.argsort(-phi_sv[i])[:n]
    f = max(int(s.stats.fire_count_s[i]), 1)
    return [(names[j], float(phi_sv[i, j]), s.stats.attr_fire_sv[i, j] / f,
             s.stats.attr_fire_sv[i, j] / max(int(s.stats.attr_total_v[j]), 1)) for j in order]


def render_dashboard(sites: list, title: str = "") -> str:
    """The whole dashboard as one HTML string (see the module docstring for its structure)."""
    list_rows, pages = [], []
    for s in sites:
        phi_sv = s.stats.phi_sv()
        paged = set(s.dashboard)
        for i in range(s.d_sae):
            lb = s.labels[i]
            d = float(s.stats.density_s[i])
            link = (f'<a href="#{html.escape(page_id(s.site, i))}">{i}</a>' if i in paged else str(i))
            list_rows.append(
                f'<tr class="feature-row" data-site="{html.escape(s.site)}" data-index="{i}" '
                f'data-label="{html.escape(lb.text)}" data-density="{d:.6g}" data-phi="{lb.phi:.4f}" '
                f'data-invariance="{s.invariance[i]["class"]}">'
                f'<td>{html.escape(s.site)}</td><td>{link}</td><td>{html.escape(lb.text)}</td><td>{d:.4g}</td>'
                f'<td>{lb.phi:.3f}</td><td>{s.invariance[i]["class"]}</td></tr>')
        for i in s.dashboard:
            pages.append(_feature_page(s.site, i, s, _top_attributes(s, i, phi_sv)))
    summary = "".join(
        f"<li>{html.escape(s.site)}: {s.architecture}, d_sae {s.d_sae}, {s.rows} rows; held-out L0 "
        f"{s.eval['l0']:.2f}, FVU {s.eval['fvu']:.4f}; dead {int(s.stats.dead_mask().sum())}</li>" for s in sites)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>arcstream features '
            f'{html.escape(title)}</title><style>{_CSS}</style></head><body>'
            f'<div id="list-pane"><input id="search" type="search" placeholder="search label, index, site">'
            f'<table id="features"><thead><tr><th data-key="site">site</th><th data-key="index" data-type="num">#</th>'
            f'<th data-key="label">label</th><th data-key="density" data-type="num">density</th>'
            f'<th data-key="phi" data-type="num">phi</th><th data-key="invariance">views</th></tr></thead>'
            f'<tbody>{"".join(list_rows)}</tbody></table>'
            f'</div><div id="pages"><div id="intro"><h1>arcstream features</h1><p class="muted">'
            f'{html.escape(title)}</p><ul>{summary}</ul><p class="muted">Click a linked index for its page. '
            f'Cells where the feature fires are outlined in white, brighter = stronger; the top token\'s cell in '
            f'magenta; hatched cells were not stored.</p></div>{"".join(pages)}</div>'
            f'<script>{_JS}</script>'
            f'</body></html>')


def write_dashboard(sites: list, path: str | Path, title: str = "") -> str | Path:
    """Writes `render_dashboard(...)` to `path` atomically: a local file (returned as a `Path`) or a file
    in a kvstore URL (`RunLocation`; returned as the URL string)."""
    location, key = file_location(path)
    location.write_bytes_atomic(key, render_dashboard(sites, title).encode("utf-8"))
    return str(path) if is_url(path) else Path(path)
