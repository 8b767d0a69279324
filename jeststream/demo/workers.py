"""Run the demo's jobs, in this process or in worker processes of their own.

A :class:`Job` is a module-level function and plain-data arguments; it is called as
``fn(*args, progress=bar_factory_or_None)``. :func:`run_jobs` runs the ready job of highest
priority first, and each result may make new jobs ready (a trained reference unlocks the runs
that score with it).

Invariants: with ``workers > 1`` every job gets one spawned process (the parent runs tqdm's
threads: never fork them) and its result comes back over a pipe; at most ``workers`` run at
once; the parent starts no thread. On a failed job, a dead worker or Ctrl-C every running
worker is terminated (then killed) and joined before the error propagates, so no child
outlives :func:`run_jobs`. A worker exits on its own once its parent is gone.
"""

from __future__ import annotations

import heapq
import itertools
import os
import pickle
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Job", "bar_factory", "run_jobs"]


@dataclass(frozen=True)
class Job:
    """One unit of work: ``fn(*args, progress=...)`` (``fn`` importable by name, ``args``
    picklable), run before any ready job of a larger ``priority``. ``tag`` is the caller's."""

    name: str
    fn: Callable[..., Any]
    args: tuple
    priority: tuple = ()
    tag: Any = field(default=None, compare=False)


def bar_factory(position: int | None = None) -> Callable[..., Any]:
    """A tqdm progress-bar factory (its row at ``position``)."""
    from tqdm.auto import tqdm

    def bar(**kw):
        return tqdm(leave=False, dynamic_ncols=True, position=position, **kw)

    return bar


def run_jobs(
    jobs: Iterable[Job],
    *,
    workers: int,
    threads: int,
    progress: bool,
    on_done: Callable[[Job, Any], Iterable[Job]],
) -> None:
    """Run ``jobs`` and those each ``on_done(job, result)`` returns, until none is left.

    ``on_done`` runs in this process, in the order the jobs end. ``workers <= 1`` runs every
    job here; otherwise each in its own worker process with ``threads`` torch threads. The
    first failure stops every other worker and is raised here, with the worker's traceback as
    its cause.
    """
    order = itertools.count()
    ready: list[tuple] = []

    def push(new: Iterable[Job]) -> None:
        for job in new:
            heapq.heappush(ready, (job.priority, next(order), job))

    push(jobs)
    if workers <= 1:
        bar = bar_factory() if progress else None
        while ready:
            job = heapq.heappop(ready)[2]
            push(on_done(job, job.fn(*job.args, progress=bar)))
        return
    _run_in_workers(ready, push, workers, threads, progress, on_done)


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process (set as its ``__cause__``)."""

    def __str__(self) -> str:
        return f"\n\n{self.args[0]}"


def _run_in_workers(ready, push, workers, threads, progress, on_done) -> None:
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    free_slots = list(range(workers))  # progress-bar rows
    running: dict = {}  # parent end of the pipe -> (job, process, slot)
    try:
        while ready or running:
            while ready and len(running) < workers:
                job = heapq.heappop(ready)[2]
                slot = free_slots.pop(0)
                recv_end, send_end = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_worker_main,
                    args=(send_end, job.fn, job.args, threads, progress, slot, os.getpid()),
                    name=f"jeststream-demo-{job.name}",
                )
                try:
                    proc.start()
                finally:
                    send_end.close()  # the child's copy only: a dead child reads as EOF here
                running[recv_end] = (job, proc, slot)
            for conn in wait(list(running)):
                job, proc, slot = running.pop(conn)
                try:
                    message = conn.recv()
                except EOFError:
                    message = None
                finally:
                    conn.close()
                proc.join()
                free_slots.append(slot)
                free_slots.sort()
                push(on_done(job, _result(job, proc, message)))
    except BaseException:
        # A failed job or Ctrl-C: stop the others now instead of waiting for them to end.
        _stop([proc for _, proc, _ in running.values()])
        for conn in running:
            conn.close()
        raise


def _result(job: Job, proc, message) -> Any:
    if message is None:
        raise RuntimeError(
            f"the worker process of {job.name} died without a result (exit code {proc.exitcode})"
        )
    status, payload, tb = message
    if status == "ok":
        return payload
    try:
        exc = pickle.loads(payload)
    except Exception:  # an exception type that cannot be rebuilt here: keep its text
        exc = RuntimeError(f"{job.name} failed in its worker process")
    raise exc from RemoteTraceback(tb)


def _stop(procs: list, timeout: float = 10.0) -> None:
    """Terminate (then kill) each process and join it: none is left running on return."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=timeout)
        if proc.is_alive():  # SIGTERM not acted on in time: SIGKILL cannot be ignored
            proc.kill()
            proc.join(timeout=timeout)


def _worker_main(conn, fn, args, threads: int, progress: bool, slot: int, parent: int) -> None:
    import threading

    import torch

    def orphan_watch() -> None:
        # A killed comparison must not leave minutes-long runs behind.
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=orphan_watch, name="jeststream-orphan-watch", daemon=True).start()
    torch.set_num_threads(threads)
    try:
        result = fn(*args, progress=bar_factory(slot) if progress else None)
    except BaseException as exc:
        tb = traceback.format_exc()
        try:
            payload = pickle.dumps(exc)
        except Exception:
            payload = pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
        conn.send(("error", payload, tb))
    else:
        conn.send(("ok", result, None))
    finally:
        conn.close()
