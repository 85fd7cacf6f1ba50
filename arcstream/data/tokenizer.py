"""Tokenizers built locally (no hub): one that splits every digit, one that merges digit runs.

`build_arc_tokenizer(kind)` returns a `transformers.PreTrainedTokenizerFast`
backed by the `tokenizers` library, savable with `save_pretrained` and
reloadable with `AutoTokenizer.from_pretrained` (no remote code).

kind="digits" (the tokenizer of our own small model, issue 9):
  a character-level vocabulary: special tokens first (`<|pad|>` = 0,
  `<|bos|>`, `<|eos|>`, `<|unk|>`, `<|im_start|>`, `<|im_end|>`), then the
  ten colour digits at consecutive ids (`DIGIT_BASE_ID + colour`), then every
  other printable ASCII character and "\\n", then the prompt templates'
  structural words (`STRUCTURAL_WORDS`, e.g. "Input") as whole tokens. Like
  Qwen, every digit is its own token, so a grid cell is exactly one token in
  every encoder. Characters outside the vocabulary become `<|unk|>`. A
  ChatML-style chat template (`<|im_start|>role\\n...<|im_end|>\\n`) after
  `<|bos|>`; plain text gets `<|bos|>` prepended when `add_special_tokens`.
  108 tokens in all.

  It is *byte-level* (GPT-2 byte-to-unicode images in the vocabulary: " " is
  "Ġ", "\\n" is "Ċ", "\\t" is "ĉ"; every other printable ASCII character is
  itself) with no merges, so a character is one token either way. Why: under
  transformers 5, `AutoTokenizer` on a folder whose config.json says
  `model_type: qwen2` ignores `tokenizer_config.json` and rebuilds the
  tokenizer as `Qwen2Tokenizer` (byte-level BPE from the saved vocabulary).
  With a plain character vocabulary that rebuild silently dropped every
  " " and "\\n" (their byte-level images were not in it), so the model saw
  grids without row breaks. A byte-level vocabulary makes both loaders give the
  same ids on ASCII text (tested), and the ids are those of the earlier plain
  character vocabulary, so checkpoints trained with it keep working.

`load_tokenizer(path)` is the one loader every job uses: it checks that digits,
spaces and line breaks survive encode -> decode and refuses a tokenizer that
drops or changes them (`TokenizerRoundTripError`); `check_roundtrip` is the
check the prompt builder also applies to every grid it writes.

kind="merged" (for alignment tests against Llama-3-like tokenizers):
  byte-level BPE after Llama 3's pre-tokenizer regex, which cuts digit runs
  into groups of at most three; merges for every 2- and 3-digit string make
  each group one token, so "0120" is two tokens "012", "0". A Llama-3-style
  chat template (`<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`).

Both tokenizers are deterministic constructions (no training), so the same
kind always gives the same ids.
"""

from __future__ import annotations

import itertools
import logging
import os
import string
from collections import Counter
from typing import Literal

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

_log = logging.getLogger(__name__)

KINDS = ("digits", "merged")
DIGIT_BASE_ID = 6  # in the "digits" tokenizer, colour c has token id DIGIT_BASE_ID + c

# Whole-word tokens for the words the prompt templates (prompts.py) repeat in every prompt.
STRUCTURAL_WORDS = ("Example", "Input", "Output", "Test", "```")

_DIGITS_SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>", "<|im_start|>", "<|im_end|>")
_MERGED_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>", "<|pad|>")

# Our own templates in the two common layouts. Message content is inserted verbatim (no trimming):
# the prompt builder locates it in the rendered text to align grid cells.
_CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_HEADER_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama 3's pre-tokenizer split: letters, 1-3 digit groups, punctuation runs, newlines, spaces.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def _byte_image(ch: str) -> str:
    """The GPT-2 byte-level stand-in of one ASCII character (" " -> "Ġ", "\\n" -> "Ċ", "7" -> "7")."""
    return "".join(piece for piece, _ in _BYTE_LEVEL.pre_tokenize_str(ch))


def _digits_backend() -> Tokenizer:
    vocab: dict[str, int] = {}
    for tok in _DIGITS_SPECIALS:
        vocab[tok] = len(vocab)
    assert len(vocab) == DIGIT_BASE_ID
    chars = string.digits + "".join(c for c in string.printable if c not in string.digits and c not in "\r\x0b\x0c")
    for ch in chars:
        vocab[_byte_image(ch)] = len(vocab)
    # A byte-level BPE with single characters and no merges: one token per ASCII
    # character, exact character offsets, unknown bytes -> <|unk|>; and the same
    # ids when transformers rebuilds it as Qwen2Tokenizer (see the module docstring).
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _DIGITS_SPECIALS])
    tok.add_tokens([AddedToken(w, special=False, normalized=False) for w in STRUCTURAL_WORDS])
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", vocab["<|bos|>"])])
    return tok


def _merged_backend() -> Tokenizer:
    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab: dict[str, int] = {}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []
    digits = string.digits
    for a, b in itertools.product(digits, repeat=2):
        merges.append((a, b))
        vocab[a + b] = len(vocab)
    for a, b, c in itertools.product(digits, repeat=3):
        vocab[a + b + c] = len(vocab)
        # Both merge paths: whichever 2-digit pair ranks first, the 3-digit token is reachable.
        merges.append((a + b, c))
        merges.append((a, b + c))
    # A few word merges so that ordinary text is not purely byte-level (as in a real BPE).
    for word in ("Input", "Output", "Example", "Test", "ĠInput", "ĠOutput", "Ċ", "ĊĊ"):
        for i in range(2, len(word) + 1):
            left, right = word[: i - 1], word[i - 1]
            if word[:i] not in vocab:
                merges.append((left, right))
                vocab[word[:i]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _MERGED_SPECIALS])
    bos_id = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", bos_id)])
    return tok


