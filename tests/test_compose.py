"""docker-compose.yml, docker/ and constraints.txt: checked by structure, since no Docker engine runs here. What
each image starts must exist in the repository, the API image must stay torch-free, and every install (`make`'s
and the images') takes the versions the tests ran with."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


def copied(text: str) -> list[str]:
    """The sources of a Dockerfile's COPY instructions (the last word of each is where they go)."""
    return [source for line in re.findall(r"^COPY\s+(.+)$", text, flags=re.MULTILINE)
            for source in line.split()[:-1]]


PINS = {canonicalize_name(requirement.name): str(requirement.specifier).removeprefix("==")
        for requirement in (Requirement(line) for line in (ROOT / "constraints.txt").read_text().splitlines()
                            if line.strip() and not line.startswith("#"))}


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
    for source in copied(text):
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


def test_constraints_pin_every_dependency_to_a_version_pyproject_allows() -> None:
    """constraints.txt is what `make` and the images install with: a dependency it does not pin would float to
    whatever release is newest on the day, and a pin outside pyproject's range would make pip fail."""
    requirements = [*PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"]["dev"]]
    for line in requirements:
        requirement = Requirement(line)
        pinned = PINS.get(canonicalize_name(requirement.name))
        assert pinned, f"{requirement.name} is not in constraints.txt"
        assert requirement.specifier.contains(pinned), f"constraints.txt pins {requirement.name} {pinned}: {line}"


def test_the_tests_run_in_the_pinned_environment() -> None:
    """Every pinned package that is installed here has its pinned version: what the tests pass with is what
    constraints.txt promises. (Packages of another platform, such as the CUDA libraries on aarch64, may be
    absent.) A failure here after a change of constraints.txt means `make` has not yet refreshed `.venv`."""
    installed = {canonicalize_name(dist.metadata["Name"]): dist.version for dist in importlib.metadata.distributions()}
    differing = {name: (pinned, installed[name]) for name, pinned in PINS.items()
                 if name in installed and installed[name] != pinned}
    assert not differing, f"pinned and installed versions differ: {differing}"


@pytest.mark.parametrize("service", BUILT)
def test_every_image_installs_with_the_constraints(service: str) -> None:
    text = dockerfile(service)
    installs = re.findall(r"pip install [^\\\n]*", text)
    assert installs and "constraints.txt" in copied(text)
    for install in installs:  # one that installs no dependency (--no-deps) has nothing to constrain
        assert "--no-deps" in install or re.search(r"-c \S*constraints\.txt", install), f"{service}: {install}"
