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
import string
from typing import Literal

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

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


def _digits_backend() -> Tokenizer:
    vocab: dict[str, int] = {}
    for tok in _DIGITS_SPECIALS:
        vocab[tok] = len(vocab)
    assert len(vocab) == DIGIT_BASE_ID
    chars = string.digits + "".join(c for c in string.printable if c not in string.digits and c not in "\r\x0b\x0c")
    for ch in chars:
        vocab[ch] = len(vocab)
    # A BPE with single characters and no merges is a character-level model that
    # keeps exact character offsets and maps unknown characters to <|unk|>.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>", fuse_unk=False))
    tok.decoder = decoders.Fuse()
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
