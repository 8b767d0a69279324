from __future__ import annotations

import gc
import sys
import threading
import time
import traceback

import pytest
import torch

from jeststream.pipeline import END, ThreadPipeline, reraise_from_producer, to_device

pytestmark = pytest.mark.timeout(60)

CPU = torch.device("cpu")


def _threads():
    return [t for t in threading.enumerate() if t.name.startswith("jeststream")]


def _counting_producer(limit=None, delay=0.0):
    state = {"made": 0}

    def produce(should_stop):
        if limit is not None and state["made"] >= limit:
            return END
        if delay:
            time.sleep(delay)
        state["made"] += 1
        return state["made"]

    return produce, state


def test_items_in_order_then_stop(no_thread_leak):
    produce, _ = _counting_producer(limit=5)
    p = ThreadPipeline(produce, prefetch=2, device=CPU)
    assert [p.get() for _ in range(5)] == [1, 2, 3, 4, 5]
    with pytest.raises(StopIteration):
        p.get()
    with pytest.raises(StopIteration):
        p.get()
    p.thread.join(5)
    assert not p.thread.is_alive()


def test_queue_is_bounded(no_thread_leak):
    produce, state = _counting_producer()
    p = ThreadPipeline(produce, prefetch=3, device=CPU)
    assert p.get() == 1
    time.sleep(0.3)  # let the producer run as far as it can
    # consumed 1, at most 3 in flight
    assert state["made"] <= 1 + 3
    p.close()
    assert not p.thread.is_alive()


def test_stages_do_not_add_to_the_prefetch_bound(no_thread_leak):
    """Items between stages count against ``prefetch`` too: with two stages and prefetch=2 the
    producer is at most 2 items ahead of the consumer (not 2 + one per stage + one waiting)."""
    produce, state = _counting_producer()
    p = ThreadPipeline(produce, stages=[(lambda x: x * 10, None)], prefetch=2, device=CPU)
    assert p.get() == 10
    time.sleep(0.3)
    assert state["made"] <= 1 + 2
    assert p.get() == 20
    time.sleep(0.3)
    assert state["made"] <= 2 + 2
    p.close()
    assert all(not t.is_alive() for t in p.threads)


class _Custom(Exception):
    def __init__(self, a, b):  # a constructor the re-raise can't call with one message
        super().__init__(a, b)


def test_exception_reraises_same_type_chained(no_thread_leak):
    def produce(should_stop):
        raise ValueError("bad shard 7")

    p = ThreadPipeline(produce, prefetch=2, device=CPU)
    with pytest.raises(ValueError, match="bad shard 7") as ei:
        p.get()
    assert isinstance(ei.value.__cause__, ValueError)
    assert str(ei.value.__cause__) == "bad shard 7"
    assert ei.value.__cause__.__traceback__ is not None
    with pytest.raises(StopIteration):
        p.get()

    def produce2(should_stop):
        raise _Custom(1, 2)

    p = ThreadPipeline(produce2, prefetch=1, device=CPU)
    with pytest.raises(_Custom) as ei:  # same type and args, whatever the constructor takes
        p.get()
    assert ei.value.args == (1, 2) and isinstance(ei.value.__cause__, _Custom)

    def produce3(should_stop):
        raise _Rewrites(7)

    p = ThreadPipeline(produce3, prefetch=1, device=CPU)
    with pytest.raises(RuntimeError, match="_Rewrites: bad 7") as ei:
        p.get()
    assert isinstance(ei.value.__cause__, _Rewrites)


class _Rewrites(Exception):
    def __init__(self, x):  # its args are not its constructor's: a copy would say "bad bad 7"
        super().__init__(f"bad {x}")


def test_key_error_keeps_its_key_readable(no_thread_leak):
    """The producer's note does not glue into the key: str(KeyError) is the key's repr."""

    def produce(should_stop):
        return {}["0"]

    p = ThreadPipeline(produce, prefetch=1, device=CPU)
    with pytest.raises(KeyError) as ei:
        p.get()
    assert ei.value.args == ("0",) and str(ei.value) == "'0'"
    assert ei.value.__notes__ == [
        "[raised in the JESTLoader producer thread; original traceback above]"
    ]
    assert ei.value.__cause__.args == ("0",) and not hasattr(ei.value.__cause__, "__notes__")
    text = "".join(traceback.format_exception(ei.value))
    if sys.version_info >= (3, 11):  # 3.10's traceback does not print notes
        assert "KeyError: '0'\n[raised in the JESTLoader producer thread" in text


def test_keyboard_interrupt_in_producer_reaches_consumer(no_thread_leak):
    def produce(should_stop):
        raise KeyboardInterrupt

    p = ThreadPipeline(produce, prefetch=1, device=CPU)
    with pytest.raises(KeyboardInterrupt):
        p.get()


def test_stop_iteration_in_producer_is_not_a_silent_end(no_thread_leak):
    def produce(should_stop):
        raise StopIteration

    p = ThreadPipeline(produce, prefetch=1, device=CPU)
    with pytest.raises(RuntimeError, match="StopIteration") as ei:
        p.get()
    assert isinstance(ei.value.__cause__, StopIteration)


def test_reraise_helper():
    original = TypeError("x")
    original.__notes__ = ["from the user"]  # add_note on 3.11+; the copy gets its own list
    with pytest.raises(TypeError, match="producer thread") as ei:  # pytest matches notes too
        reraise_from_producer(original)
    assert ei.value.__cause__ is original and str(ei.value) == "x"
    assert original.__notes__ == ["from the user"]
    assert ei.value.__notes__[0] == "from the user" and "producer" in ei.value.__notes__[1]


