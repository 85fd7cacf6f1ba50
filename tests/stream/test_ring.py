"""The device ring buffer: slot writes, on-device sampling, the drain's order and backpressure."""

import errno
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from arcstream.stream.ring import DrainQueue, RingSpec, init_ring, local_rows, make_sampler, ring_put


def _mesh(data, model):
    return jax.make_mesh((data, model), ("data", "model"), axis_types=(AxisType.Auto,) * 2,
                         devices=jax.devices()[: data * model])


def _batch(step, B, T, D):
    """Activations whose every entry encodes (step, row, t) so sampled rows can be traced back."""
    ids = (step * 1000 + np.arange(B)[:, None] * 10 + np.arange(T)[None, :]).astype(np.float32)
    return np.repeat(ids[..., None], D, axis=-1)


@pytest.mark.parametrize("data,model", [(1, 1), (4, 2)])
def test_put_then_sample_returns_only_valid_rows_from_every_slot(data, model):
    mesh = _mesh(data, model)
    B, T, D, S = 8, 6, 4, 3
    spec = RingSpec({"a": D, "b": 2 * D}, n_slots=S, batch_rows=B, seq_len=T, dtype="float32")
    ring = init_ring(spec, mesh)
    put = jax.jit(ring_put, donate_argnums=0)
    rng = np.random.default_rng(0)
    valid_ids = set()
    for step in range(S):
        x = _batch(step, B, T, D)
        valid = rng.random((B, T)) < 0.6
        valid_ids |= set(x[..., 0][valid].astype(int).tolist())
        caps = {"a": jnp.asarray(x), "b": jnp.asarray(np.concatenate([x, -x], -1))}
        ring = put(ring, jnp.int32(step), caps, jnp.asarray(valid))
    sample = make_sampler(mesh, n_rows=512)
    out = sample(ring, jax.random.key(1))
    a, b = np.asarray(out["a"]), np.asarray(out["b"])
    assert a.shape == (512, D) and b.shape == (512, 2 * D)
    got = a[:, 0].astype(int)
    assert set(got.tolist()) <= valid_ids, "sampled a padding / invalid row"
    # Both sites are sampled at the same rows (the SAEs of a step see the same tokens).
    np.testing.assert_array_equal(b[:, :D], a)
    np.testing.assert_array_equal(b[:, D:], -a)
    # Rows of every slot appear (mixing across batches).
    assert {int(i) // 1000 for i in got} == set(range(S))
    assert out["a"].sharding.is_equivalent_to(NamedSharding(mesh, P("data", None)), 2)


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
    sink = FailingSink(fail_at=2)
    with pytest.raises(ValueError, match="the forward pass failed") as info:
        with DrainQueue(sink, max_in_flight=4) as drain:
            for i in range(3):
                drain.put(_slot(i), i)
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
