"""The analysis job: every SAE export of a run, streamed over the run's committed rows.

For each site with both stored activations and an SAE under `saes/<site>/`:
  pass 1 (all analysed rows, in chunks of `chunk_rows`): encode, fold into a
    `FeatureAccumulator`; rows in the held-out range also feed an
    `EvalAccumulator` (reconstruction via the SAE decoder);
  pass 2 (only the prompts among the top examples of the dashboard features):
    re-read those prompts' rows, encode, and keep each dashboard feature's
    activation on every cell of each of its example prompts, plus the prompt's
    grids rebuilt from the token metadata (the grids exactly as the model saw
    them, augmentation applied).
Then `features.json`, the dashboard and the report are written.

Works on a run in progress: `open_run` fixes the committed manifest once, and
nothing past its rows is read. Memory is O(chunk_rows * d_sae + d_sae * top_k),
never O(rows).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from arcstream import cli
from arcstream.analysis.ce import ce_loss_recovered
from arcstream.analysis.config import AnalyzeOptions
from arcstream.analysis.dashboard import write_dashboard
from arcstream.analysis.invariance import InvarianceAccumulator, cell_keys
from arcstream.analysis.report import write_report
from arcstream.analysis.stats import (ACT_LOG10_EDGES, ATTRIBUTES, EvalAccumulator, FeatureAccumulator, FeatureStats,
                                      Label, label_features)
from arcstream.data import Augmentation, open_source
from arcstream.data.records import GRID_KIND_NAMES
from arcstream.io import RunLocation, file_location, join_location
from arcstream.model import load_model
from arcstream.sae import load_sae, reconstruct
from arcstream.sae.export import hook_name
from arcstream.sae.pretrained import resolve_folder
from arcstream.store import TOKEN_FIELDS, open_run

FEATURES_FORMAT = "arcstream-features"
FEATURES_VERSION = 1


@dataclasses.dataclass(frozen=True, eq=False)
class SiteAnalysis:
    """Everything computed for one SAE."""

    site: str
    sae_folder: str
    architecture: str
    d_in: int
    d_sae: int
    rows: int  # rows analysed
    eval: dict[str, float]  # EvalAccumulator.result() on the held-out rows, plus their range
    stats: FeatureStats
    labels: list[Label]
    dashboard: list[int]  # features with a dashboard page, in page order
    examples: dict[int, list[dict[str, Any]]]  # feature -> example records (see _examples)
    prompts: dict[int, dict[str, Any]]  # prompt index -> {task_id, test_index, augmentation, grids}
    invariance: list[dict[str, Any]]  # per feature: InvarianceAccumulator.result()
    invariance_groups: int  # tasks the invariance study used


@dataclasses.dataclass(frozen=True)
class AnalyzeResult:
    output_dir: str
    rows: int
    sites: list[SiteAnalysis]
    files: dict[str, str]
    seconds: float
    dense_density: float = 0.1

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = [("output", self.output_dir), ("committed rows", str(self.rows))]
        for s in self.sites:
            e = s.eval
            dead = int(s.stats.dead_mask().sum())
            rows.append((s.site, f"{s.architecture} d_sae={s.d_sae}, {s.rows} rows"))
            rows.append(("  held-out", f"rows {e['start']}:{e['stop']}  L0 {e['l0']:.2f}  FVU {e['fvu']:.4f}  "
                                       f"EV {e['explained_variance']:.4f}"))
            if "ce_loss_recovered" in e:
                rows.append(("  CE loss recovered", f"{e['ce_loss_recovered']:.4f} (clean {e['ce_clean']:.3f}, "
                                                    f"SAE {e['ce_sae']:.3f}, zero {e['ce_zero']:.3f})"))
            labelled = sum(1 for lb in s.labels if lb.attribute)
            rows.append(("  latents", f"dead {dead}  dense {int(s.stats.dense_mask(self.dense_density).sum())}  "
                                      f"labelled {labelled}  pages {len(s.dashboard)}"))
            classes = [v["class"] for v in s.invariance]
            rows.append(("  across views", f"{s.invariance_groups} tasks: " + "  ".join(
                f"{short} {classes.count(c)}" for c, short in (("invariant", "inv"), ("equivariant", "equiv"),
                                                                ("view-dependent", "view-dep"), ("untested", "untested")))))
        rows += [(name, path) for name, path in self.files.items()]
        rows.append(("time", f"{self.seconds:.1f} s"))
        return rows


def _encoder(params, cfg, buffers, chunk_rows: int):
    """A jitted encode+decode of blocks of up to `chunk_rows` rows.

    A shorter block (one prompt's rows, the last chunk) is padded to the next power of two (at least
    256, at most chunk_rows): a handful of shapes compile, and a 1,200-row prompt is not encoded as
    4,096 rows (measured: the default run's 248 per-prompt encodes took 67 s of its 184 s analysis
    padded to chunk_rows).
    """
    # Weights are arguments, not closed-over constants: a 16k-latent SAE would otherwise be baked into the HLO.
    @jax.jit
    def fn(params, buffers, x_nd):
        return reconstruct(params, cfg, x_nd, buffers)

    def run(x_nd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = x_nd.shape[0]
        rows = min(chunk_rows, max(256, 1 << max(n - 1, 0).bit_length()))
        if n < rows:
            x_nd = np.concatenate([x_nd, np.zeros((rows - n, x_nd.shape[1]), x_nd.dtype)])
        acts, x_hat = fn(params, buffers, x_nd)
        return np.asarray(acts)[:n], np.asarray(x_hat)[:n]

    return run


def _read_tokens(reader, start: int, stop: int) -> dict[str, np.ndarray]:
    futures = {f: reader.token_array(f)[start:stop].read() for f in TOKEN_FIELDS}
    return {f: np.asarray(fu.result()) for f, fu in futures.items()}


def _grids_from_tokens(tok: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """The grids of one prompt rebuilt from its stored cell tokens, in prompt order.

    Cells no stored token covers (a token covering several cells records only its first) stay -1.
    """
    cells = tok["grid_kind"] > 0
    grids: dict[tuple[int, int], dict[str, Any]] = {}
    order = np.argsort(tok["position"][cells], kind="stable")
    kind, pair = tok["grid_kind"][cells][order], tok["pair_index"][cells][order]
    row, col, colour = tok["row"][cells][order], tok["col"][cells][order], tok["colour"][cells][order]
    for key in dict.fromkeys(zip(kind.tolist(), pair.tolist())):
        sel = (kind == key[0]) & (pair == key[1])
        h, w = int(row[sel].max()) + 1, int(col[sel].max()) + 1
        g = np.full((h, w), -1, np.int8)
        g[row[sel], col[sel]] = colour[sel]
        grids[key] = {"kind": GRID_KIND_NAMES[key[0]], "kind_code": key[0], "pair": key[1], "cells": g.tolist()}
    return list(grids.values())


class _SourceGrids:
    """The original tasks, from the run's `data.source`, to fill cells the store did not record.

    A token covering several cells (merged digits) stores only its first cell, so grids rebuilt from the
    tokens have holes; the source task under the prompt's augmentation has every cell. Opened lazily, only
    when a hole is seen; a source that cannot be opened (moved, remote, iterable-only) leaves the holes.
    """

    def __init__(self, config: dict[str, Any]):
        self.spec = str((config.get("data") or {}).get("source", "") or "")
        self._index: dict[str, int] | None = None
        self._source = None

    def task(self, task_id: str):
        if self._index is None:
            self._index = {}
            try:
                src = open_source(self.spec)
                if src.supports_random_access:
                    self._source = src
                    self._index = {item.id: i for i, item in enumerate(src) if hasattr(item, "train")}
            except Exception:  # noqa: BLE001 - the grids keep their holes; the page says so (hatched cells)
                self._index = {}
        i = self._index.get(task_id)
        return None if i is None else self._source[i]

    def fill(self, grids: list[dict[str, Any]], info) -> None:
        """Fills -1 cells in place from the augmented source task when shapes and every known cell agree."""
        if info is None or not self.spec or all(-1 not in np.asarray(g["cells"]) for g in grids):
            return
        task = self.task(info.task_id)
        if task is None:
            return
        try:
            aug = Augmentation.from_json(info.augmentation) if info.augmentation else Augmentation.identity()
            task = aug.apply_task(task)
        except ValueError:
            return
        for g in grids:
            kind, pair = g["kind_code"], g["pair"]
            pairs = task.train if kind in (1, 2) else task.test
            if not 0 <= pair < len(pairs):
                continue
            full = pairs[pair].input if kind in (1, 3) else pairs[pair].output
            cells = np.asarray(g["cells"])
            if full is None:
                continue
            h, w = full.shape
            if cells.shape[0] > h or cells.shape[1] > w:
                continue
            padded = np.full((h, w), -1, np.int64)
            padded[: cells.shape[0], : cells.shape[1]] = cells
            known = padded >= 0
            if np.array_equal(padded[known], full[known]):
                g["cells"] = full.astype(int).tolist()


def _pick_dashboard(stats: FeatureStats, labels: list[Label], limit: int) -> list[int]:
    """Alive features, the best-labelled (highest phi) first, at most `limit`."""
    alive = np.nonzero(stats.fire_count_s > 0)[0]
    phi = np.array([labels[i].phi for i in alive])
    return [int(i) for i in alive[np.argsort(-phi, kind="stable")][:limit]]


def analyze_site(reader, site: str, sae_folder: str | Path, opts: AnalyzeOptions, model=None) -> SiteAnalysis:
    """The passes for one SAE (see the module docstring); with `model`, also CE loss recovered."""
    params, cfg, buffers, cfg_json = load_sae(sae_folder)
    d_in = reader.sites[site]
    _check_width(sae_folder, cfg.d_in, site, reader, opts)
    rows = reader.rows if opts.max_rows <= 0 else min(opts.max_rows, reader.rows)
    held_out = opts.eval_range
    if held_out is None:
        ev = (rows - int(round(rows * opts.eval_fraction)), rows)
    else:
        ev = (min(held_out[0], rows), min(held_out[1], rows))
    acts_view = reader.activations(site)
    run = _encoder(params, cfg, buffers, opts.chunk_rows)
    feats = FeatureAccumulator(cfg.d_sae, opts.top_k)
    evals = EvalAccumulator(d_in)
    spans: dict[int, list[int]] = {}  # prompt -> [first row, last row]
    n_chunks = math.ceil(rows / opts.chunk_rows)
    for c in cli.progress(range(n_chunks), total=n_chunks, desc=f"analyse {site}", unit="chunk"):
        a, b = c * opts.chunk_rows, min((c + 1) * opts.chunk_rows, rows)
        x_nd = np.asarray(acts_view[a:b].read().result(), np.float32)
        tok = _read_tokens(reader, a, b)
        acts_ns, x_hat_nd = run(x_nd)
        feats.update(acts_ns, tok, a)
        lo, hi = max(a, ev[0]), min(b, ev[1])
        if lo < hi:
            evals.update(x_nd[lo - a:hi - a], x_hat_nd[lo - a:hi - a], acts_ns[lo - a:hi - a])
        uniq, first = np.unique(tok["prompt"], return_index=True)
        last = len(tok["prompt"]) - 1 - np.unique(tok["prompt"][::-1], return_index=True)[1]
        for p, f, l in zip(uniq.tolist(), first.tolist(), last.tolist()):
            span = spans.setdefault(p, [a + f, a + l])
            span[0], span[1] = min(span[0], a + f), max(span[1], a + l)
    stats = feats.result()
    labels = label_features(stats, min_phi=opts.min_phi)
    dashboard = _pick_dashboard(stats, labels, opts.dashboard_features)
    table = reader.prompts()
    examples, prompts = _examples(reader, site, run, stats, dashboard, spans, opts, table)
    invariance = _invariance(reader, site, run, cfg.d_sae, spans, opts, table)
    ce: dict[str, float] = {}
    if model is not None:
        held_out = [p for p in table if p in spans and spans[p][0] >= ev[0]][: opts.ce_prompts]
        ce = ce_loss_recovered(model, [table[p].token_ids for p in held_out], site, params, cfg, buffers,
                               pad_to=opts.ce_pad_to)
    return SiteAnalysis(invariance=invariance.result(), invariance_groups=invariance.groups,
                        site=site, sae_folder=str(sae_folder), architecture=str(cfg_json.get("architecture")),
                        d_in=d_in, d_sae=cfg.d_sae, rows=rows,
                        eval={**evals.result(), "start": ev[0], "stop": ev[1], **ce},
                        stats=stats, labels=labels, dashboard=dashboard, examples=examples, prompts=prompts)


def _prompt_rows(reader, site, run, p: int, spans, chunk_rows: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One prompt's token fields and latent activations [n, d_sae], in stored order."""
    a, b = spans[p][0], spans[p][1] + 1
    tok = _read_tokens(reader, a, b)
    mine = tok["prompt"] == p  # spans may include other prompts' rows if a prompt was not contiguous
    x_nd = np.asarray(reader.activations(site)[a:b].read().result(), np.float32)
    acts = np.concatenate([run(x_nd[i:i + chunk_rows])[0] for i in range(0, b - a, chunk_rows)])
    return {k: v[mine] for k, v in tok.items()}, acts[mine]


