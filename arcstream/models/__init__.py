"""Models shipped inside the package (HF layout: config.json, model.safetensors, tokenizer files, README.md).

- `arcstream-tiny`: the embedded default run's model, trained by
  `python -m arcstream.train_lm --config=configs/train_lm.py`; its README.md is
  the model card (data, steps, loss curve, held-out loss and accuracy).

`path(name)` gives the folder, which any job takes as `--config.model=...` and
which `transformers.AutoModelForCausalLM.from_pretrained` loads as well.
`prompt_format(name)` is the prompt format the model was trained on (its
`arcstream_prompt.json`, written by train_lm's export): the one place the
default run, the tests and the card read it from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROMPT_FORMAT_FILE = "arcstream_prompt.json"
PROMPT_FORMAT_KEYS = ("template", "encoder", "use_chat_template")

SHIPPED = ("arcstream-tiny",)


def path(name: str = "arcstream-tiny") -> str:
    """The absolute folder of a shipped model."""
    if name not in SHIPPED:
        raise ValueError(f"no shipped model named {name!r}; arcstream ships {list(SHIPPED)}")
    folder = Path(__file__).resolve().parent / name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"shipped model {name!r} is missing its files under {folder}; reinstall arcstream "
                                "or retrain it: python -m arcstream.train_lm --config=configs/train_lm.py")
    return str(folder)


def prompt_format(name: str = "arcstream-tiny") -> dict[str, Any]:
    """The data-config keys of the prompt format a shipped model was trained on (`PROMPT_FORMAT_KEYS`)."""
    fmt = folder_prompt_format(path(name))
    if fmt is None:
        raise FileNotFoundError(f"{Path(path(name)) / PROMPT_FORMAT_FILE}: the shipped model's prompt format is "
                                "missing; reinstall arcstream")
    return fmt


def folder_prompt_format(folder: str | Path) -> dict[str, Any] | None:
    """The `PROMPT_FORMAT_KEYS` of a model folder's `arcstream_prompt.json`; None when the folder has none (a hub
    name, or a checkpoint arcstream did not train). A file that is there but unreadable is an error, named."""
    f = Path(folder) / PROMPT_FORMAT_FILE
    if not f.is_file():
        return None
    try:
        fmt = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{f}: the model's prompt format is unreadable ({e})") from None
    missing = [k for k in PROMPT_FORMAT_KEYS if k not in fmt]
    if missing:
        raise ValueError(f"{f} lacks {missing}; expected the keys {list(PROMPT_FORMAT_KEYS)}")
    return {k: fmt[k] for k in PROMPT_FORMAT_KEYS}


def write_prompt_format(folder: str | Path, data_config: Any) -> Path:
    """Writes `arcstream_prompt.json` (the `PROMPT_FORMAT_KEYS` of a data config) into a model folder."""
    out = Path(folder) / PROMPT_FORMAT_FILE
    out.write_text(json.dumps({k: data_config[k] for k in PROMPT_FORMAT_KEYS}, indent=1) + "\n", encoding="utf-8")
    return out
