"""URL run directories end to end: train_sae and analyze read and write `file://` and `memory://` run
directories and give what they give on the same run as a local path.

The store is the analysis tests' small run of real ARC prompts (tests/analysis/helpers.py), written once
as a local directory (read also as `file://` + that path) and once, with the same bytes, into
`memory://`. Compared: SAE exports bit for bit, metrics.jsonl, features.json, report.md, the dashboard
and the PNG plots (paths that name the run directory are normalised first).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.analysis.helpers import SITE, make_store, planted_sae

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("analysis/features.json", "report.md", "dashboard/index.html",
           f"analysis/density_{SITE}.png", f"analysis/density_vs_activation_{SITE}.png")


def _read(directory: str, key: str) -> bytes:
    from arcstream.io import RunLocation

    data = RunLocation(directory).read_bytes(key)
    assert data is not None, f"{directory}/{key} is missing"
    return data


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(local run dir, the same run as a file:// URL, a memory:// copy): store + planted SAE export."""
    local = tmp_path_factory.mktemp("urls") / "run"
    make_store(local)
    planted_sae(local / "saes" / SITE)
    memory = f"memory://url-run-{uuid.uuid4().hex[:8]}"
    make_store(memory)
    planted_sae(f"{memory}/saes/{SITE}")
    return str(local), f"file://{local}", memory


def _sae_config(run_dir: str, **over):
    from configs.train_sae import get_config

    c = get_config()
    c.run_dir = run_dir
    c.sae.expansion_factor = 2
    c.sae.k = 4
    c.sae.batch_size = 128
    c.sae.chunk_rows = 16
    c.sae.train_tokens = 128 * 6
    c.sae.warmup_steps = 2
    c.checkpoint_every = 4
    c.log_every = 1
    for k, v in over.items():
        c[k] = v
    return c


def test_train_sae_on_file_and_memory_urls_equals_the_local_run(runs, tmp_path):
    from arcstream.sae import train_offline
    from arcstream.store import open_run

    local, file_url, memory = runs
    # Each trains into its own copy of saes/ (the planted export is the analysis's); rename via run_dir only.
    results = {}
    for name, run_dir, extra in (("local", local, {}), ("file", file_url, {}),
                                 ("memory", memory, {"checkpoint_dir": str(tmp_path / "mem-ckpt")})):
        c = _sae_config(run_dir, sites=SITE, **extra)
        c.sae.sweep = ""
        results[name] = train_offline(c, open_run(run_dir), log=lambda s: None)
        # the next run must start fresh, not resume this one's checkpoints (local and file:// are one folder)
        if name == "local":
            os.rename(Path(local) / "saes" / "train_sae_checkpoints", tmp_path / "local-ckpt")
            os.rename(Path(local) / "saes" / "metrics.jsonl", tmp_path / "local-metrics.jsonl")
            weights = (Path(local) / "saes" / SITE / "sae_weights.safetensors").read_bytes()
            cfg = (Path(local) / "saes" / SITE / "cfg.json").read_bytes()
    assert results["file"]["exports"] == [f"{file_url}/saes/{SITE}"]
    assert results["memory"]["exports"] == [f"{memory}/saes/{SITE}"]
    assert not Path(f"{file_url}").exists() and not Path("file:").exists(), "no relative 'file:/...' folder"
    assert _read(file_url, f"saes/{SITE}/sae_weights.safetensors") == weights
    assert _read(memory, f"saes/{SITE}/sae_weights.safetensors") == weights
    assert _read(memory, f"saes/{SITE}/cfg.json") == cfg
    assert _read(file_url, "saes/metrics.jsonl") == (tmp_path / "local-metrics.jsonl").read_bytes()
    assert _read(memory, "saes/metrics.jsonl") == (tmp_path / "local-metrics.jsonl").read_bytes()
    assert any((tmp_path / "mem-ckpt").iterdir()) and (Path(local) / "saes" / "train_sae_checkpoints").is_dir()
    # Restore the planted export the analysis test reads.
    planted_sae(Path(local) / "saes" / SITE)
    planted_sae(f"{memory}/saes/{SITE}")


def test_train_sae_refuses_a_memory_url_without_a_checkpoint_dir_naming_the_flag(runs):
    from arcstream.sae import train_offline
    from arcstream.store import open_run

    _, _, memory = runs
    with pytest.raises(ValueError, match=r"--config\.checkpoint_dir"):
        train_offline(_sae_config(memory, sites=SITE), open_run(memory), log=lambda s: None)


def test_analyze_on_file_and_memory_urls_writes_what_the_local_run_gets(runs, tmp_path):
    from arcstream.analysis import AnalyzeOptions, analyze

    local, file_url, memory = runs
    out = f"memory://url-analysis-{uuid.uuid4().hex[:8]}"
    kw = dict(chunk_rows=700, top_k=6, eval_rows=(1000, 2500), examples_per_feature=3, ce_prompts=0)
    ref = analyze(AnalyzeOptions(run_dir=local, output_dir=str(tmp_path / "local"), **kw))
    via_file = analyze(AnalyzeOptions(run_dir=file_url, **kw))  # writes into the run directory itself
    via_memory = analyze(AnalyzeOptions(run_dir=memory, output_dir=out, **kw))
    assert via_file.files["report"] == f"{file_url}/report.md" and via_memory.files["report"] == f"{out}/report.md"
    for key in OUTPUTS:
        want = (tmp_path / "local" / key).read_bytes()
        for directory, run_dir in ((file_url, file_url), (out, memory)):
            got = _read(directory, key).replace(run_dir.encode(), local.encode())
            assert got == want, (directory, key)
    assert json.loads(_read(out, "analysis/features.json"))["run_dir"] == memory
    assert ref.rows == via_file.rows == via_memory.rows > 0


@pytest.mark.slow
def test_the_train_sae_entry_point_on_a_file_url(runs, tmp_path):
    local, file_url, _ = runs
    env = dict(os.environ, JAX_PLATFORMS="cpu", ARCSTREAM_NO_PROGRESS="1", XLA_FLAGS="")
    cmd = [sys.executable, "-m", "arcstream.train_sae", f"--config={REPO / 'configs/train_sae.py'}",
           f"--config.run_dir={file_url}", f"--config.sites={SITE}", "--config.sae.expansion_factor=2",
           "--config.sae.k=4", "--config.sae.batch_size=128", "--config.sae.chunk_rows=16",
           "--config.sae.train_tokens=256", "--config.sae.warmup_steps=1", f"--config.checkpoint_dir={tmp_path}/c"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith("┌ arcstream train_sae ")  # the summary box every entry point prints
    assert f"{file_url}/saes/{SITE}" in re.sub(r"[\s│]", "", p.stdout)  # the export row (wrapped in the box)
    assert (Path(local) / ".train_sae.lock").exists()  # the lock went into the run directory itself
    planted_sae(Path(local) / "saes" / SITE)
