"""Frozen option objects from config sections: the one place that turns a ConfigDict into checked options.

Every job's library function takes a frozen dataclass (`RunOptions`, `TrainLMOptions`, `PredictOptions`,
`SAEOptions`, ...) whose fields, defaults and field comments are the only definition of its config keys.
`from_section(cls, section, flag)` builds one from a config section (a `ConfigDict` or a mapping):

- a key the dataclass lacks is refused, naming `flag.KEY` and the keys there are;
- a missing key takes the field's default;
- each value is checked against the field's annotation and named when it does not fit (`--config.train.lr='x'
  is not a float`): `bool` fields take only booleans, `int` fields integers (or integral floats), `float`
  fields numbers, `str` fields strings; a field whose type is itself an options dataclass is built from its
  sub-section the same way; a `Section` field (a free-form section owned by another module, e.g. `data`)
  is kept as an immutable `ml_collections.FrozenConfigDict` for that module to read.

`section_of(cls)` is the reverse: the `ConfigDict` of a dataclass's defaults, which `configs/*.py` start from,
so a key is added in one place. `as_dict(options)` is the plain JSON-able view (for fingerprints and records). A field with metadata
`{"config": False}` is not a config key (neither read from a section nor written back).

A job's whole config: `from_config(cls, config)` is `from_section` at the top (`--config`), any refusal raised
as `ConfigError` (a ValueError the entry points print as one line), and, when the
dataclass has a `RESOLVED` field, keeps there the config exactly as given, in JSON types (what a job
writes beside its outputs and compares on resume); `fill_resolved(options)` in `__post_init__` sets it
to `as_dict(options)` for options built directly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import ml_collections
import numpy as np

T = TypeVar("T")


class ConfigError(ValueError):
    """A job's config refused by its options (`from_config`): the message names the flag and what is wrong.
    An entry point prints it as one line and exits EXIT_CONFIG (cli.run_job), without a traceback."""


# A free-form config section read by the module that owns it (kept as given, frozen).
Section = ml_collections.FrozenConfigDict


def _items(section: Any, flag: str) -> dict[str, Any]:
    if isinstance(section, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        return {k: section[k] for k in section.keys()}
    if isinstance(section, Mapping):
        return dict(section)
    raise ValueError(f"{flag} is {section!r}; expected a config section (ConfigDict or mapping)")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check(annotation: Any, value: Any, flag: str) -> Any:
    """`value` as the field type `annotation` wants, or a ValueError naming `flag`."""
    if dataclasses.is_dataclass(annotation):
        return value if isinstance(value, annotation) else from_section(annotation, value, flag)
    if annotation is Section:
        if isinstance(value, ml_collections.FrozenConfigDict):
            return value
        if isinstance(value, ml_collections.ConfigDict):
            return ml_collections.FrozenConfigDict(value)  # field references resolved
        return ml_collections.FrozenConfigDict(_items(value, flag))
    if annotation is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
    elif annotation is int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            return int(value)
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        return value  # tuples, unions, Any: the dataclass's own __post_init__ checks them
    name = annotation.__name__
    raise ValueError(f"{flag}={value!r} is not {'an' if name[0] in 'aeiou' else 'a'} {name}")


def from_section(cls: type[T], section: Any, flag: str, *, ignore: tuple[str, ...] = ()) -> T:
    """`cls` (a frozen dataclass) from the config section `section`, checked as the module docstring says.

    `flag` names the section in errors (`--config.train`); keys in `ignore` are skipped (keys of the same
    section that another reader owns)."""
    given = _items(section, flag)
    fields = {f.name for f in _config_fields(cls)}
    unknown = sorted(set(given) - fields - set(ignore))
    if unknown:
        raise ValueError(f"{flag}.{unknown[0]} is not a key of this section (unknown: {unknown}); the keys are "
                         f"{sorted(fields)} ({cls.__module__}.{cls.__qualname__} documents each)")
    hints = _hints(cls)
    kwargs = {name: _check(hints[name], value, f"{flag}.{name}") for name, value in given.items() if name in fields}
    return cls(**kwargs)


def section_field(make: Any) -> Any:
    """A `Section` field whose default is `make()` (a ConfigDict factory), frozen."""
    return dataclasses.field(default_factory=lambda: ml_collections.FrozenConfigDict(make()))


RESOLVED = "resolved"


def resolved_field() -> Any:
    """The `resolved` field of a job's options: the config as given (not a config key itself)."""
    return dataclasses.field(default_factory=dict, compare=False, repr=False, metadata={"config": False})


def from_config(cls: type[T], config: Any, flag: str = "--config") -> T:
    """A job's options from its whole config (a ConfigDict, a mapping, or the options themselves)."""
    if isinstance(config, cls):
        return config
    try:
        opts = from_section(cls, config, flag)
    except ConfigError:
        raise
    except ValueError as e:  # a key's own check (a field's type or an options __post_init__)
        raise ConfigError(str(e)) from e
    if any(f.name == RESOLVED for f in dataclasses.fields(cls)):
        given = (json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort")
                 else as_dict(opts))
        opts = dataclasses.replace(opts, **{RESOLVED: given})
    return opts


def fill_resolved(options: Any) -> None:
    """For `__post_init__`: options built directly (not from a config) are their own resolved config."""
    if not getattr(options, RESOLVED):
        object.__setattr__(options, RESOLVED, as_dict(options))


def _config_fields(cls: Any) -> list[dataclasses.Field]:
    """The fields that are config keys (a field with metadata {"config": False} is the object's own)."""
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("config", True)]


def section_of(cls: type) -> ml_collections.ConfigDict:
    """The ConfigDict of `cls`'s defaults (nested dataclasses as sub-sections): what a config file starts from."""
    # From the fields' defaults, not from `cls()`: a job's options may refuse their defaults (a required key).
    out = {}
    for f in _config_fields(cls):
        out[f.name] = as_dict(f.default if f.default is not dataclasses.MISSING else f.default_factory())
    return ml_collections.ConfigDict(out)


def as_dict(options: Any) -> dict[str, Any]:
    """Plain JSON types: nested options as dicts, frozen sections as dicts, tuples as lists."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in _config_fields(v)}
        if isinstance(v, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
            return json.loads(v.to_json_best_effort())
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(options)