def _invariance(reader, site, run, d_sae: int, spans, opts: AnalyzeOptions, table):
    """Pass 3: the first `invariance_groups` tasks stored under >= 2 augmentations (see invariance.py)."""
    acc = InvarianceAccumulator(d_sae, opts.invariance_threshold)
    groups: dict[tuple[str, int], list[int]] = {}
    for p, info in table.items():
        if p in spans:
            groups.setdefault((info.task_id, info.test_index), []).append(p)
    chosen = [ps for ps in groups.values() if len(ps) >= 2][: opts.invariance_groups]
    for ps in cli.progress(chosen, total=len(chosen), desc=f"invariance {site}", unit="task"):
        views = []
        for p in ps:
            tok, acts = _prompt_rows(reader, site, run, p, spans, opts.chunk_rows)
            orig, view = cell_keys(tok, table[p].augmentation)
            views.append((orig, view, acts > 0))
        acc.add_group(views)
    return acc


def _examples(reader, site, run, stats: FeatureStats, dashboard: list[int], spans, opts: AnalyzeOptions, table):
    """Pass 2: per dashboard feature, up to `examples_per_feature` distinct prompts among its top rows, each
    with the feature's activation on every firing token of the prompt."""
    wanted: dict[int, list[tuple[int, int, float]]] = {}  # feature -> [(prompt, top row, top value)]
    for f in dashboard:
        seen: list[tuple[int, int, float]] = []
        for v, r, p in zip(stats.top_val_ks[:, f], stats.top_row_ks[:, f], stats.top_prompt_ks[:, f]):
            if r >= 0 and all(p != q for q, _, _ in seen):
                seen.append((int(p), int(r), float(v)))
            if len(seen) == opts.examples_per_feature:
                break
        wanted[f] = seen
    needed = sorted({p for ex in wanted.values() for p, _, _ in ex})
    source = _SourceGrids(reader.config)
    prompts: dict[int, dict[str, Any]] = {}
    per_prompt: dict[int, tuple[dict[str, np.ndarray], np.ndarray]] = {}
    feats = np.asarray(dashboard, np.int64)
    for p in cli.progress(needed, total=len(needed), desc=f"examples {site}", unit="prompt"):
        tok, acts = _prompt_rows(reader, site, run, p, spans, opts.chunk_rows)
        per_prompt[p] = (tok, acts[:, feats])
        info = table.get(p)
        grids = _grids_from_tokens(tok)
        source.fill(grids, info)
        prompts[p] = {"task_id": info.task_id if info else "?", "test_index": info.test_index if info else -1,
                      "augmentation": info.augmentation if info else None, "grids": grids}
    column = {f: j for j, f in enumerate(dashboard)}
    examples: dict[int, list[dict[str, Any]]] = {}
    for f, ex in wanted.items():
        out = []
        for p, r, v in ex:
            tok, acts = per_prompt[p]
            a_n = acts[:, column[f]]
            fire = np.nonzero(a_n > 0)[0]
            top_i = int(np.argmax(a_n))
            out.append({
                "prompt": p, "row": r, "act": v, "position": int(tok["position"][top_i]),
                "token_id": int(tok["token_id"][top_i]),
                "cell": _cell_of(tok, top_i),
                "cells": [[int(tok["grid_kind"][i]), int(tok["pair_index"][i]), int(tok["row"][i]),
                           int(tok["col"][i]), round(float(a_n[i]), 5)] for i in fire if tok["grid_kind"][i] > 0],
                "non_grid": [[int(tok["position"][i]), int(tok["token_id"][i]), round(float(a_n[i]), 5)]
                             for i in fire if tok["grid_kind"][i] == 0][:64],
            })
        examples[f] = out
    return examples, prompts


