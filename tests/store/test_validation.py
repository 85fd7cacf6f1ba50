"""Bad input to the writer is refused with an error naming the argument, the value and the expectation."""

import numpy as np
import pytest

from arcstream.data.records import PromptInfo
from arcstream.store import StoreError, StoreWriter, open_run
from tests.store.helpers import CONFIG, SITES, make_batch


@pytest.fixture
def writer(tmp_path):
    return StoreWriter.create_or_resume(str(tmp_path), sites=SITES, config=CONFIG, rows_per_shard=16)


def _edit(batch, site=None, field=None, value=None, drop_site=None):
    rows, tokens, prompts = batch
    rows, tokens = dict(rows), dict(tokens)
    if site:
        rows[site] = value
    if field:
        tokens[field] = value
    if drop_site:
        del rows[drop_site]
    return rows, tokens, prompts


def test_wrong_sites_fields_shapes_and_ranges_are_refused(writer):
    batch = make_batch(0, 0)
    n = len(batch[1]["prompt"])
    site = next(iter(SITES))
    cases = [
        (_edit(batch, drop_site=site), r"missing \['blocks.0.hook_resid_post'\]"),
        (_edit(batch, site=site, value=np.zeros((n, 3), np.float32)), r"shape \(\d+, 3\), expected \[N, 12\]"),
        (_edit(batch, site=site, value=np.zeros((n + 1, 12), np.float32)), r"has \d+ rows, the first site has"),
        (_edit(batch, site=site, value=np.zeros((n, 12), np.int64)), "expected a float dtype"),
        (_edit(batch, field="row", value=np.full(n, 300)), r"tokens\['row'\] has values in \[300, 300\]"),
        (_edit(batch, field="position", value=np.full(n, -1)), "padding rows must not be stored"),
        (_edit(batch, field="token_id", value=np.zeros(n + 2, np.int32)), r"expected \(\d+,\) \(one per row\)"),
        (_edit(batch, field="colour", value=np.zeros(n, np.float32)), "expected integers"),
    ]
    for (rows, tokens, prompts), pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            writer.append(rows, tokens, prompts)
    assert writer.rows == 0  # nothing was half-appended
    rows, tokens, prompts = batch
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        writer.append(rows, {**tokens, "extra": tokens["prompt"]}, prompts)


def test_prompts_must_be_passed_once_and_before_their_rows(writer):
    rows, tokens, prompts = make_batch(0, 0)
    with pytest.raises(ValueError, match="names prompts .* that were never passed in `prompts`"):
        writer.append(rows, tokens, prompts[1:] if len(prompts) > 1 else [])
    writer.append(rows, tokens, prompts)
    with pytest.raises(ValueError, match=f"prompt {prompts[0].prompt_index} .* was already appended"):
        writer.append(rows, tokens, prompts[:1])
    bad = PromptInfo(7, "t", 0, {"not json": object()}, np.zeros(2, np.int32), 1)
    with pytest.raises(ValueError, match="augmentation record must be JSON-serialisable"):
        writer.append({s: np.zeros((0, d), np.float32) for s, d in SITES.items()},
                      {f: np.zeros(0, np.int32) for f in tokens}, [bad])


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(sites={}), "non-empty dict"),
    (dict(sites={"a/b": 4}), "site name 'a/b' cannot be stored"),
    (dict(sites={"a": 0}), r"sites\['a'\]=0: expected a positive int"),
    (dict(dtype="int8"), r"dtype='int8': expected one of \('bfloat16', 'float16', 'float32'\)"),
    (dict(process_index=2, process_count=2), r"process_index=2: expected an int in \[0, 2\)"),
    (dict(rows_per_shard=16, rows_per_chunk=5), "rows_per_chunk=5: expected a positive int dividing rows_per_shard=16"),
    (dict(config={"f": object()}), "config must be JSON-serialisable"),
])
def test_bad_writer_arguments_are_refused(tmp_path, kwargs, pattern):
    args = dict(sites=SITES, config=CONFIG) | kwargs
    with pytest.raises(ValueError, match=pattern):
        StoreWriter.create_or_resume(str(tmp_path), **args)


def test_reader_errors_name_the_problem(tmp_path, writer):
    with pytest.raises(StoreError, match="no manifest.json: nothing is committed yet"):
        open_run(str(tmp_path))
    writer.append(*make_batch(0, 0))
    writer.commit(1)
    reader = open_run(str(tmp_path))
    with pytest.raises(KeyError, match="site 'nope' is not in this run; it stores"):
        reader.activations("nope")
    with pytest.raises(KeyError, match="token field 'nope' does not exist"):
        reader.token_array("nope")
    (tmp_path / "manifest.json").write_text('{"format": "arcstream-store", "format_version": 99}')
    with pytest.raises(StoreError, match="format_version=99; this arcstream reads format_version=1"):
        open_run(str(tmp_path))
