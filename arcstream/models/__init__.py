"""Models shipped inside the package (HF layout: config.json, model.safetensors, tokenizer files, README.md).

- `arcstream-tiny`: the embedded default run's model, trained by
  `python -m arcstream.train_lm --config=configs/train_lm.py`; its README.md is
  the model card (data, steps, loss curve, held-out loss and accuracy).

`path(name)` gives the folder, which any job takes as `--config.model=...` and
which `transformers.AutoModelForCausalLM.from_pretrained` loads as well.
"""

from __future__ import annotations

from pathlib import Path

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