def _cell_of(tok, i: int) -> list[int] | None:
    if tok["grid_kind"][i] <= 0:
        return None
    return [int(tok["grid_kind"][i]), int(tok["pair_index"][i]), int(tok["row"][i]), int(tok["col"][i])]


# ---------------------------------------------------------------------------------- outputs


def features_json(result_sites: list[SiteAnalysis], run_dir: str, rows: int, dense_density: float) -> dict[str, Any]:
    """The per-feature statistics as plain JSON (the `features.json` other tools read).

    Layout (format "arcstream-features", format_version 1):
      committed_rows, run_dir, activation_log10_edges (the histogram bins), attributes (attribute -> value
      names, the order of the attribute value codes);
      saes[site]: sae_folder, architecture, d_in, d_sae, rows (analysed), dead, dense, dense_density,
        eval {rows, start, stop, l0, fvu, explained_variance, mse [, prompts, tokens, ce_clean, ce_sae,
        ce_zero, ce_loss_recovered]}, density_histogram {log10_edges, counts, dead}, invariance_groups,
        features[i]: index, density, fire_count, mean_activation (over all rows), mean_when_firing,
          max_activation, label, label_attribute, label_value, label_phi, label_precision, label_recall,
          top [{row, prompt, act}] (descending), activation_histogram (counts on activation_log10_edges),
          invariance {class, jaccard_original, jaccard_view, view_pairs}.
    """
    out: dict[str, Any] = {"format": FEATURES_FORMAT, "format_version": FEATURES_VERSION, "run_dir": run_dir,
                           "committed_rows": rows, "activation_log10_edges": ACT_LOG10_EDGES.tolist(),
                           "attributes": ATTRIBUTES, "saes": {}}
    for s in result_sites:
        st = s.stats
        density, mean, mwf = st.density_s, st.mean_act_s, st.mean_when_firing_s
        features = []
        for i in range(s.d_sae):
            lb = s.labels[i]
            top = [{"row": int(r), "prompt": int(p), "act": float(v)}
                   for v, r, p in zip(st.top_val_ks[:, i], st.top_row_ks[:, i], st.top_prompt_ks[:, i]) if r >= 0]
            features.append({
                "index": i, "density": float(density[i]), "fire_count": int(st.fire_count_s[i]),
                "mean_activation": float(mean[i]), "mean_when_firing": float(mwf[i]),
                "max_activation": float(st.act_max_s[i]),
                "label": lb.text, "label_attribute": lb.attribute, "label_value": lb.value, "label_phi": lb.phi,
                "label_precision": lb.precision, "label_recall": lb.recall, "top": top,
                "activation_histogram": st.hist_sb[i].tolist(), "invariance": s.invariance[i]})
        out["saes"][s.site] = {
            "sae_folder": s.sae_folder, "architecture": s.architecture, "d_in": s.d_in, "d_sae": s.d_sae,
            "rows": s.rows, "eval": s.eval, "dead": int(st.dead_mask().sum()),
            "dense": int(st.dense_mask(dense_density).sum()), "dense_density": dense_density,
            "invariance_groups": s.invariance_groups,
            "density_histogram": st.density_histogram(), "features": features}
    return out


