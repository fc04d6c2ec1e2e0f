"""docker-compose.yml and docker/: checked by structure, since no Docker engine runs here. What each image
starts must exist in the repository, and the API image must stay torch-free."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BUILT = ("api", "worker")


def dockerfile(service: str) -> str:
    build = SERVICES[service]["build"]
    return (ROOT / build["context"] / build["dockerfile"]).read_text()


def instruction(text: str, name: str) -> list[str]:
    """The last exec-form (JSON) instruction `name` of a Dockerfile."""
    found = re.findall(rf"^{name}\s+(\[.*\])\s*$", text, flags=re.MULTILINE)
    assert found, f"no exec-form {name}"
    return json.loads(found[-1])


def requirement_name(line: str) -> str:
    return re.split(r"[\[<>=!~ ]", line.strip(), maxsplit=1)[0].lower()


def test_the_four_services_are_there() -> None:
    assert set(SERVICES) == {"api", "worker", "redis", "postgres"}


def test_the_worker_reserves_a_gpu() -> None:
    (device,) = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == 1


RESET = object()  # what a `!reset` tag reads as


def test_the_cpu_override_drops_the_gpu_reservation_and_nothing_else() -> None:
    """`docker/cpu.yml` is merged over the base file; its `!reset` removes what it names (the compose spec's
    merge rules), here the worker's `deploy` and with it the GPU a host without one cannot give."""
    loader = type("ComposeLoader", (yaml.SafeLoader,), {})
    loader.add_constructor("!reset", lambda _loader, _node: RESET)
    override = yaml.load((ROOT / "docker" / "cpu.yml").read_text(), Loader=loader)
    assert override == {"services": {"worker": {"deploy": RESET}}}
    assert "deploy" in SERVICES["worker"]
    assert "docker compose -f docker-compose.yml -f docker/cpu.yml up --build" in (ROOT / "README.md").read_text()


def test_redis_keeps_the_queue_and_never_evicts_it() -> None:
    command = " ".join(SERVICES["redis"]["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command


def test_api_and_worker_share_storage_database_and_broker() -> None:
    envs = [SERVICES[name]["environment"] for name in BUILT]
    assert envs[0] == envs[1]
    env = envs[0]
    assert "@postgres:" in env["NAD_DATABASE_URL"] and "//redis:" in env["NAD_BROKER_URL"]
    mounts = [{volume.split(":")[0]: volume.split(":")[1] for volume in SERVICES[name]["volumes"]}
              for name in BUILT]
    shared = {name: path for name, path in mounts[0].items() if mounts[1].get(name) == path}
    assert shared and shared.keys() <= COMPOSE["volumes"].keys()
    assert any(env["NAD_STORAGE_DIR"].startswith(path) for path in shared.values())
    for name in BUILT:
        assert set(SERVICES[name]["depends_on"]) == {"postgres", "redis"}


@pytest.mark.parametrize("service", BUILT)
def test_every_image_starts_something_the_repository_has(service: str) -> None:
    text = dockerfile(service)
    for source in re.findall(r"^COPY\s+(\S+)\s+\S+\s*$", text, flags=re.MULTILINE):
        assert (ROOT / source).exists(), f"{service}: COPY {source} names nothing"
    command = instruction(text, "CMD")
    scripts = PYPROJECT["project"]["scripts"]
    if command[:2] == ["python", "-m"]:
        module = ROOT / command[2].replace(".", "/")
        assert (module / "__main__.py").exists() or module.with_suffix(".py").exists()
    elif command[0] == "celery":
        app = command[command.index("-A") + 1]
        assert (ROOT / (app.replace(".", "/") + ".py")).exists()
    else:
        assert command[0] in scripts, f"{service}: {command[0]} is no console script"


def test_the_api_image_installs_no_torch_and_nothing_pyproject_does_not_pin() -> None:
    text = dockerfile("api")
    assert "--no-deps" in text
    lines = [line for line in (ROOT / "docker/api-requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    declared = {requirement_name(spec): spec for spec in PYPROJECT["project"]["dependencies"]}
    for line in lines:
        assert declared.get(requirement_name(line)) == line.strip(), f"{line} differs from pyproject.toml"
    names = {requirement_name(line) for line in lines}
    assert not names & {"torch", "torchvision", "numpy", "pillow", "safetensors"}


def test_the_worker_image_forces_weights_only_torch_loads() -> None:
    """Besides worker/app.py's own setting, so that any other entry point into the image is covered."""
    env = re.findall(r"^ENV\s+(\S+)\s*$", dockerfile("worker"), flags=re.MULTILINE)
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD=1" in env


def test_the_images_non_editable_install_carries_the_migrations() -> None:
    """`pip install .` ships only package data that pyproject names; the images migrate at start."""
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["core"]
    migrations = ROOT / "core" / "migrations"
    files = [p.relative_to(ROOT / "core").as_posix() for p in migrations.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    assert files and all(any(fnmatch.fnmatch(f, pattern) for pattern in patterns) for f in files)
