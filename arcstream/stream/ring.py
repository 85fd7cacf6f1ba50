"""The device-resident ring buffer where the forward pass meets its consumers.

The jitted step writes each batch's captured sites into the next slot of a
ring that lives on the mesh (`[S, B, T, D]` per site, `B` sharded over
'data'). Two consumers read it:

* the writer, through `DrainQueue`: the slot is copied to host asynchronously
  (`copy_to_host_async`) and handed to a background thread that appends the
  selected rows to the store. The queue holds at most `n_slots - 1` batches in
  flight, so when the writer falls a whole buffer behind, the producer waits
  (backpressure) and nothing is dropped;
* the online SAE trainer, through `make_sampler`: shuffled rows drawn on the
  device from every filled slot (tokens of many prompts and batches mixed),
  so SAE training never makes a host round trip.

Every token is used `passes` times (default once), not sampled with
replacement. Each token's next use has an *order* key, drawn when its batch
is written: `put + u * span / passes` with `u` uniform in [0, 1), `put` the
batch's number and `span = n_slots - 1`, and moved on by `span / passes` at
each use. A draw takes the smallest keys among the uses left, so an SAE batch
mixes the tokens of the last `span` batches in random order (a sliding shuffle
buffer). After batch `c` is written the trainer draws the uses due, those with
a key below `c + 1` (`due_uses`): their number sets the SAE steps of that
forward step, so the SAEs keep pace with the capture, and every use of a batch
is due before its slot is written again. At each commit and at the end of a
run the rest is drawn: what the SAEs saw at a commit is then a function of the
committed batches alone, and a resumed run (whose ring starts empty) trains
exactly as an uninterrupted one. A draw that finds fewer uses left than it needs (the last, partial
batch; a data shard with fewer tokens than the others) takes the tokens
still owed again, counted in `reused`; uses a slot still owed when it was overwritten are
counted in `lost` (zero unless shards are unbalanced, or the trainer stops drawing, as the
online SAEs do at `sae.total_steps`).

Why a ring rather than just the last batch: consecutive tokens of one prompt
are strongly correlated; an SAE batch drawn from S batches of packed prompts
is much closer to i.i.d., which is what SAE training assumes.

Sampling runs per 'data' shard (`shard_map`): each shard draws its share of
rows from its own slice of the ring, so a pod-wide SAE batch needs no
cross-host traffic and comes out sharded over 'data', ready for the
data-parallel SAE step.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
_REUSE = 1e7  # added to the key of a token with no use left: drawn only when nothing else is left


@dataclasses.dataclass(frozen=True)
class RingSpec:
    """Static shape of the ring: what it holds and how it is laid out."""

    sites: Mapping[str, int]  # site name -> d (width of the activation)
    n_slots: int  # S: batches kept on device
    batch_rows: int  # B: global rows per batch (sharded over 'data')
    seq_len: int  # T
    dtype: str = "bfloat16"
    seed: int = 0  # the random order of the draws

    def __post_init__(self):
        if self.n_slots < 2:
            raise ValueError(f"ring n_slots={self.n_slots}: need at least 2 (one being written, one being read)")
        if not self.sites:
            raise ValueError("ring needs at least one site")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RingState:
    """The ring's device arrays (a pytree, donated through the jitted step)."""

    acts: dict[str, jax.Array]  # site -> [S, B, T, D]
    valid: jax.Array  # bool [S, B, T]: rows the SAE may sample (real tokens of filled slots)
    uses_left: jax.Array  # int32 [S, B, T]: draws still owed to each token
    order: jax.Array  # float32 [S, B, T]: key of each token's next use (smallest drawn first)
    puts: jax.Array  # int32 []: batches written so far
    key: jax.Array  # uint32 [2]: the order keys' PRNG key
    lost: jax.Array  # int32 []: uses still owed by tokens whose slot was overwritten
    reused: jax.Array  # int32 []: draws of a token that had no use left (a partial last batch)


def ring_shardings(mesh: jax.sharding.Mesh) -> tuple[NamedSharding, NamedSharding]:
    """(activation sharding, mask sharding): slots replicated, rows over 'data'."""
    return NamedSharding(mesh, P(None, DATA_AXIS, None, None)), NamedSharding(mesh, P(None, DATA_AXIS, None))


