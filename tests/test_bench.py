"""The benchmarks in `bench/` still run against today's engine and service, at a size that takes seconds: what
`docs/benchmarks.md` tells a reader to run must not rot between the sessions that measure with it. Nothing here
is timed (the figures are the benchmarks' own business, written down in `docs/benchmarks.md`)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType

import pytest
import torch
from redis import Redis
from sqlalchemy import create_engine, text

from core.engine.sanitize import JobFiles
from core.params import SanitizeParams

pytest_plugins = ["service_fixtures"]

ROOT = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    """Imports a script of `bench/` as its own top-level module, as `python bench/<name>.py` runs it (and as a
    spawned process of `bench/engine.py` finds it again: the folder is on the path it hands its children)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))

    def load(name: str) -> ModuleType:
        return importlib.import_module(name)

    return load


def bench_databases(admin_url: str) -> set[str]:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            return set(connection.execute(text("SELECT datname FROM pg_database WHERE datname LIKE 'nad_bench_%'"))
                       .scalars())
    finally:
        admin.dispose()


def bench_queues(redis_url: str) -> set[bytes]:
    client = Redis.from_url(redis_url)
    try:
        return set(client.scan_iter("nad-bench-*"))
    finally:
        client.close()


def test_the_api_benchmark_reads_and_uploads_and_leaves_nothing_behind(postgres_url, redis_url, tmp_path):
    """`bench/api.py` as docs/benchmarks.md runs it, shrunk: every read answered 200, the upload taken (202),
    its figures written to `--out` as printed, and its database and queue gone afterwards (compared with what
    was there before: another run, stopped halfway, may have left its own)."""
    from service_fixtures import POSTGRES_ADMIN_URL, free_port

    before = bench_databases(POSTGRES_ADMIN_URL), bench_queues(redis_url)
    out = tmp_path / "api.json"
    env = os.environ | {"NAD_TEST_POSTGRES_URL": POSTGRES_ADMIN_URL, "NAD_TEST_REDIS_URL": redis_url}
    done = subprocess.run(
        [sys.executable, "bench/api.py", "--jobs", "3", "--seconds", "0.3", "--concurrency", "2",
         "--api-workers", "1", "--upload-mb", "2", "--port", str(free_port()), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert json.loads(out.read_text()) == report
    for reads in ("status_reads", "list_reads"):
        assert report[reads]["requests"] > 0
        assert report[reads]["statuses"] == {"200": report[reads]["requests"]}
        assert 0 < report[reads]["p50_ms"] <= report[reads]["p99_ms"]
    upload = report["upload"]
    assert upload["status"] == 202 and upload["upload_mb"] == 2
    assert upload["peak_rss_during_mib"] >= upload["rss_before_mib"] > 0
    assert report["jobs"] == 3 and report["api_workers"] == 1 and report["machine"]["cpu"]["name"]
    assert (bench_databases(POSTGRES_ADMIN_URL), bench_queues(redis_url)) == before


def test_the_engine_benchmark_measures_each_mode_alone_in_the_shape_its_table_and_chart_read(
        bench, digits_backdoor, tmp_path):
    """`bench/engine.py`'s measurement of a job, on the digits case shrunk to one epoch a stage: `fast` in a
    fresh spawned process as `main` runs every mode, `reference` in this one; both rows printed by `table` and
    drawn by `bench/plot.py`, whose input is the JSON `main` writes."""
    engine, plot = bench("engine"), bench("plot")
    files = JobFiles(checkpoint=digits_backdoor.checkpoint, clean_data=digits_backdoor.clean,
                     test_data=digits_backdoor.test, out=tmp_path / "out.safetensors")
    params = SanitizeParams.model_validate(digits_backdoor.params | {"teacher_epochs": 1, "epochs": 1})
    results = [engine.run_alone("fast", files, params), engine.run_mode("reference", files, params)]

    for result, mode in zip(results, ("fast", "reference"), strict=True):
        assert result["mode"] == mode
        assert set(result["stages_s"]) == set(plot.STAGES)
        assert all(seconds > 0 for seconds in result["stages_s"].values())
        assert result["train_images_per_s"] > 0 and result["eval_images_per_s"] > 0
        assert result["peak_rss_mib"] > 0 and result["peak_gpu_mib"] is None
        assert result["before"]["asr"] > 50  # the digits backdoor, measured
        assert set(result["after"]) == {"acc", "acc_non_target", "asr"}
    lines = engine.table(results).splitlines()
    assert lines[0].split()[:2] == ["mode", "wall"]
    assert [line.split()[0] for line in lines[1:]] == ["fast", "reference"]

    drawing = ET.fromstring(plot.svg(results, "digits"))
    bars = drawing.findall(f"{SVG}rect[{SVG}title]")
    assert len(bars) == len(results) * len(plot.STAGES)
    assert bench("machine").cpu()["name"]


def test_the_committed_chart_is_the_committed_results_drawn(tmp_path):
    """docs/benchmarks.md shows docs/img/engine-cpu.svg as `bench/plot.py` draws bench/results/engine-cpu.json:
    a chart edited or results remeasured without the other shows figures the JSON does not hold."""
    target = tmp_path / "engine-cpu.svg"
    subprocess.run([sys.executable, "bench/plot.py", "bench/results/engine-cpu.json", str(target)],
                   cwd=ROOT, check=True, timeout=60)
    assert target.read_text() == (ROOT / "docs" / "img" / "engine-cpu.svg").read_text()


@pytest.mark.parametrize("path", sorted((ROOT / "bench" / "results").glob("engine-*.json")), ids=lambda p: p.stem)
def test_each_recorded_engine_result_can_be_drawn_and_tabled(bench, path):
    """Every engine result kept in bench/results holds what `bench/plot.py` and `table` read: an old result
    the scripts can no longer show is a figure docs/benchmarks.md cites that no one can redraw."""
    engine, plot = bench("engine"), bench("plot")
    data = json.loads(path.read_text())
    assert {"device", "threads"} <= set(data["machine"])
    ET.fromstring(plot.svg(data["results"], path.stem))
    assert len(engine.table(data["results"]).splitlines()) == len(data["results"]) + 1


def test_the_steps_benchmark_times_training_and_inference_in_both_layouts(bench):
    """`bench/steps.py`'s building blocks on a few images: a rate for each layout, and channels_last really
    applied to the model and its inputs."""
    steps = bench("steps")
    from core.engine.models import build_model

    x = torch.rand(8, 3, 32, 32)
    for channels_last in (False, True):
        model, inputs = steps.layout(build_model("wrn-16-1", 10), x, channels_last)
        assert inputs.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert steps.training_rate(model, inputs, 1) > 0
        assert steps.inference_rate(model, inputs, 16) > 0
        assert not model.training  # inference_rate measures the model as evaluation runs it
