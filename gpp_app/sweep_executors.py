"""Where the points of a sweep run: in this process, in a pool of processes, or as Ray tasks.

A dispatch runs ``task(*call)`` for each call and yields ``(call, outcome)`` as each finishes, so
the sweep writes every row into its CSV as soon as it is done. Ray is imported only for
``--executor ray`` (the ``distributed`` extra). On a Ray cluster the tasks run on other machines:
the model, the data and the results folder must be at the same absolute paths on every node
(a shared filesystem), and the same gpp-onnx must be installed there.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from functools import partial
from typing import Any

from gpp_onnx.errors import UserError

EXECUTORS = ("local", "ray")
RAY_HINT = "--executor ray needs Ray: pip install -e '.[distributed]' (the distributed extra)"
Dispatch = Callable[[Callable[..., Any], list[tuple]], Iterator[tuple[tuple, Any]]]


def check_executor(executor: str, workers: int, address: str | None, cpus: float, gpus: float) -> None:
    """Reject an unknown executor or options that do not go with it, before any point runs."""
    if executor not in EXECUTORS:
        raise UserError(f"--executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    if executor == "local" and (address is not None or (cpus, gpus) != (1, 0)):
        raise UserError("--address, --cpus-per-point and --gpus-per-point go with --executor ray")
    if executor == "ray" and workers != 1:
        raise UserError("--workers goes with --executor local; Ray runs as many points at once as their resources fit")
    if cpus < 0 or gpus < 0 or cpus == gpus == 0:
        raise UserError("--cpus-per-point and --gpus-per-point must be 0 or more, and not both 0")
    if gpus > 1 and not float(gpus).is_integer():
        raise UserError(f"--gpus-per-point {gpus:g}: a point takes a fraction of one GPU or whole GPUs")


@contextmanager
def dispatcher(executor: str, workers: int, address: str | None, cpus: float, gpus: float) -> Iterator[Dispatch]:
    """The dispatch for the time of a sweep: local (this process, or ``workers`` processes), or Ray
    tasks of ``cpus`` CPUs and ``gpus`` GPUs each, on the cluster at ``address`` or on a local Ray
    instance started here; Ray is shut down (or disconnected from) at the end."""
    if executor == "local":
        yield partial(run_local, workers=workers)
        return
    ray = import_ray()
    _connect(ray, address)
    try:
        if address is None:
            _check_fits(ray, cpus, gpus)
        yield partial(run_on_ray, ray, cpus=cpus, gpus=gpus)
    finally:
        ray.shutdown()


def run_local(task: Callable[..., Any], calls: list[tuple], workers: int) -> Iterator[tuple[tuple, Any]]:
    """``(call, task(*call))`` as each finishes: in this process (workers 1) or over ``workers`` processes."""
    if workers == 1:
        yield from ((call, task(*call)) for call in calls)
        return
    # forkserver: a forked child of a process that has run torch's thread pools can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
        futures = {pool.submit(task, *call): call for call in calls}
        for future in as_completed(futures):
            yield futures[future], future.result()


def run_on_ray(ray: Any, task: Callable[..., Any], calls: list[tuple], cpus: float, gpus: float) -> Iterator[tuple]:
    """``(call, task(*call))`` as each Ray task finishes; a task that Ray could not finish (its worker
    or node was lost, retries spent) gives ``(call, the RayError)`` instead of a result."""
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus)(task)
    pending = {remote.remote(*call): call for call in calls}
    while pending:
        [ready], _ = ray.wait(list(pending), num_returns=1)
        call = pending.pop(ready)
        try:
            outcome = ray.get(ready)
        except ray.exceptions.RayError as exc:
            outcome = exc
        yield call, outcome


def import_ray() -> Any:
    """The ``ray`` module, or a UserError saying what to install."""
    try:
        import ray
    except ImportError:
        raise UserError(RAY_HINT) from None
    return ray


def _connect(ray: Any, address: str | None) -> None:
    """Join the cluster at ``address``, or start a new local Ray instance: quietly (no dashboard, the
    workers' output stays in Ray's logs, a failed point's traceback is in its ``error.txt``), and with
    the command's own SIGTERM handling (stop cleanly, exit 130) put back after ``ray.init`` replaced it."""
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"join the Ray cluster at --address {address}" if address else "start a local Ray instance"
        raise UserError(f"cannot {where} ({reason})") from None
    finally:
        if sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)


def _check_fits(ray: Any, cpus: float, gpus: float) -> None:
    """Refuse points larger than the local Ray instance: their tasks would wait for ever."""
    have = ray.cluster_resources()
    if cpus > have.get("CPU", 0) or gpus > have.get("GPU", 0):
        raise UserError(
            f"--cpus-per-point {cpus:g} --gpus-per-point {gpus:g} do not fit this machine's Ray "
            f"({have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs); lower them"
        )