def init_ring(spec: RingSpec, mesh: jax.sharding.Mesh, puts: int = 0) -> RingState:
    """Allocates the ring, already sharded, without a host copy.

    `puts`: batches already written (a resumed run's step), so that the draws' order keys
    continue where an uninterrupted run's would be.
    """
    act_sh, mask_sh = ring_shardings(mesh)
    n_data = mesh.shape[DATA_AXIS]
    if spec.batch_rows % n_data:
        raise ValueError(f"batch_rows={spec.batch_rows} is not divisible by the mesh's data axis ({n_data})")
    dtype = jnp.dtype(spec.dtype)
    shape = (spec.n_slots, spec.batch_rows, spec.seq_len)

    @jax.jit
    def _alloc():
        acts = {s: jax.lax.with_sharding_constraint(jnp.zeros(shape + (d,), dtype), act_sh)
                for s, d in spec.sites.items()}
        zeros = lambda dt: jax.lax.with_sharding_constraint(jnp.zeros(shape, dt), mask_sh)  # noqa: E731
        scalar = jnp.zeros((), jnp.int32)
        return RingState(acts, zeros(bool), zeros(jnp.int32), zeros(jnp.float32), jnp.full((), puts, jnp.int32),
                         jax.random.PRNGKey(spec.seed), scalar, scalar)

    return _alloc()


def ring_put(ring: RingState, slot: jax.Array, captures: Mapping[str, jax.Array], valid_bt: jax.Array,
             passes: int = 1) -> RingState:
    """Writes one batch into `slot` (traced inside the jitted step; with donation it is in place).

    Each valid token is owed `passes` draws; the key of its first is drawn at
    random in [puts, puts + span / passes) (see the module docstring).
    """
    if passes < 1:
        raise ValueError(f"sae.passes={passes}: every captured token is used at least once (>= 1)")

    def put(buf, new):
        return jax.lax.dynamic_update_index_in_dim(buf, new.astype(buf.dtype), slot, axis=0)

    valid_bt = valid_bt.astype(bool)
    span = max(ring.valid.shape[0] - 1, 1)
    u_bt = jax.random.uniform(jax.random.fold_in(ring.key, ring.puts), valid_bt.shape, jnp.float32)
    order_bt = ring.puts.astype(jnp.float32) + u_bt * (span / passes)
    owed = jnp.sum(jax.lax.dynamic_index_in_dim(ring.uses_left, slot, axis=0, keepdims=False))
    return dataclasses.replace(
        ring, acts={s: put(buf, captures[s]) for s, buf in ring.acts.items()}, valid=put(ring.valid, valid_bt),
        uses_left=put(ring.uses_left, valid_bt.astype(jnp.int32) * passes), order=put(ring.order, order_bt),
        puts=ring.puts + 1, lost=ring.lost + owed)


