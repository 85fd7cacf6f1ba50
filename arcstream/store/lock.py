"""The run lock: one job of a kind writes a run directory at a time.

Why: nothing else stops two runs on one directory (a relaunch while a zombie
run still runs, a SLURM requeue, a pod started without the distributed flag
so every host thinks it is process 0 of 1). On a fresh directory the second
run deletes the first one's arrays; with a manifest both overwrite the same
shards and commit records, and appended files interleave. No error is raised.

The lock is `<dir>/.<job>.lock` (job = `run`, `train_sae`, `analyze`,
`predict`, `train_lm`), taken at the entry point (`arcstream.cli`) for the
job's whole lifetime, in one of two ways:

- **flock** (local directories, `file://` URLs): `fcntl.flock(LOCK_EX |
  LOCK_NB)` on the lock file, held by an open descriptor. The OS releases it
  when the process ends, however it ends (SIGKILL included), so a flock is
  never stale. The file records the holder (run id, host, pid, start time) for
  the refusal message, and `released` when its holder let go: a record
  without it was left by a killed holder, which is logged when the lock is
  taken. The file is never deleted (a delete races with a process that has
  just opened it and would lock an unlinked file).
- **lease** (kvstore URLs: `gs://`, `s3://`, `memory://`, ...; there is no
  flock): the lock object holds JSON (run id, host, pid, started, heartbeat)
  and is only ever written with a conditional write (TensorStore `if_equal` on
  the object's generation), so of two writers racing for it exactly one wins.
  A heartbeat thread refreshes it every `timeout / 4`. A second writer
  refuses while the heartbeat is younger than `timeout`; an older one is stale
  (its holder was killed, or lost the network) and is taken over with a
  logged warning. Heartbeats are wall-clock times of the holder's host: the
  timeout must stay well above the clock skew between hosts. A holder whose
  lease was taken over (it stalled past the timeout) logs an error and stops
  its job (`on_lost`, by default KeyboardInterrupt in the main thread): it no
  longer owns the directory.

Settings (environment, so every job reads them alike):
  ARCSTREAM_RUN_LOCK=auto|flock|lease   auto: flock for local paths, lease for URLs.
                                        lease on a local path is for file systems whose
                                        flock does not reach other hosts (some NFS mounts).
  ARCSTREAM_LEASE_TIMEOUT_S=60          seconds without a heartbeat after which a lease is stale.

This module knows nothing of JAX: with several processes the entry point lets
process 0 take the lock and the others `check_run_lock` that it is there.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from absl import logging

from arcstream.io import RunLocation, StoreError

MODES = ("auto", "flock", "lease")
DEFAULT_LEASE_TIMEOUT_S = 60.0


def lock_key(job: str) -> str:
    """The lock's file name in the run directory, e.g. `.run.lock`."""
    if not job or "/" in job or job.startswith("."):
        raise ValueError(f"job name {job!r} cannot name a lock file; expected e.g. 'run' or 'train_sae'")
    return f".{job}.lock"


def new_run_id() -> str:
    """16 random hex digits: short enough for a message, and for process 0 to broadcast to the others."""
    return uuid.uuid4().hex[:16]


def lease_timeout_s() -> float:
    text = os.environ.get("ARCSTREAM_LEASE_TIMEOUT_S", "")
    if not text:
        return DEFAULT_LEASE_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"ARCSTREAM_LEASE_TIMEOUT_S={text!r}: expected a positive number of seconds")
    return value


def lock_mode(location: RunLocation, mode: str | None = None) -> str:
    """'flock' or 'lease' for this location (`mode` or ARCSTREAM_RUN_LOCK, default auto)."""
    mode = mode or os.environ.get("ARCSTREAM_RUN_LOCK", "") or "auto"
    if mode not in MODES:
        raise ValueError(f"ARCSTREAM_RUN_LOCK={mode!r}: expected one of {MODES}")
    if mode == "auto":
        return "flock" if location.local is not None else "lease"
    if mode == "flock" and location.local is None:
        raise ValueError(f"ARCSTREAM_RUN_LOCK=flock, but {location.url} is a kvstore URL, which has no flock; "
                         "use auto or lease")
    return mode


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) a run lock: what the lock file / lease records."""

    job: str
    run_id: str
    host: str
    pid: int
    started: float  # time.time() when the lock was taken
    heartbeat: float | None = None  # leases: time.time() of the last heartbeat
    released: float | None = None  # flock: set when the holder let go

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: bytes) -> "LockHolder | None":
        """The record, or None for an empty or unreadable one (a holder caught mid-write)."""
        try:
            obj = json.loads(data)
            return cls(job=str(obj["job"]), run_id=str(obj["run_id"]), host=str(obj["host"]), pid=int(obj["pid"]),
                       started=float(obj["started"]),
                       heartbeat=None if obj.get("heartbeat") is None else float(obj["heartbeat"]),
                       released=None if obj.get("released") is None else float(obj["released"]))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        text = (f"host {self.host}, pid {self.pid}, run id {self.run_id}, since {_when(self.started)} "
                f"({now - self.started:.0f} s ago)")
        if self.heartbeat is not None:
            text += f", last heartbeat {now - self.heartbeat:.0f} s ago"
        return text


class RunLockedError(StoreError):
    """Another job of the same kind holds the directory's lock; the message names the directory and the holder."""

    def __init__(self, directory: str, job: str, holder: LockHolder | None, how: str, flag: str):
        self.directory, self.job, self.holder = directory, job, holder
        who = holder.describe() if holder is not None else "holder unknown (its lock record is empty or damaged)"
        super().__init__(
            f"{directory} is in use: another {job} job holds its lock {lock_key(job)} ({how}): {who}. "
            f"Two jobs writing one directory overwrite each other's files, so this one stops before writing "
            f"anything. Wait for that job to end (or stop it), or choose another directory ({flag}=...).")


