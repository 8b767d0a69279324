"""Crash safety and the background writer of the selection log: real SIGKILLs in a child
process, failures injected into the writer thread, and where (and when) rows hit the disk."""

from __future__ import annotations

import errno
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from jeststream.selection_log import SelectionLog, SelectionLogError, read_selection_log
from jeststream.selection_log import sinks as sl  # the durable file primitives

FORMATS = ["log.parquet", "log.jsonl"]
SIZE = 6
WRITER = "jeststream-selection-log"


def _write(log: SelectionLog, step: int, offset: float = 0.0) -> None:
    # numpy in, as the child processes below pass it: they need not import torch
    log.write(
        keys=[f"k{step}_{i}" for i in range(SIZE)],
        epoch=0,
        step=step,
        scores=np.arange(SIZE, dtype=np.float32) + step * 10 + offset,
        selected=np.arange(SIZE) < 2,
    )


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == WRITER]


def _steps(path, **kw) -> list[int]:
    return read_selection_log(path, **kw)["step"].tolist()


def _each(steps) -> list[int]:
    return [s for s in steps for _ in range(SIZE)]


def _run_child(body: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        """
        import os, signal
        import numpy as np
        from jeststream.selection_log import SelectionLog
        from jeststream.selection_log import sinks as sl
        def write(log, step):
            log.write(keys=[f"k{step}_{i}" for i in range(6)], epoch=0, step=step,
                      scores=np.arange(6, dtype=np.float32) + step * 10,
                      selected=np.arange(6) < 2)
        """
    ) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)