def _write_text(path: str | Path, text: str) -> None:
    """Replaces a file atomically, in a local folder or a kvstore URL (`RunLocation`)."""
    location, key = file_location(path)
    location.write_bytes_atomic(key, text.encode("utf-8"))


def _check_width(folder: str | Path, sae_d_in: Any, site: str, reader, opts: AnalyzeOptions, flag: str = "") -> None:
    """An SAE's d_in must be the stored width of its site (checked early for --config.saes, and per site)."""
    width = reader.sites[site]
    if sae_d_in is None or int(sae_d_in) != width:
        raise ValueError(f"{flag}{folder}/cfg.json has d_in={sae_d_in}, but site {site!r} of {opts.run_dir} stores "
                         f"width {width}; the SAE was trained on another site or model")


def _has_sae(folder: str | Path) -> bool:
    return RunLocation(folder).exists("cfg.json")


def _external_saes(reader, opts: AnalyzeOptions) -> list[tuple[str, str | Path]]:
    """(site, folder) of each `config.saes` folder: the stored site its cfg.json's hook name names, checked."""
    out: list[tuple[str, str | Path]] = []
    for spec in opts.sae_specs:
        folder = resolve_folder(spec, flag="--config.saes")  # a folder, or sae_lens:RELEASE@SAE_ID
        cfg_json = RunLocation(folder).read_json("cfg.json")
        if cfg_json is None:
            raise FileNotFoundError(f"--config.saes: {folder}/cfg.json does not exist; expected a SAELens folder "
                                    "(cfg.json + sae_weights.safetensors)")
        hook = hook_name(cfg_json)
        if hook not in reader.sites:
            raise ValueError(f"--config.saes: {folder}/cfg.json reads hook_name={hook!r}, which {opts.run_dir} does "
                             f"not store (it stores {list(reader.sites)}); capture that site, or give an SAE of one "
                             "of these")
        _check_width(folder, cfg_json.get("d_in"), hook, reader, opts, flag="--config.saes: ")
        if opts.site_names and hook not in opts.site_names:
            continue
        if any(site == hook for site, _ in out):
            raise ValueError(f"--config.saes: two SAEs for site {hook!r} ({out[0][1]} and {folder}); the analysis "
                             "writes one set of outputs per site: run it once per SAE with its own output_dir")
        out.append((hook, folder))
    if not out:
        raise ValueError(f"--config.saes: none of {list(opts.sae_specs)} is for the sites {list(opts.site_names)}")
    return out


