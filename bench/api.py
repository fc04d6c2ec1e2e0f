"""The API under load: status reads per second with their latency, and the API's memory during a large upload.

    .venv/bin/python bench/api.py --out bench/results/api.json

It starts the API (`python -m api`, as `make up` does, with `--api-workers` processes) on a fresh PostgreSQL
database and the local Redis, fills it with jobs, then, from a separate process, keeps `--concurrency`
keep-alive connections busy with `GET /jobs/{id}` (and then `GET /jobs?limit=20`) for `--seconds` each. The
load process speaks HTTP/1.1 over raw asyncio streams: a full HTTP client in Python would be slower than the
server it measures. Last, it streams a `--upload-mb` MB multipart upload and reports how far the resident
memory of the API process that received it rose (its peak, VmHWM, reset before the upload; with several
workers, the largest rise of any).

Needs PostgreSQL and Redis (NAD_TEST_POSTGRES_URL, NAD_TEST_REDIS_URL, as the tests); nothing of ../shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from core import keys
from core.database import Database
from machine import cpu

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = os.environ.get("NAD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("NAD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PARAMS = json.dumps({"arch": "wrn-16-1", "num_classes": 10})


# ---- the load process ------------------------------------------------------------------------------------


async def _connection(host: str, port: int, requests: list[bytes], deadline: float, latencies: list[float],
                      statuses: dict[int, int]) -> None:
    """One keep-alive connection sending the requests in turn until `deadline`, timing each."""
    reader, writer = await asyncio.open_connection(host, port)
    turn = 0
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        writer.write(requests[turn % len(requests)])
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        latencies.append(time.perf_counter() - start)
        statuses[status] = statuses.get(status, 0) + 1
        turn += 1
    writer.close()


async def _load(url: str, key: str, paths: list[str], seconds: float, concurrency: int) -> dict:
    address = httpx.URL(url)
    requests = [f"GET {path} HTTP/1.1\r\nHost: {address.host}\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
                for path in paths]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    await asyncio.gather(*(_connection(address.host, address.port, requests[i::concurrency] or requests,
                                       deadline, latencies, statuses) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "requests_per_s": round(len(ordered) / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(ordered), 2),
        "p99_ms": round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 2),
        "statuses": statuses,
    }


def load_main(args: argparse.Namespace) -> int:
    paths = json.loads(Path(args.paths).read_text())
    print(json.dumps(asyncio.run(_load(args.url, args.key, paths, args.seconds, args.concurrency))))
    return 0


# ---- the driver ------------------------------------------------------------------------------------------


def fresh_database() -> tuple[str, callable]:
    """A new PostgreSQL database and the function that drops it."""
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"nad_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()

    return make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False), drop


def start_api(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    with log.open("ab") as stream:
        process = subprocess.Popen([sys.executable, "-m", "api"], cwd=ROOT, env=os.environ | env, stdout=stream,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the API did not start:\n{log.read_text()[-2000:]}")


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def multipart(size: int, boundary: str) -> Iterator[bytes]:
    """A multipart body with a `size`-byte model and a small clean_data, made as it is sent."""
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{PARAMS}\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"clean_data\"; filename=\"c.npz\"\r\n\r\n"
           f"clean\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.pt\"\r\n"
           "Content-Type: application/octet-stream\r\n\r\n").encode()
    chunk = os.urandom(1 << 20)
    for sent in range(0, size, len(chunk)):
        yield chunk[: size - sent]
    yield f"\r\n--{boundary}--\r\n".encode()


def api_processes(pid: int) -> list[int]:
    """The API's supervisor and the worker processes uvicorn started under it."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