@jax.jit
def due_uses(ring: RingState) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(uses due, uses left, valid tokens of the newest batch), global counts.

    Due: a use whose key is below `puts`, i.e. what the newest batch's arrival made due.
    """
    owed = ring.uses_left > 0
    newest = jax.lax.dynamic_index_in_dim(ring.valid, (ring.puts - 1) % ring.valid.shape[0], axis=0,
                                          keepdims=False)
    return (jnp.sum(owed & (ring.order < ring.puts.astype(jnp.float32))), jnp.sum(ring.uses_left),
            jnp.sum(newest))


def make_sampler(mesh: jax.sharding.Mesh, n_rows: int, passes: int = 1
                 ) -> Callable[[RingState], tuple[dict[str, jax.Array], RingState]]:
    """Returns jitted `sample(ring) -> ({site: [n_rows, D]}, ring)`, rows sharded over 'data'.

    Each data shard draws `n_rows / n_data` rows of its own slice of the ring:
    the uses with the smallest keys (module docstring), without replacement;
    every site at the same rows. The ring is donated and comes back with those
    uses spent. A shard with fewer uses left than it draws takes the tokens it
    still owes again, cyclically; one that owes none takes its used tokens again
    (cyclically if it holds fewer valid tokens than it draws). One with no valid
    row at all (an empty ring, or only padding in every filled slot) still
    returns its full `n_rows / n_data` rows, never fewer: one padding row (the
    first token of its rows in slot 0: zeros if that slot was never written)
    repeated. Every row drawn again or of padding is counted in `ring.reused`.
    """
    n_data = mesh.shape[DATA_AXIS]
    if n_rows % n_data:
        raise ValueError(f"SAE batch of {n_rows} rows is not divisible by the data axis ({n_data})")
    per_shard = n_rows // n_data

    def _local(acts, valid, uses_left, order):
        v, left, o = valid.reshape(-1), uses_left.reshape(-1), order.reshape(-1)
        if v.shape[0] < per_shard:
            raise ValueError(f"the ring holds {v.shape[0]} rows per data shard, fewer than the {per_shard} of one "
                             "SAE batch; lower sae.batch_size or raise ring.n_slots")
        span = max(valid.shape[0] - 1, 1)
        score = jnp.where(left > 0, o, jnp.where(v, o + _REUSE, jnp.inf))
        _, idx = jax.lax.top_k(-score, per_shard)  # ascending score: uses left, then used tokens, then padding
        # Fewer uses left than the draw: those tokens again, cyclically, so that a draw depends only on the
        # uses owed (a resumed run's ring, empty at the commit, draws the same); a shard that owes none takes
        # used tokens again, and returns padding (one padding row, per_shard times) only if it has no valid row.
        n_owed, n_valid = jnp.sum(left > 0), jnp.sum(v)
        n_ok = jnp.minimum(jnp.where(n_owed > 0, n_owed, n_valid), per_shard)
        j = jnp.arange(per_shard)
        idx = idx[j % jnp.maximum(n_ok, 1)]
        fresh = (left[idx] > 0) & (j < n_ok)
        left = left.at[idx].add(-fresh.astype(left.dtype))
        o = o.at[idx].add(span / passes)
        reused = jax.lax.psum(jnp.sum(~fresh).astype(jnp.int32), DATA_AXIS)
        rows = {s: a.reshape(-1, a.shape[-1])[idx] for s, a in acts.items()}
        return rows, left.reshape(uses_left.shape), o.reshape(order.shape), reused

    def sample(ring: RingState) -> tuple[dict[str, jax.Array], RingState]:
        mask_spec = P(None, DATA_AXIS, None)
        fn = jax.shard_map(
            _local,
            mesh=mesh,
            in_specs=({s: P(None, DATA_AXIS, None, None) for s in ring.acts}, mask_spec, mask_spec, mask_spec),
            out_specs=({s: P(DATA_AXIS, None) for s in ring.acts}, mask_spec, mask_spec, P()),
            check_vma=False,
        )
        rows, uses_left, order, reused = fn(ring.acts, ring.valid, ring.uses_left, ring.order)
        return rows, dataclasses.replace(ring, uses_left=uses_left, order=order, reused=ring.reused + reused)

    return jax.jit(sample, donate_argnums=(0,))


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in global row order.

    With a 'model' axis the same rows sit on several local devices; each block
    of rows is taken once.
    """
    blocks = _row_blocks(x)
    return np.concatenate([np.asarray(blocks[k].data) for k in sorted(blocks)], axis=0)


def _row_blocks(x: jax.Array) -> dict[int, Any]:
    """This process's shards of a batch-sharded array, one per block of rows (keyed by its first global row):
    with a 'model' axis the same rows sit on several local devices, and each block counts once."""
    blocks: dict[int, Any] = {}
    for sh in x.addressable_shards:
        blocks.setdefault(sh.index[0].start or 0, sh)
    return blocks