def _find_saes(reader, opts: AnalyzeOptions) -> list[tuple[str, str | Path]]:
    if opts.sae_specs:
        return _external_saes(reader, opts)
    sae_root = opts.sae_dir or join_location(opts.run_dir, "saes")
    if opts.site_names:
        missing = [s for s in opts.site_names if s not in reader.sites]
        if missing:
            raise ValueError(f"config.sites names {missing}, not stored in {opts.run_dir}; "
                             f"it stores {list(reader.sites)}")
        for s in opts.site_names:
            if not _has_sae(join_location(sae_root, s)):
                raise FileNotFoundError(f"config.sites names {s!r} but {join_location(sae_root, s)}/cfg.json does "
                                        "not exist; train or export an SAE for it (arcstream.train_sae), or set "
                                        "config.sae_dir")
        return [(s, join_location(sae_root, s)) for s in opts.site_names]
    found = [(s, join_location(sae_root, s)) for s in reader.sites if _has_sae(join_location(sae_root, s))]
    if not found:
        raise FileNotFoundError(f"no SAE export under {sae_root} for any stored site ({list(reader.sites)}); "
                                "train one (arcstream.train_sae) or point config.sae_dir at a folder of exports")
    return found


def analyze(config: Any) -> AnalyzeResult:
    """Runs the job and writes features.json, the dashboard and report.md.

    `config` is the checked `AnalyzeOptions` (arcstream/analysis/config.py documents every key), or a
    ConfigDict of configs/analyze.py, checked here by `AnalyzeOptions.from_config`."""
    opts = AnalyzeOptions.from_config(config)
    start = time.perf_counter()
    out = opts.output_dir or opts.run_dir  # a local folder or a kvstore URL: every write goes through RunLocation
    reader = open_run(opts.run_dir)
    saes = _find_saes(reader, opts)
    model = None
    if opts.ce_prompts > 0:
        spec = opts.model or str(reader.config.get("model", ""))
        try:
            model, _ = load_model(spec, attention=opts.attention)
        except Exception as err:
            raise RuntimeError(f"CE loss recovered needs the run's model, but loading model={spec!r} failed "
                               f"({type(err).__name__}: {err}); set --config.model=PATH, or "
                               "--config.ce_prompts=0 to skip it") from err
    sites = [analyze_site(reader, site, folder, opts, model) for site, folder in saes]
    files: dict[str, str] = {}
    data = features_json(sites, opts.run_dir, reader.rows, opts.dense_density)
    _write_text(join_location(out, "analysis", "features.json"), json.dumps(data))
    files["features.json"] = str(join_location(out, "analysis", "features.json"))
    files["dashboard"] = str(write_dashboard(sites, join_location(out, "dashboard", "index.html"),
                                             title=opts.run_dir))
    files["report"] = str(write_report(sites, out, opts))
    return AnalyzeResult(output_dir=str(out), rows=reader.rows, sites=sites, files=files,
                         seconds=time.perf_counter() - start, dense_density=opts.dense_density)
