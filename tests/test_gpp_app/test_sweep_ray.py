"""``gpp-onnx sweep --executor ray``: each point a Ray task, rows in the same resumable CSV."""

from __future__ import annotations

import csv
import functools
import signal
import sys
from contextlib import contextmanager

import pytest
from helpers import run_cli

from gpp_app import sweep as sweep_module
from gpp_app.sweep_executors import RAY_HINT
from gpp_onnx.files import interruption_handler

GRID = ["--patterns", "group,block", "--sparsities", "0.5", "--exclude", "conv0"]


@pytest.fixture
def ray(monkeypatch):
    """ray, its local instances held to a 2-core machine's size; the test is skipped without it."""
    ray = pytest.importorskip("ray", reason="needs ray (pip install 'gpp-onnx[distributed]')")
    monkeypatch.setattr(ray, "init", functools.partial(ray.init, num_cpus=2))
    return ray


def sweep_args(dense_path, data_dir, out, *options: str) -> list[str]:
    return ["sweep", str(dense_path), "--data", str(data_dir), "-o", str(out), *GRID, *options]


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_ray_tasks_write_the_same_csv_as_the_local_executor(ray, torch, capsys, model_path, data_dir, tmp_path):
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert run_cli(capsys, *sweep_args(model_path, data_dir, local, "--epochs", "1"))[0] == 0
    code, _, stderr = run_cli(capsys, *sweep_args(model_path, data_dir, on_ray, "--epochs", "1", "--executor", "ray"))
    reported = sorted(line.split(":")[0] for line in stderr.splitlines())
    assert code == 0 and reported == ["block 0.5 seed 0", "group 0.5 seed 0"]  # Ray itself says nothing
    rows = read_csv(on_ray / "results.csv")
    assert rows == read_csv(local / "results.csv")
    assert [r["pattern"] for r in rows] == ["group", "block"] and not any(r["error"] for r in rows)
    assert all(float(r["vta_speedup"]) > 1 for r in rows)
    assert len(list((on_ray / "points").glob("*/finetuned.onnx"))) == 2  # the tasks wrote into -o
    assert not ray.is_initialized()  # the local instance was shut down
    assert signal.getsignal(signal.SIGTERM) is interruption_handler  # not ray.init's: SIGTERM still exits 130


def test_worker_processes_write_the_same_csv_after_torch_ran_here(torch, capsys, model_path, data_dir, tmp_path):
    here, pool = tmp_path / "here", tmp_path / "pool"
    assert run_cli(capsys, *sweep_args(model_path, data_dir, here, "--epochs", "1"))[0] == 0  # torch ran here
    # forked children of a process whose torch thread pools ran can deadlock: the pool uses forkserver
    assert run_cli(capsys, *sweep_args(model_path, data_dir, pool, "--epochs", "1", "--workers", "2"))[0] == 0
    by_pattern = lambda rows: sorted(rows, key=lambda r: r["pattern"])  # noqa: E731 (finishing order differs)
    assert by_pattern(read_csv(pool / "results.csv")) == by_pattern(read_csv(here / "results.csv"))


def test_a_point_larger_than_the_local_ray_instance_is_refused(ray, capsys, model_path, data_dir, tmp_path):
    out = tmp_path / "sweep"
    code, _, stderr = run_cli(
        capsys, *sweep_args(model_path, data_dir, out, "--executor", "ray", "--cpus-per-point", "3")
    )
    assert code == 2 and "--cpus-per-point 3 --gpus-per-point 0 do not fit" in stderr and stderr.count("\n") == 1
    assert not out.exists() and not ray.is_initialized()


def test_an_unreachable_cluster_is_a_one_line_error(capsys, model_path, data_dir, tmp_path):
    pytest.importorskip("ray", reason="needs ray (pip install 'gpp-onnx[distributed]')")
    out = tmp_path / "sweep"
    code, _, stderr = run_cli(capsys, *sweep_args(model_path, data_dir, out, "--executor", "ray", "--address", "x"))
    assert code == 2 and stderr == "error: cannot join the Ray cluster at --address x (Invalid address format: x)\n"
    assert not out.exists()


def test_a_lost_task_is_reported_in_the_error_column(monkeypatch, capsys, model_path, data_dir, tmp_path):
    @contextmanager
    def losing_the_block_point(*executor):
        def dispatch(task, calls):
            for call in calls:
                yield call, ConnectionError("node lost") if call[3][0] == "block" else task(*call)

        yield dispatch

    monkeypatch.setattr(sweep_module, "dispatcher", losing_the_block_point)
    out = tmp_path / "sweep"
    assert run_cli(capsys, *sweep_args(model_path, data_dir, out, "--epochs", "0"))[0] == 0
    rows = {r["pattern"]: r for r in read_csv(out / "results.csv")}
    assert rows["block"]["error"] == "ConnectionError: node lost" and rows["block"]["accuracy_after_vta"] == ""
    assert rows["group"]["error"] == "" and float(rows["group"]["accuracy_after_vta"]) >= 0


def test_without_ray_the_executor_is_a_one_line_error(monkeypatch, capsys, model_path, data_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    out = tmp_path / "sweep"
    code, _, stderr = run_cli(capsys, *sweep_args(model_path, data_dir, out, "--executor", "ray"))
    assert code == 2 and stderr == f"error: {RAY_HINT}\n"
    assert not out.exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--address", "auto"], "--address, --cpus-per-point and --gpus-per-point go with --executor ray"),
        (["--gpus-per-point", "1"], "--address, --cpus-per-point and --gpus-per-point go with --executor ray"),
        (["--executor", "dask"], "--executor 'dask' is not one of local, ray"),
        (["--executor", "ray", "--workers", "2"], "--workers goes with --executor local"),
        (["--executor", "ray", "--cpus-per-point", "-1"], "must be 0 or more, and not both 0"),
        (["--executor", "ray", "--cpus-per-point", "0"], "must be 0 or more, and not both 0"),
        (["--executor", "ray", "--gpus-per-point", "1.5"], "a fraction of one GPU or whole GPUs"),
    ],
)
def test_executor_options_that_do_not_fit_are_refused_up_front(
    options, message, monkeypatch, capsys, model_path, data_dir, tmp_path
):
    monkeypatch.setitem(sys.modules, "ray", None)  # refused before Ray would be needed
    out = tmp_path / "sweep"
    code, _, stderr = run_cli(capsys, *sweep_args(model_path, data_dir, out, *options))
    assert code == 2 and message in stderr and stderr.count("\n") == 1
    assert not out.exists()