def upload_memory(url: str, headers: dict[str, str], pid: int, megabytes: int) -> dict:
    processes = api_processes(pid)
    for process in processes:
        Path(f"/proc/{process}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = {process: memory_kib(process) for process in processes}
    boundary = uuid.uuid4().hex
    started = time.perf_counter()
    response = httpx.post(f"{url}/sanitize", content=multipart(megabytes << 20, boundary), timeout=600,
                          headers=headers | {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    seconds = time.perf_counter() - started
    rises = {process: memory_kib(process)["VmHWM"] - before[process]["VmRSS"] for process in processes}
    receiver = max(rises, key=rises.get)
    return {"upload_mb": megabytes, "status": response.status_code, "seconds": round(seconds, 2),
            "rss_before_mib": round(before[receiver]["VmRSS"] / 1024, 1),
            "peak_rss_during_mib": round((before[receiver]["VmRSS"] + rises[receiver]) / 1024, 1),
            "rise_mib": round(rises[receiver] / 1024, 1)}


def run_load(url: str, key: str, paths: list[str], args: argparse.Namespace, folder: Path) -> dict:
    """The load generator as its own process, so it does not share the driver's interpreter."""
    listing = folder / f"paths-{uuid.uuid4().hex[:6]}.json"
    listing.write_text(json.dumps(paths))
    output = subprocess.run(
        [sys.executable, __file__, "load", "--url", url, "--key", key, "--paths", str(listing),
         "--seconds", str(args.seconds), "--concurrency", str(args.concurrency)],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )
    return json.loads(output.stdout)


def driver_main(args: argparse.Namespace) -> int:
    database_url, drop = fresh_database()
    queue = f"nad-bench-{uuid.uuid4().hex[:6]}"
    port = args.port
    url = f"http://127.0.0.1:{port}"
    try:  # the database goes whatever fails after it was made: the API's start too
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            env = {"NAD_DATABASE_URL": database_url, "NAD_BROKER_URL": REDIS_URL, "NAD_QUEUE": queue,
                   "NAD_STORAGE_DIR": str(folder / "storage"), "NAD_API_PORT": str(port),
                   "NAD_MAX_QUEUED_JOBS": str(args.jobs + 10), "NAD_API_WORKERS": str(args.api_workers)}
            db = Database(database_url)
            db.migrate()
            with db.session() as session:
                _, key = keys.create_key(session, "bench")
            db.dispose()
            api = start_api(env, port, folder / "api.log")
            try:
                headers = {"Authorization": f"Bearer {key}"}
                files = {"model": ("m.pt", b"model"), "clean_data": ("c.npz", b"clean")}
                with httpx.Client(base_url=url, headers=headers) as client:
                    ids = [client.post("/sanitize", files=files, data={"params": PARAMS}).json()["id"]
                           for _ in range(args.jobs)]
                results = {
                    "status_reads": run_load(url, key, [f"/jobs/{job_id}" for job_id in ids], args, folder),
                    "list_reads": run_load(url, key, ["/jobs?limit=20"], args, folder),
                    "upload": upload_memory(url, headers, api.pid, args.upload_mb),
                }
            finally:
                api.terminate()
                api.wait(timeout=30)
                client = redis.Redis.from_url(REDIS_URL)
                client.delete(queue)
                client.close()
    finally:
        drop()
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": cpu(),
               "python": platform.python_version()}
    report = {"machine": machine, "api_workers": args.api_workers, "jobs": args.jobs,
              "concurrency": args.concurrency, "seconds": args.seconds, **results}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")
    load = commands.add_parser("load", help="(internal) the load process")
    load.add_argument("--url", required=True)
    load.add_argument("--key", required=True)
    load.add_argument("--paths", required=True)
    load.add_argument("--seconds", type=float, required=True)
    load.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--jobs", type=int, default=200, help="jobs in the database, read in turn")
    parser.add_argument("--seconds", type=float, default=10, help="seconds of load per endpoint")
    parser.add_argument("--concurrency", type=int, default=8, help="keep-alive connections")
    parser.add_argument("--api-workers", type=int, default=2, help="NAD_API_WORKERS: one per core")
    parser.add_argument("--upload-mb", type=int, default=200)
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--out", type=Path, help="where to write the JSON results")
    args = parser.parse_args()
    return load_main(args) if args.command == "load" else driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