def _wait_for(cond, timeout=5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("name", FORMATS)
def test_kill_9_keeps_every_flushed_row_and_resume_only_appends(tmp_path, name):
    path = tmp_path / name
    proc = _run_child(
        f"""
        log = SelectionLog({str(path)!r}, flush_every=12)  # hand-offs after steps 1 and 3
        for step in range(4):
            write(log, step)
        log.flush()  # what a checkpoint after step 3 does: durable on return
        write(log, 4)  # buffered only
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert _steps(path, dedupe=False) == _each(range(4))  # readable, exactly steps 0-3

    if name.endswith(".parquet"):
        files = sorted(p.name for p in path.iterdir())
        assert files == ["part-000000.parquet", "part-000001.parquet"]
        before = {f: (path / f).read_bytes() for f in files}
    else:
        before = path.read_bytes()
    with SelectionLog(path, flush_every=12) as log:  # the resumed run, from the checkpoint
        _write(log, 4)
        _write(log, 5)
    assert _steps(path) == _each(range(6))
    assert _steps(path, dedupe=False) == _each(range(6))  # every step once: nothing rewritten
    if name.endswith(".parquet"):
        assert {f: (path / f).read_bytes() for f in before} == before  # byte-identical
        assert sorted(p.name for p in path.iterdir()) == [*before, "part-000002.parquet"]
    else:
        assert path.read_bytes()[: len(before)] == before


def test_kill_in_the_middle_of_a_segment_write_leaves_only_an_ignored_temp_file(tmp_path):
    import pyarrow.dataset as ds

    path = tmp_path / "log.parquet"
    proc = _run_child(
        f"""
        log = SelectionLog({str(path)!r})
        write(log, 0)
        log.flush()
        real = sl._write_parquet_segment
        def torn(table, tmp):  # killed half-way through writing the next segment
            real(table, tmp)
            data = open(tmp, "rb").read()
            open(tmp, "wb").write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        sl._write_parquet_segment = torn
        write(log, 1)
        log.flush()
        """
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert sorted(p.name for p in path.iterdir()) == [
        ".part-000001.parquet.tmp",
        "part-000000.parquet",
    ]
    assert _steps(path) == _each([0])  # the reader never reads a temp file
    assert ds.dataset(str(path), format="parquet").count_rows() == SIZE  # nor does pyarrow
    with SelectionLog(path) as log:  # the resumed writer removes it and writes that seq again
        assert sorted(p.name for p in path.iterdir()) == ["part-000000.parquet"]
        _write(log, 1)
    assert sorted(p.name for p in path.iterdir()) == ["part-000000.parquet", "part-000001.parquet"]
    assert _steps(path) == _each([0, 1])


def test_kill_between_the_step_rows_and_their_segment_leaves_nothing_read(tmp_path):
    """A segment's step rows are renamed into place first: killed before the segment itself,
    they are never read (no example row refers to them) and the next writer removes them."""
    import pyarrow.dataset as ds

    path = tmp_path / "log.parquet"
    proc = _run_child(
        f"""
        log = SelectionLog({str(path)!r})
        write(log, 0)
        log.flush()
        real = sl._write_parquet_segment
        def killed(table, tmp):
            if os.path.basename(tmp).startswith(".part-"):
                os.kill(os.getpid(), signal.SIGKILL)
            real(table, tmp)
        sl._write_parquet_segment = killed
        log.write(keys=list("abcdef"), epoch=0, step=1, scores=np.zeros(6, np.float32),
                  selected=np.arange(6) < 2, batch_learnability=(1.0, 2.0, 3.0))
        log.flush()
        """
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert sorted(p.name for p in path.iterdir()) == ["_steps-000001.parquet", "part-000000.parquet"]
    cols = read_selection_log(path)
    assert cols["step"].tolist() == _each([0]) and "batch_learnability" not in cols
    assert ds.dataset(str(path), format="parquet").count_rows() == SIZE
    with SelectionLog(path) as log:  # resumed: the orphan goes, that seq is written again
        assert sorted(p.name for p in path.iterdir()) == ["part-000000.parquet"]
        _write(log, 1)  # without batch-level values this time
    assert sorted(p.name for p in path.iterdir()) == ["part-000000.parquet", "part-000001.parquet"]
    cols = read_selection_log(path)
    assert cols["step"].tolist() == _each([0, 1]) and "batch_learnability" not in cols


def _target(name: str) -> str:
    return "_write_parquet_segment" if name.endswith(".parquet") else "_append_jsonl"


@pytest.mark.parametrize("name", FORMATS)
def test_flush_runs_on_the_writer_thread_and_is_durable_on_return(tmp_path, name, monkeypatch):
    path = tmp_path / name
    events = []
    real = getattr(sl, _target(name))
    real_fsync = os.fsync

    def slow_write(*args):
        events.append(("write", threading.current_thread().name))
        time.sleep(0.2)  # a slow disk: flush() must wait for it
        real(*args)

    def fsync(fd):
        real_fsync(fd)
        events.append(("fsync", threading.current_thread().name))

    monkeypatch.setattr(sl, _target(name), slow_write)
    monkeypatch.setattr(os, "fsync", fsync)
    log = SelectionLog(path)
    events.clear()  # opening a new JSON-lines file fsyncs its directory, on the caller
    _write(log, 0)
    _write(log, 1)
    assert events == []  # write() only buffers
    log.flush()
    # on return: written and fsynced, by the writer thread, never the caller
    assert events[0] == ("write", WRITER) and ("fsync", WRITER) in events
    assert {t for _, t in events} == {WRITER}
    assert log.rows_written == 2 * SIZE
    assert _steps(path) == _each([0, 1])  # readable while the log is still open
    log.close()
    assert _writer_threads() == []


def test_write_hands_off_and_blocks_only_when_two_flushes_are_pending(tmp_path, monkeypatch):
    path = tmp_path / "log.parquet"
    release = threading.Event()
    real = sl._write_parquet_segment

    def stuck(table, tmp):
        assert release.wait(10)
        real(table, tmp)

    monkeypatch.setattr(sl, "_write_parquet_segment", stuck)
    log = SelectionLog(path, flush_every=SIZE)
    _write(log, 0)  # handed off: being written (stuck)
    _write(log, 1)  # handed off: queued
    assert log.rows_written == 0 and len(log._writer.pending) == 2
    third = threading.Thread(target=_write, args=(log, 2))
    third.start()
    third.join(0.3)
    assert third.is_alive()  # bounded memory: a third hand-off waits
    release.set()
    third.join(5)
    assert not third.is_alive()
    log.close()
    assert _steps(path) == _each(range(3)) and _writer_threads() == []


@pytest.mark.parametrize("name", FORMATS)
def test_writer_failure_surfaces_at_the_next_call_and_loses_no_rows(tmp_path, name, monkeypatch):
    path = tmp_path / name
    real = getattr(sl, _target(name))
    failures = []

    def disk_full_once(*args):
        if not failures:
            failures.append(threading.current_thread().name)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args)

    monkeypatch.setattr(sl, _target(name), disk_full_once)
    log = SelectionLog(path, flush_every=SIZE)
    _write(log, 0)  # handed off; the writer thread fails
    _wait_for(lambda: log._writer.error is not None)
    with pytest.raises(SelectionLogError, match="6 rows of step 0 are queued") as info:
        _write(log, 1)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC and failures == [WRITER]
    assert "No space left" in str(info.value) and "not logged" in str(info.value)
    _write(log, 1)  # the caller retries its step; the writer retried step 0
    log.flush()
    assert log.rows_written == 2 * SIZE
    log.close()
    assert _steps(path, dedupe=False) == _each([0, 1])  # nothing dropped, nothing twice
    assert _writer_threads() == []


def test_a_failure_pending_at_close_is_retried_then_raised(tmp_path, monkeypatch):
    path = tmp_path / "log.parquet"
    real = sl._write_parquet_segment
    calls = []

    def fails_once(table, tmp):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.EIO, "I/O error")
        real(table, tmp)

    monkeypatch.setattr(sl, "_write_parquet_segment", fails_once)
    log = SelectionLog(path, flush_every=SIZE)
    _write(log, 0)
    _wait_for(lambda: log._writer.error is not None)
    with pytest.raises(SelectionLogError, match="nothing is lost") as info:
        log.close()
    assert isinstance(info.value.__cause__, OSError)
    assert _steps(path) == _each([0]) and _writer_threads() == []
    assert not list(path.glob(".*"))  # the failed attempt's temp file is gone


@pytest.mark.parametrize("name", FORMATS)
def test_a_failure_that_persists_names_the_lost_rows_and_close_joins(tmp_path, name, monkeypatch):
    path = tmp_path / name

    def broken(*args):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(sl, _target(name), broken)
    log = SelectionLog(path)
    _write(log, 0)
    _write(log, 1)
    with pytest.raises(SelectionLogError, match="12 rows of steps 0-1 are queued") as info:
        log.flush()
    assert info.value.__cause__.errno == errno.EROFS
    _wait_for(lambda: log._writer.error is not None)  # the writer's retry failed too
    with pytest.raises(SelectionLogError, match="not logged"):
        _write(log, 2)  # each call raises while the writer keeps failing
    with pytest.raises(SelectionLogError, match="12 rows of steps 0-1 are lost") as info:
        log.close()
    assert info.value.__cause__.errno == errno.EROFS
    assert _writer_threads() == [] and log.rows_written == 0
    log.close()  # idempotent, quiet
    assert _steps(path) == []


def test_an_unclosed_log_is_collected_and_its_thread_ends(tmp_path):
    path = tmp_path / "log.jsonl"
    log = SelectionLog(path, flush_every=SIZE)
    _write(log, 0)
    _write(log, 1)
    assert len(_writer_threads()) == 1
    del log
    gc.collect()
    assert _writer_threads() == []
    assert _steps(path) == _each([0, 1])


def test_jsonl_write_failure_midline_keeps_the_next_records_readable(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    real = sl._append_jsonl
    calls = []

    def torn_once(fd, data):
        calls.append(1)
        if len(calls) == 1:
            os.write(fd, data[: len(data) // 2 + 3])  # part of the batch, then the disk fills
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(sl, "_append_jsonl", torn_once)
    log = SelectionLog(path)
    _write(log, 0)
    with pytest.raises(SelectionLogError):
        log.flush()
    log.flush()  # the retry starts on a fresh line
    log.close()
    assert _steps(path) == _each([0])


def test_a_log_closed_when_no_thread_can_start_writes_on_the_caller(tmp_path, monkeypatch):
    """At interpreter exit Python >= 3.12 refuses to start threads; the atexit close of a log
    that never handed anything over must still write its rows."""
    path = tmp_path / "log.parquet"
    log = SelectionLog(path)
    _write(log, 0)

    def refuse(self):
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    log.close()
    assert _steps(path) == _each([0]) and log.rows_written == SIZE