def _holder(job: str, run_id: str, *, heartbeat: bool) -> LockHolder:
    now = time.time()
    return LockHolder(job=job, run_id=run_id, host=socket.gethostname(), pid=os.getpid(), started=now,
                      heartbeat=now if heartbeat else None)


class RunLock:
    """A held run lock (see the module docstring). `release()` (or leaving the `with` block) lets go."""

    def __init__(self, location: RunLocation, job: str, holder: LockHolder, mode: str):
        self.location, self.job, self.holder, self.mode = location, job, holder, mode
        self.key = lock_key(job)
        self.lost = False  # leases: another writer took it over (this holder stalled past the timeout)
        self.taken_over: LockHolder | None = None  # the previous holder when it had not released the lock
        self._fd: int | None = None
        self._generation: bytes | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    @property
    def where(self) -> str:
        return f"{self.location.url.rstrip('/')}/{self.key}"

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        """Lets go of the lock; idempotent. A failure to release is logged (the lock then goes stale), never
        raised: it must not hide the job's own error."""
        if self.mode == "flock":
            if self._fd is None:
                return
            try:
                rec = dataclasses.replace(self.holder, released=time.time())
                _rewrite(self._fd, json.dumps(rec.to_json()).encode())
            except OSError as err:
                logging.warning("run lock %s: could not mark it released (%s)", self.where, err)
            finally:
                os.close(self._fd)  # closing the descriptor releases the flock
                self._fd = None
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                logging.error("run lock %s: the heartbeat thread did not stop within 30 s", self.where)
        with self._mutex:
            if self._generation is None or self.lost:
                return
            try:
                self.location._kv().write(self.key, None, if_equal=self._generation).result()
            except Exception as err:  # noqa: BLE001 - see the docstring
                logging.warning("run lock %s: could not delete the lease (%s); it goes stale after %.0f s",
                                self.where, err, self.timeout_s)
            self._generation = None

    # --- leases: heartbeat -------------------------------------------------------------------------

    timeout_s: float = DEFAULT_LEASE_TIMEOUT_S

    def _start_heartbeat(self, timeout_s: float, on_lost: Callable[[], None]) -> None:
        self.timeout_s = timeout_s
        self._on_lost = on_lost
        self._thread = threading.Thread(target=self._beat, name=f"arcstream-lock-{self.job}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = max(0.05, self.timeout_s / 4)
        while not self._stop.wait(interval):
            with self._mutex:
                if self._generation is None:
                    return
                rec = dataclasses.replace(self.holder, heartbeat=time.time())
                try:
                    stamp = self.location._kv().write(self.key, json.dumps(rec.to_json()).encode(),
                                                      if_equal=self._generation).result()
                except Exception as err:  # noqa: BLE001 - a missed beat is retried; the timeout allows 3 more
                    logging.warning("run lock %s: heartbeat failed (%s); retrying in %.0f s", self.where, err,
                                    interval)
                    continue
                if stamp.generation:
                    self._generation, self.holder = stamp.generation, rec
                    continue
                self.lost, self._generation = True, None
            now = _read_holder(self.location, self.key)
            logging.error(
                "run lock %s was taken over by another %s job (%s): this job stalled for more than %.0f s "
                "without a heartbeat, so its lease went stale. Stopping this job: the other one now owns the "
                "directory.", self.where, self.job, now.describe() if now else "holder unknown", self.timeout_s)
            self._on_lost()
            return


def _rewrite(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _read_holder(location: RunLocation, key: str) -> LockHolder | None:
    data = location.read_bytes(key)
    return None if data is None else LockHolder.from_json(data)


def _read_holder_patiently(location: RunLocation, key: str) -> LockHolder | None:
    """A flock holder writes its record just after taking the lock: give it a moment."""
    for _ in range(20):
        holder = _read_holder(location, key)
        if holder is not None:
            return holder
        time.sleep(0.05)
    return None


def _interrupt_main() -> None:
    import _thread

    _thread.interrupt_main()


def acquire_run_lock(location: str | os.PathLike | RunLocation, job: str, *, run_id: str | None = None,
                     mode: str | None = None, timeout_s: float | None = None, flag: str = "--config.output_dir",
                     on_lost: Callable[[], None] = _interrupt_main) -> RunLock:
    """Takes `job`'s lock on the run directory, or raises `RunLockedError` naming the holder.

    A local directory is created if missing. `mode`/`timeout_s` default to the
    environment settings (module docstring); `flag` names the setting a refused
    user can change.
    """
    loc = location if isinstance(location, RunLocation) else RunLocation(location)
    run_id = run_id or new_run_id()
    mode = lock_mode(loc, mode)
    key = lock_key(job)
    if mode == "flock":
        return _acquire_flock(loc, job, key, run_id, flag)
    return _acquire_lease(loc, job, key, run_id, timeout_s or lease_timeout_s(), flag, on_lost)


def _acquire_flock(loc: RunLocation, job: str, key: str, run_id: str, flag: str) -> RunLock:
    import fcntl

    loc.ensure_writable()
    path = loc.local / key
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunLockedError(loc.url, job, _read_holder_patiently(loc, key), "flock", flag) from None
        raise StoreError(f"cannot lock {path}: {err}. If this file system has no working flock (some NFS "
                         "mounts), set ARCSTREAM_RUN_LOCK=lease") from err
    lock = RunLock(loc, job, _holder(job, run_id, heartbeat=False), "flock")
    lock._fd = fd
    previous = _read_holder(loc, key)
    if previous is not None and previous.released is None:
        lock.taken_over = previous
        logging.warning("run lock %s: the previous %s job (%s) ended without releasing it (killed?); taking it "
                        "over. Its committed work is kept; a run resumes from its last commit.", lock.where, job,
                        previous.describe())
    try:
        _rewrite(fd, json.dumps(lock.holder.to_json()).encode())
    except OSError as err:
        os.close(fd)
        raise StoreError(f"cannot write the run lock {path}: {err}") from err
    return lock


def _acquire_lease(loc: RunLocation, job: str, key: str, run_id: str, timeout_s: float, flag: str,
                   on_lost: Callable[[], None]) -> RunLock:
    kv = loc._kv()
    for _ in range(10):  # each pass either wins, refuses, or lost a race to a writer that changed the object
        current = kv.read(key).result()
        previous = None
        if current.state != "missing":
            previous = LockHolder.from_json(bytes(current.value))
            age = None if previous is None else time.time() - (previous.heartbeat or previous.started)
            if age is not None and age < timeout_s:
                raise RunLockedError(loc.url, job, previous, f"lease, stale after {timeout_s:.0f} s", flag)
        holder = _holder(job, run_id, heartbeat=True)
        stamp = kv.write(key, json.dumps(holder.to_json()).encode(), if_equal=current.stamp.generation).result()
        if not stamp.generation:
            continue  # someone else wrote it between our read and write: look again
        lock = RunLock(loc, job, holder, "lease")
        lock._generation = stamp.generation
        if current.state != "missing":
            lock.taken_over = previous
            logging.warning("run lock %s: taking over a stale lease (%s; no heartbeat for more than %.0f s, "
                            "its holder was killed or lost the network).", lock.where,
                            previous.describe() if previous else "unreadable record", timeout_s)
        lock._start_heartbeat(timeout_s, on_lost)
        return lock
    raise StoreError(f"{loc.url}: could not take the run lock {key}: it kept changing under 10 attempts")


def check_run_lock(location: str | os.PathLike | RunLocation, job: str, run_id: str) -> LockHolder:
    """For processes other than 0: the lock process 0 took for this run (same run id) is in place."""
    loc = location if isinstance(location, RunLocation) else RunLocation(location)
    key = lock_key(job)
    holder = _read_holder(loc, key)
    if holder is None or holder.run_id != run_id or holder.released is not None:
        found = ("no lock record" if holder is None else
                 f"a lock its holder released ({holder.describe()})" if holder.run_id == run_id else
                 f"the record of another holder ({holder.describe()})")
        raise StoreError(
            f"{loc.url}/{key}: process 0 took the run lock for run id {run_id}, but this process finds {found}. "
            "Every process of a run must see the same run directory (a shared file system or bucket).")
    return holder


__all__ = ["LockHolder", "RunLock", "RunLockedError", "acquire_run_lock", "check_run_lock", "lease_timeout_s",
           "lock_key", "lock_mode", "new_run_id"]
