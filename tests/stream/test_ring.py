"""The device ring buffer: slot writes, on-device sampling, the drain's order and backpressure."""

import errno
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from arcstream.stream.ring import (DrainQueue, RingSpec, compact_rows, due_uses, init_ring, local_rows, make_sampler,
                                  ring_put, to_host)


def _mesh(data, model):
    return jax.make_mesh((data, model), ("data", "model"), axis_types=(AxisType.Auto,) * 2,
                         devices=jax.devices()[: data * model])


def _batch(step, B, T, D):
    """Activations whose every entry encodes (step, row, t) so sampled rows can be traced back."""
    ids = (step * 10000 + np.arange(B)[:, None] * 100 + np.arange(T)[None, :]).astype(np.float32)  # B <= 100, T <= 100
    return np.repeat(ids[..., None], D, axis=-1)


def _run_ring(mesh, *, S, B, T, D, steps, n_rows, passes, valid_p, seed=0):
    """Puts `steps` batches and draws as the online trainer does: after each put ceil(due / n_rows)
    draws, and at the end every use left. Returns (ids drawn per draw, the ids of valid tokens, ring)."""
    spec = RingSpec({"a": D, "b": 2 * D}, n_slots=S, batch_rows=B, seq_len=T, dtype="float32", seed=seed)
    ring = init_ring(spec, mesh)
    put = jax.jit(ring_put, donate_argnums=0, static_argnums=4)
    sample = make_sampler(mesh, n_rows=n_rows, passes=passes)
    rng = np.random.default_rng(seed)
    valid_ids, draws = [], []

    def draw(ring):
        out, ring = sample(ring)
        a, b = np.asarray(out["a"]), np.asarray(out["b"])
        assert a.shape == (n_rows, D) and b.shape == (n_rows, 2 * D)
        # Both sites are sampled at the same rows (the SAEs of a step see the same tokens).
        np.testing.assert_array_equal(b[:, :D], a)
        np.testing.assert_array_equal(b[:, D:], -a)
        assert out["a"].sharding.is_equivalent_to(NamedSharding(mesh, P("data", None)), 2)
        draws.append(a[:, 0].astype(int))
        return ring

    for step in range(steps):
        x = _batch(step, B, T, D)
        valid = rng.random((B, T)) < valid_p
        valid_ids += x[..., 0][valid].astype(int).tolist()
        caps = {"a": jnp.asarray(x), "b": jnp.asarray(np.concatenate([x, -x], -1))}
        ring = put(ring, jnp.int32(step % S), caps, jnp.asarray(valid), passes)
        due, left, new = (int(v) for v in due_uses(ring))
        assert new == int(valid.sum()) and left >= due
        for _ in range(-(-due // n_rows)):
            ring = draw(ring)
    while int(due_uses(ring)[1]):
        ring = draw(ring)
    return draws, valid_ids, ring


@pytest.mark.parametrize("data,model,passes", [(1, 1, 1), (4, 2, 1), (2, 1, 2)])
def test_every_valid_token_is_drawn_passes_times_and_nothing_else(data, model, passes):
    mesh = _mesh(data, model)
    B, T, D, S, n_rows = 8, 16, 4, 4, 64
    draws, valid_ids, ring = _run_ring(mesh, S=S, B=B, T=T, D=D, steps=9, n_rows=n_rows, passes=passes,
                                       valid_p=1.0)
    got = np.concatenate(draws)
    counts = {i: int(c) for i, c in zip(*np.unique(got, return_counts=True))}
    # Without replacement: each of the 9 x 128 tokens exactly `passes` times; no padding, nothing lost.
    assert sorted(counts) == sorted(valid_ids) and set(counts.values()) == {passes}
    assert int(ring.lost) == 0 and int(ring.reused) == 0
    assert len(got) == passes * len(valid_ids)  # 9 x 128 x passes is a whole number of 64-row draws


def test_draws_mix_the_last_batches_and_follow_the_capture():
    mesh = _mesh(2, 1)
    B, T, D, S, n_rows = 4, 32, 2, 4, 32
    draws, valid_ids, ring = _run_ring(mesh, S=S, B=B, T=T, D=D, steps=12, n_rows=n_rows, passes=1,
                                       valid_p=0.7)
    # Padding is never drawn; every valid token is drawn, and again only in the last draws (a partial batch,
    # and a shard with fewer tokens than the other taking its own again): those are all counted as reused.
    got = np.concatenate(draws)
    assert set(got.tolist()) == set(valid_ids)
    extra = len(got) - len(valid_ids)
    assert int(ring.reused) == extra and int(ring.lost) == 0 and extra < 2 * n_rows
    seen, again = set(), []
    for j, d in enumerate(draws):
        if seen & set(d.tolist()):
            again.append(j)
        seen |= set(d.tolist())
    assert again and min(again) >= len(draws) - 2, again
    # An SAE batch mixes tokens of several of the last n_slots - 1 batches, in random order.
    mixes = [len({int(i) // 10000 for i in d}) for d in draws[len(draws) // 2:]]
    assert np.median(mixes) >= 2 and max(mixes) <= S
    spans = [int(d.max()) // 10000 - int(d.min()) // 10000 for d in draws]
    assert max(spans) <= S  # never a token older than the ring


def test_unbalanced_shards_reuse_rather_than_return_padding():
    """A data shard whose rows are mostly padding runs out first: it takes its tokens again (counted)."""
    mesh = _mesh(2, 1)
    B, T, D, S = 4, 8, 2, 2
    spec = RingSpec({"a": D, "b": 2 * D}, n_slots=S, batch_rows=B, seq_len=T, dtype="float32")
    ring = init_ring(spec, mesh)
    x = _batch(0, B, T, D)
    valid = np.zeros((B, T), bool)
    valid[:2] = True  # shard 0 (rows 0-1): 16 tokens; shard 1 (rows 2-3): 1 token
    valid[2, 0] = True
    ring = jax.jit(ring_put, donate_argnums=0)(ring, jnp.int32(0), {"a": jnp.asarray(x), "b": jnp.asarray(
        np.concatenate([x, -x], -1))}, jnp.asarray(valid))
    out, ring = make_sampler(mesh, n_rows=8)(ring)
    ids = np.asarray(out["a"])[:, 0].astype(int)
    valid_ids = set(x[..., 0][valid].astype(int).tolist())
    assert set(ids.tolist()) <= valid_ids  # no padding row
    assert ids[4:].tolist() == [int(x[2, 0, 0])] * 4  # shard 1 drew its one token 4 times
    assert int(ring.reused) == 3


def test_a_shard_with_no_valid_row_returns_a_full_draw_of_one_padding_row():
    """Not zero rows: the draw keeps its shape, every row of the empty shard counted in `reused`."""
    mesh = _mesh(2, 1)
    B, T, D, S = 4, 8, 2, 2
    ring = init_ring(RingSpec({"a": D}, n_slots=S, batch_rows=B, seq_len=T, dtype="float32"), mesh)
    x = _batch(0, B, T, D) + 1  # no activation is 0: a zero row is one of a slot never written
    valid = np.zeros((B, T), bool)
    valid[:2] = True  # shard 1 (rows 2-3) is all padding
    ring = jax.jit(ring_put, donate_argnums=0)(ring, jnp.int32(1), {"a": jnp.asarray(x)}, jnp.asarray(valid))
    out, ring = make_sampler(mesh, n_rows=8)(ring)
    ids = np.asarray(out["a"])[:, 0]
    assert ids.shape == (8,) and set(ids[:4].tolist()) <= set(x[..., 0][valid].tolist())
    assert ids[4:].tolist() == [0.0] * 4  # slot 0 of shard 1, never written, four times
    assert int(ring.reused) == 4


def test_slot_write_overwrites_only_its_slot():
    mesh = _mesh(2, 1)
    spec = RingSpec({"a": 2}, n_slots=2, batch_rows=2, seq_len=3, dtype="bfloat16")
    ring = init_ring(spec, mesh)
    put = jax.jit(ring_put, donate_argnums=0)
    ring = put(ring, jnp.int32(1), {"a": jnp.ones((2, 3, 2))}, jnp.ones((2, 3), bool))
    acts = np.asarray(ring.acts["a"].astype(jnp.float32))
    assert acts.dtype == np.float32 and np.all(acts[0] == 0) and np.all(acts[1] == 1)
    assert ring.acts["a"].dtype == jnp.bfloat16
    assert not np.asarray(ring.valid)[0].any() and np.asarray(ring.valid)[1].all()


def test_local_rows_reassembles_a_batch_sharded_array_once_per_block():
    mesh = _mesh(4, 2)
    x = np.arange(8 * 3 * 2, dtype=np.float32).reshape(8, 3, 2)
    arr = jax.device_put(x, NamedSharding(mesh, P("data", None, None)))
    np.testing.assert_array_equal(local_rows(arr), x)


def test_compact_rows_gathers_the_kept_tokens_on_each_device_and_copies_only_them():
    mesh = _mesh(4, 2)  # each row block on two devices ('model'): gathered once
    b, t, d = 8, 400, 5
    x = np.random.default_rng(0).standard_normal((b, t, d)).astype(np.float32)
    arr = jax.device_put(x, NamedSharding(mesh, P("data", None, None)))
    flat = x.reshape(-1, d)
    rng = np.random.default_rng(1)
    cases = {"sparse": np.sort(rng.choice(b * t, 37, replace=False)), "none": np.zeros(0, np.int64),
             "every": np.arange(b * t), "one block only": np.arange(2 * t, 2 * t + 90)}
    for name, keep in cases.items():
        with jax.set_mesh(mesh):  # as the run calls it: inside its mesh context
            c = compact_rows(arr, keep)
        c.copy_to_host_async()
        np.testing.assert_array_equal(to_host(c), flat[keep], err_msg=name)
        assert len(c.blocks) == 4, name
        for start, blk, n in c.blocks:
            if blk is None:
                assert n == 0
                continue
            assert len(blk.devices()) == 1 and n <= blk.shape[0] <= max(64, 2 * n)
        assert keep.size * d * 4 <= c.nbytes <= max(4 * 64, 2 * keep.size) * d * 4, name
    assert compact_rows(arr, cases["sparse"]).nbytes < x.nbytes / 4  # whole rows are not copied


def test_drain_keeps_order_and_applies_backpressure_without_dropping():
    got = []
    gate = threading.Event()

    def sink(host, meta):
        gate.wait()
        got.append((meta, float(host["a"][0, 0])))

    drain = DrainQueue(sink, max_in_flight=2)
    producer_done = threading.Event()

    def produce():
        for i in range(6):
            drain.put({"a": jnp.full((2, 2), float(i))}, i)
        producer_done.set()

    t = threading.Thread(target=produce)
    t.start()
    time.sleep(0.3)
    # The sink is blocked: the producer cannot be more than max_in_flight (+1 in the sink) ahead.
    assert not producer_done.is_set()
    gate.set()
    t.join(10)
    drain.close()
    assert got == [(i, float(i)) for i in range(6)]
    assert drain.stats.backpressure_waits >= 1 and drain.stats.batches == 6


def test_sink_failure_reaches_the_producer():
    def sink(host, meta):
        raise OSError(28, "No space left on device")

    drain = DrainQueue(sink, max_in_flight=1)
    drain.put({"a": jnp.zeros((1, 1))}, 0)
    with pytest.raises(OSError, match="No space left on device"):
        drain.join()


class FailingSink:
    """A sink that keeps what it is given and raises a full-disk OSError on its `fail_at`-th write."""

    def __init__(self, fail_at: int, gate: threading.Event | None = None):
        self.fail_at, self.gate = fail_at, gate
        self.calls = 0
        self.written: list[int] = []
        self.error = OSError(errno.ENOSPC, "No space left on device", "activations/p00000/c/3")
        self.entered = threading.Event()  # the drain thread is inside the sink

    def __call__(self, host, meta):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        self.written.append(meta)


def _slot(i):
    return {"a": jnp.full((2, 2), float(i))}


def test_the_first_sink_error_is_raised_everywhere_and_nothing_after_it_is_written():
    gate = threading.Event()
    sink = FailingSink(fail_at=3, gate=gate)
    drain = DrainQueue(sink, max_in_flight=8)
    for i in range(7):  # all queued before the sink runs: batches 3.. are behind the failure
        drain.put(_slot(i), i)
    gate.set()
    with pytest.raises(OSError) as first:
        drain.join()
    assert first.value is sink.error  # the original exception, not a wrapper
    assert "No space left on device" in str(first.value)
    assert any("no batch after it was written" in n for n in first.value.__notes__)
    assert sink.written == [0, 1] and sink.calls == 3 and drain.discarded == 4
    # It stays raised: a later put (nothing queued) and the close at the end raise the same error ...
    with pytest.raises(OSError) as again:
        drain.put(_slot(9), 9)
    assert again.value is sink.error
    with pytest.raises(OSError) as at_close:
        drain.close()
    assert at_close.value is sink.error
    # ... and nothing reached the sink after it.
    assert sink.written == [0, 1] and sink.calls == 3


def test_backpressured_put_raises_the_sink_error_instead_of_waiting():
    sink = FailingSink(fail_at=1)
    drain = DrainQueue(sink, max_in_flight=1)
    with pytest.raises(OSError) as info:
        for i in range(50):
            drain.put(_slot(i), i)
    assert info.value is sink.error and sink.written == []
    drain.close(info.value)


def test_shutdown_during_another_error_keeps_that_error_and_notes_the_drain_failure():
    gate = threading.Event()  # every put is queued before the sink runs: put(2) cannot see the failure first
    sink = FailingSink(fail_at=2, gate=gate)
    with pytest.raises(ValueError, match="the forward pass failed") as info:
        with DrainQueue(sink, max_in_flight=4) as drain:
            for i in range(3):
                drain.put(_slot(i), i)
            gate.set()
            while drain.error is None:
                time.sleep(0.01)
            raise ValueError("the forward pass failed")
    assert any("the activation drain had failed too: OSError" in n and "No space left" in n
               for n in info.value.__notes__)
    assert sink.written == [0]


def test_a_drain_error_in_flight_is_raised_once_unmasked_by_close():
    sink = FailingSink(fail_at=1)
    with pytest.raises(OSError) as info:
        with DrainQueue(sink, max_in_flight=2) as drain:
            drain.put(_slot(0), 0)
            drain.join()
    assert info.value is sink.error
    assert not any("had failed too" in n for n in info.value.__notes__)


def test_a_stuck_drain_thread_is_reported_not_abandoned():
    gate = threading.Event()
    try:
        drain = DrainQueue(FailingSink(fail_at=0, gate=gate), max_in_flight=2, join_timeout_s=0.3)
        drain.put(_slot(0), 0)
        drain.put(_slot(1), 1)
        with pytest.raises(RuntimeError, match=r"drain thread did not stop within 0.3 s .* 2 batches unwritten"):
            drain.close()
        # During another error the same problem is a note on that error, which is not replaced.
        stuck = FailingSink(fail_at=0, gate=gate)
        drain2 = DrainQueue(stuck, max_in_flight=2, join_timeout_s=0.3)
        drain2.put(_slot(0), 0)
        assert stuck.entered.wait(10)
        exc = KeyError("boom")
        drain2.close(exc)
        assert any("drain thread was left running: it did not stop" in n for n in exc.__notes__)
    finally:
        gate.set()


def test_ring_spec_rejects_nonsense():
    with pytest.raises(ValueError, match="n_slots"):
        RingSpec({"a": 2}, n_slots=1, batch_rows=2, seq_len=2)
    with pytest.raises(ValueError, match="divisible"):
        init_ring(RingSpec({"a": 2}, n_slots=2, batch_rows=3, seq_len=2), _mesh(2, 1))