@dataclasses.dataclass(frozen=True)
class CompactRows:
    """This process's kept tokens of a batch-sharded [B, T, D] array, gathered on each device before the
    device-to-host copy (`compact_rows`): per block of rows, its first global row, the device array
    [capacity, D] and how many of its rows count. Only the kept rows (rounded up to the capacity) cross."""

    blocks: tuple[tuple[int, jax.Array | None, int], ...]
    width: int
    dtype: Any

    def copy_to_host_async(self) -> None:
        for _, a, _ in self.blocks:
            if a is not None:
                a.copy_to_host_async()

    @property
    def nbytes(self) -> int:
        """The bytes the copy moves: every block's whole [capacity, D] array."""
        return sum(a.nbytes for _, a, _ in self.blocks if a is not None)

    def host(self) -> np.ndarray:
        """[kept, D]: the kept rows in this process's token order (rows, then positions)."""
        parts = [np.asarray(a)[:n] for _, a, n in sorted(self.blocks, key=lambda b: b[0]) if n]
        if not parts:
            return np.zeros((0, self.width), self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


_MIN_CAPACITY = 64


def _capacity(n: int, full: int) -> int:
    """The gather's static size for n kept tokens of `full`: the next power of two from _MIN_CAPACITY (so a
    run compiles a handful of sizes), never more than the block."""
    return min(full, max(_MIN_CAPACITY, 1 << max(0, n - 1).bit_length()))


@jax.jit
def _take_rows(x_rtd: jax.Array, idx_c: jax.Array) -> jax.Array:
    return x_rtd.reshape(-1, x_rtd.shape[-1])[idx_c]


def compact_rows(x: jax.Array, keep: np.ndarray) -> CompactRows:
    """The tokens `keep` of this process's rows of `x` [B, T, D] (rows over 'data'), gathered on each
    device that holds them, so that `store.tokens=answer` or `grid` copies only those rows to the host.

    `keep`: sorted flat indices into this process's rows as `local_rows` orders them ([B_local * T]).
    Each device gathers its own rows' kept tokens (a computation on that device alone: no collective,
    so each process picks its own sizes); a block replicated over 'model' is gathered once.
    """
    t, d = x.shape[1], x.shape[2]
    shards = _row_blocks(x)
    if not shards:
        return CompactRows((), d, x.dtype)
    base = min(shards)
    keep = np.asarray(keep, np.int64)
    blocks = []
    # Each gather is a one-device program: outside the run's mesh context (jax.set_mesh), which jit would
    # otherwise require its arguments to span.
    with jax.set_mesh(None):
        for start, sh in shards.items():
            blocks.append(_gather_block(start, sh, keep, base, t))
    return CompactRows(tuple(blocks), d, x.dtype)


def _gather_block(start: int, sh: Any, keep: np.ndarray, base: int, t: int) -> tuple[int, jax.Array | None, int]:
    """(first global row, the kept tokens of one shard gathered on its device, how many count)."""
    lo = (start - base) * t
    hi = lo + sh.data.shape[0] * t
    sel = keep[np.searchsorted(keep, lo):np.searchsorted(keep, hi)] - lo
    if sel.size == 0:
        return start, None, 0
    idx = np.zeros(_capacity(sel.size, hi - lo), np.int32)
    idx[:sel.size] = sel
    return start, _take_rows(sh.data, jax.device_put(idx, sh.data.sharding)), int(sel.size)


def to_host(x: jax.Array | CompactRows) -> np.ndarray:
    """A drained array on the host: a CompactRows' kept rows, or this process's rows of a batch array."""
    return x.host() if isinstance(x, CompactRows) else local_rows(x)


@dataclasses.dataclass
class DrainStats:
    batches: int = 0
    bytes: int = 0  # copied to the host (a CompactRows' gathered blocks, capacity rounding included)
    d2h_seconds: float = 0.0  # waiting for device-to-host copies (in the drain thread)
    sink_seconds: float = 0.0  # time inside the sink (host compaction + store append)
    backpressure_seconds: float = 0.0  # producer time spent waiting for a free slot
    backpressure_waits: int = 0


class DrainQueue:
    """Moves captured slots to host in the background and hands them to a sink.

    `put(arrays, meta)` starts the device-to-host copies and returns at once
    unless `max_in_flight` batches are already queued, in which case it blocks
    until the drain catches up (backpressure: the forward never runs more than
    a ring's worth ahead of the disk, and nothing is dropped). `sink(host_arrays,
    meta)` runs on the drain thread in submission order.

    Errors stay visible: the first exception of the drain (a device-to-host
    copy or the sink, e.g. a full disk) is kept, never cleared; from then on
    nothing more reaches the sink (batches queued after it are discarded, so
    no row is written after the failure), and every later `put`/`join`/`close`
    raises that same exception object (original type and message, with a note
    saying where it happened). Use the queue as a context manager (or call
    `close(exc)` with the exception in flight): shutting down during another
    error never replaces it; a drain error is added to it as a note instead.
    A drain thread that does not stop is reported, never silently abandoned.
    """

    def __init__(self, sink: Callable[[dict[str, np.ndarray], Any], None], max_in_flight: int,
                 join_timeout_s: float = 60.0):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight={max_in_flight}: must be >= 1")
        self._sink = sink
        self._q: queue.Queue = queue.Queue(maxsize=max_in_flight)
        # Batches handed to `put` and not yet through the sink (or discarded), kept here rather than read from
        # the queue's internals; `_done` is notified at each change and when the drain fails.
        self._unwritten = 0
        self._done = threading.Condition()
        self._error: BaseException | None = None
        self._abort = threading.Event()  # the producer failed: drop what is queued
        self._join_timeout_s = join_timeout_s
        self._closed = False
        self.stats = DrainStats()
        self.discarded = 0  # batches not written because of an earlier failure (or an abort)
        self._thread = threading.Thread(target=self._run, name="arcstream-drain", daemon=True)
        self._thread.start()

    @property
    def error(self) -> BaseException | None:
        """The drain's first exception, if any (kept for good)."""
        return self._error

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, arrays: Mapping[str, jax.Array], meta: Any) -> None:
        if self._closed:
            raise RuntimeError("DrainQueue.put after close()")
        self._raise_if_failed()
        for a in arrays.values():
            a.copy_to_host_async()
        item = (dict(arrays), meta)
        with self._done:
            self._unwritten += 1  # counted before the drain thread can see it, so the count never goes below 0
        try:
            self._q.put_nowait(item)
        except queue.Full:
            t0 = time.perf_counter()
            self.stats.backpressure_waits += 1
            try:
                while True:
                    self._raise_if_failed()
                    self._check_thread()
                    try:
                        self._q.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
            except BaseException:
                self._mark_done()  # never queued
                raise
            self.stats.backpressure_seconds += time.perf_counter() - t0

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            arrays, meta = item
            try:
                if self._error is not None or self._abort.is_set():
                    self.discarded += 1  # nothing is written after a failure
                    continue
                t0 = time.perf_counter()
                host = {k: to_host(v) for k, v in arrays.items()}
                t1 = time.perf_counter()
                self._sink(host, meta)
                t2 = time.perf_counter()
                self.stats.d2h_seconds += t1 - t0
                self.stats.sink_seconds += t2 - t1
                self.stats.batches += 1
                self.stats.bytes += sum(arrays[k].nbytes if isinstance(arrays[k], CompactRows)
                                        else v.nbytes for k, v in host.items())
            except BaseException as e:  # noqa: BLE001 - handed to the producer thread
                e.add_note(f"(raised in the drain thread while writing batch {self.stats.batches + 1}; no batch "
                           "after it was written)")
                self._error = e
            finally:
                self._mark_done()

    def _mark_done(self) -> None:
        with self._done:
            self._unwritten -= 1
            self._done.notify_all()

    def _check_thread(self) -> None:
        if not self._thread.is_alive() and self._unwritten > 0:
            raise RuntimeError(f"the drain thread is gone with {self._unwritten} batches unwritten")

    @property
    def in_flight(self) -> int:
        return self._q.qsize()

    def join(self) -> None:
        """Waits until every queued batch went through the sink; raises the drain's first failure."""
        with self._done:
            while self._unwritten > 0:
                # After a failure the drain thread only discards what is queued (no sink call), so this wait
                # stays short and `discarded` is complete when the error is raised.
                self._check_thread()
                # Woken at each batch written or discarded; the timeout only bounds how late a drain thread
                # that died outside its try block is noticed.
                self._done.wait(timeout=0.1)
        self._raise_if_failed()

    def close(self, exc: BaseException | None = None) -> None:
        """Stops the drain thread; idempotent.

        `exc=None` (normal end): writes what is queued, then raises the drain's
        first failure if there was one, or a RuntimeError when the thread does
        not stop within `join_timeout_s`. With `exc` (the producer is failing):
        queued batches are dropped, nothing is raised, and a drain failure or a
        stuck thread is added to `exc` as a note, so the producer's own error is
        the one that surfaces.
        """
        if self._closed:
            if exc is None:
                self._raise_if_failed()
            return
        self._closed = True
        if exc is not None:
            self._abort.set()
        problem = None
        try:
            self._q.put(None, timeout=self._join_timeout_s)
        except queue.Full:
            pass  # the thread is stuck: reported below
        self._thread.join(timeout=self._join_timeout_s)
        if self._thread.is_alive():
            problem = (f"did not stop within {self._join_timeout_s:g} s (stuck in the sink, e.g. a hung disk or "
                       f"network write) with {self._unwritten} batches unwritten")
        if exc is not None:
            if self._error is not None and self._error is not exc:
                exc.add_note(f"the activation drain had failed too: {type(self._error).__name__}: {self._error}")
            if problem:
                exc.add_note(f"the activation drain thread was left running: it {problem}")
            return
        self._raise_if_failed()
        if problem:
            raise RuntimeError(f"the activation drain thread {problem}; rows after the last commit are not "
                               "durable (a resumed run rewrites them)")

    def __enter__(self) -> "DrainQueue":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(exc)