def test_close_while_producer_blocked_on_full_queue(no_thread_leak):
    produce, _ = _counting_producer()
    p = ThreadPipeline(produce, prefetch=1, device=CPU)
    time.sleep(0.1)
    assert p.thread.is_alive()
    p.close()
    assert not p.thread.is_alive()
    p.close()  # idempotent


def test_close_while_producing_honours_should_stop(no_thread_leak):
    entered = threading.Event()

    def produce(should_stop):
        entered.set()
        while not should_stop():
            time.sleep(0.01)
        return None

    p = ThreadPipeline(produce, prefetch=1, device=CPU)
    assert entered.wait(5)
    p.close()
    assert not p.thread.is_alive()


def test_gc_stops_thread(no_thread_leak):
    produce, _ = _counting_producer()
    p = ThreadPipeline(produce, prefetch=2, device=CPU)
    thread = p.thread
    p.get()
    del p
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()


def test_two_stage_pipeline_order_failure_and_close(no_thread_leak):
    produce, _ = _counting_producer(limit=6)
    p = ThreadPipeline(produce, stages=[(lambda x: x * 10, None)], prefetch=2, device=CPU)
    assert len(p.threads) == 2
    assert [p.get() for _ in range(6)] == [10, 20, 30, 40, 50, 60]
    with pytest.raises(StopIteration):
        p.get()

    def second(x):
        if x == 3:
            raise OSError("stage two broke")
        return x

    produce, _ = _counting_producer()
    p = ThreadPipeline(produce, stages=[(second, None)], prefetch=2, device=CPU)
    assert [p.get(), p.get()] == [1, 2]
    with pytest.raises(OSError, match="stage two broke") as ei:
        p.get()
    assert isinstance(ei.value.__cause__, OSError)
    assert all(not t.is_alive() for t in p.threads)  # failure closed every stage

    produce, _ = _counting_producer()
    p = ThreadPipeline(produce, stages=[(lambda x: x, None)], prefetch=1, device=CPU)
    p.get()
    p.close()
    assert all(not t.is_alive() for t in p.threads)


def test_invalid_prefetch():
    with pytest.raises(ValueError, match="prefetch"):
        ThreadPipeline(lambda s: END, prefetch=0, device=CPU)


def test_to_device_cpu_keeps_structure():
    batch = {"a": torch.zeros(2), "b": ["x", "y"], "c": (torch.ones(2),)}
    out = to_device(batch, CPU)
    assert out["a"] is batch["a"] and out["b"] == ["x", "y"] and out["c"][0] is batch["c"][0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stream_path(tiny_clip, pair_batches, no_thread_leak):
    """The device path: side-stream scoring, pinned non_blocking copies, events, record_stream.
    Async results equal the inline (sync) run on the same device and seed."""
    from jeststream.loader import JESTLoader

    dev = torch.device("cuda")
    batches = pair_batches(n_batches=16, b=8, keys=True)
    results = {}
    for mode in (True, False):
        learner, reference = tiny_clip(0).to(dev), tiny_clip(1).to(dev)
        with JESTLoader(
            batches, learner, reference, 0.25, n_chunks=4, async_scoring=mode, seed=5,
            return_info=True,
        ) as ld:
            assert ld.device.type == "cuda"
            out = []
            for (images, tokens, keys), info in ld:
                assert images.device.type == "cuda" and tokens.device.type == "cuda"
                assert isinstance(keys, list) and len(keys) == 8
                # use the batch on the consumer's stream, like a training step would
                out.append(((images.float().sum() + tokens.sum()).item(), info.indices))
                learner.zero_grad()
            results[mode] = out
    assert len(results[True]) == 4
    for (sa, ia), (ss, is_) in zip(results[True], results[False]):
        assert torch.equal(ia, is_)
        assert sa == pytest.approx(ss)

    # to_device pins and copies asynchronously
    host = {"x": torch.randn(4, 3), "k": ["a", "b", "c", "d"]}
    moved = to_device(host, dev)
    assert moved["x"].device.type == "cuda" and moved["k"] == host["k"]
    assert torch.equal(moved["x"].cpu(), host["x"])


@pytest.mark.slow
def test_pipeline_benchmark_quick_prints_json():
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=240,
        check=True,
    ).stdout
    result = json.loads(out)
    assert [(o["T_ms"], o["S_ms"]) for o in result["overlap"]] == [(50, 30), (30, 50)]
    for o in result["overlap"]:
        assert o["async_ms"] > 0 and o["sync_ms"] > 0 and o["ideal_ms"] == 50
        assert o["async_prefetch1_ms"] > 0
        assert o["async_prefetch1_vs_ideal"] == round(o["async_prefetch1_ms"] / 50, 3)
    for part in ("consumer", "cpu"):
        ov = result["overhead"][part]
        assert ov["plain_ms_per_step"] > 0 and ov["async_ms_per_step"] > 0
        assert "wrapper_overhead_async" in ov
    shards = result["shards"]  # the webdataset adapter's reading, each variant over all samples
    assert shards["samples"] == 512 and shards["batch"] == 128
    assert set(shards["ms_per_batch"]) == {
        "tarfile_wds_tarfile_to_samples", "checked_wds_group_by_keys", "checked_tarfile_samples",
        "handwritten_shuffle", "wds_shuffle", "webdataset_loader",
        "webdataset_loader_wds_group_by_keys", "webdataset_loader_shuffle_buffer",
    }
    assert all(v > 0 for v in shards["ms_per_batch"].values())