def build_arc_tokenizer(kind: Literal["digits", "merged"] = "digits") -> PreTrainedTokenizerFast:
    """A local tokenizer of the given kind (see the module docstring); no network, no remote code."""
    if kind == "digits":
        return PreTrainedTokenizerFast(
            tokenizer_object=_digits_backend(), bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
            unk_token="<|unk|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
            chat_template=_CHATML_TEMPLATE, model_max_length=1 << 20, padding_side="right")
    if kind == "merged":
        return PreTrainedTokenizerFast(
            tokenizer_object=_merged_backend(), bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
            pad_token="<|pad|>", additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            chat_template=_HEADER_TEMPLATE, model_max_length=1 << 20, padding_side="right")
    raise ValueError(f"build_arc_tokenizer: kind is {kind!r}; expected one of {KINDS}")


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids of every special token (bos/eos/pad and added special tokens such as `<|im_end|>`)."""
    ids = set(tokenizer.all_special_ids)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        ids.update(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
    return frozenset(int(i) for i in ids if i is not None)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an answer: eos and the end-of-turn marker of the chat template, when present.

    A generator should stop on any of them: a prompt's answer ends with eos in
    plain prompts and with the end-of-turn token in chat prompts.
    """
    out = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    for name in ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in out and tid >= 0:
            # convert_tokens_to_ids returns the unk id (or None) for unknown strings.
            if tokenizer.convert_ids_to_tokens(tid) == name:
                out.append(tid)
    return out


# --- loading, and the round-trip check -------------------------------------------------------------------

# What every grid encoder writes: the ten colours, the cell separators and line breaks. The loader's probe.
_PROBE_TEXT = "0123456789\n0 1 2 3\n4,5,6\n1: 789\n3x4\n```\n"


class TokenizerRoundTripError(ValueError):
    """A tokenizer that drops or changes grid text between encode and decode.

    Raised, never skipped: every prompt of the run would be corrupted the same
    way, and a model fed grids without their line breaks still produces
    activations, so nothing downstream would notice.
    """


def _lost(expected: str, got: str) -> str:
    """A short account of what `got` lacks compared with `expected`, by character."""
    missing = Counter(expected) - Counter(got)
    extra = Counter(got) - Counter(expected)
    parts = []
    if missing:
        parts.append("lost " + ", ".join(f"{ch!r} x{n}" for ch, n in missing.most_common(6)))
    if extra:
        parts.append("gained " + ", ".join(f"{ch!r} x{n}" for ch, n in extra.most_common(6)))
    return "; ".join(parts) or "characters reordered"


def _name(tokenizer: PreTrainedTokenizerBase) -> str:
    return f"{type(tokenizer).__name__}({getattr(tokenizer, 'name_or_path', '') or 'unsaved'})"


def check_roundtrip(tokenizer: PreTrainedTokenizerBase, text: str, *, what: str = "grid text",
                    ids: list[int] | None = None) -> None:
    """Raise `TokenizerRoundTripError` unless `text` comes back from encode -> decode.

    With `ids` (the tokens a prompt builder cut out for `text`, which may
    reach into the neighbouring text), `text` must appear in their decoding;
    without, `text` is encoded on its own (no special tokens) and must decode
    to itself. Special tokens are kept in the decoding, so an `<|unk|>`
    counts as a change.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if ids is None:
        ids = backend.encode(text, add_special_tokens=False).ids if backend is not None else tokenizer.encode(
            text, add_special_tokens=False)
    got = (backend.decode(list(ids), skip_special_tokens=False) if backend is not None
           else tokenizer.decode(list(ids), skip_special_tokens=False))
    if text in got:
        return
    raise TokenizerRoundTripError(
        f"tokenizer {_name(tokenizer)} does not keep {what}: {text[:60]!r} came back as {got[:60]!r} "
        f"({_lost(text, got)}). The model would read corrupted grids, so arcstream refuses it. Fix: load the "
        "checkpoint's own tokenizer.json (arcstream.data.tokenizer.load_tokenizer does), pick an encoder whose "
        "characters the vocabulary has (--config.data.encoder), or re-save the tokenizer.")


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint (hub name or local folder), checked to keep grid text intact.

    `AutoTokenizer` first (no remote code). If what it builds fails the
    round-trip probe and the folder has a `tokenizer.json`, that file is
    loaded exactly (`PreTrainedTokenizerFast`), which is what the checkpoint
    was trained with: transformers 5 replaces the tokenizer class of some model
    types (qwen2 among them) whatever `tokenizer_config.json` says, and
    arcstream checkpoints saved before the byte-level vocabulary lose " " and
    "\\n" under that replacement. Raises `TokenizerRoundTripError` when no
    loader keeps the probe's digits, separators and line breaks.
    """
    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    try:
        check_roundtrip(tok, _PROBE_TEXT, what="digits, separators and line breaks")
        return tok
    except TokenizerRoundTripError as first:
        local = os.path.join(str(name_or_path), "tokenizer.json")
        if not os.path.isfile(local):
            raise TokenizerRoundTripError(f"{name_or_path}: {first}") from None
        exact = PreTrainedTokenizerFast.from_pretrained(str(name_or_path))
        check_roundtrip(exact, _PROBE_TEXT, what="digits, separators and line breaks")
        _log.warning(
            "%s: AutoTokenizer built %s, which drops grid characters (%s); using the folder's tokenizer.json as "
            "saved (PreTrainedTokenizerFast). Re-save the tokenizer with this arcstream to silence this.",
            name_or_path, type(tok).__name__, _lost(_PROBE_TEXT, tok.decode(
                tok.backend_tokenizer.encode(_PROBE_TEXT, add_special_tokens=False).ids)))
        return exact
