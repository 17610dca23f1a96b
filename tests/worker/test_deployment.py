"""docker-compose.yml and the Dockerfiles, checked without a Docker engine: every service,
build file, command, module and NEGMERGE_ variable they name exists in the project."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from app.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))
SETTINGS = {f"NEGMERGE_{name.upper()}" for name in Settings.model_fields}
# Programs the images install ('.[service]' and its dependencies) or the base images bring.
PROGRAMS = {"uvicorn", "celery", "alembic", "python", "negmerge", "redis-server", "pg_isready",
            "redis-cli"}  # fmt: skip


def module_exists(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def check_command(argv: list[str]) -> None:
    """The program exists and the modules/apps it is pointed at exist in this project."""
    program = argv[0]
    assert program in PROGRAMS, f"unknown program {program!r} in {argv}"
    if program == "uvicorn":
        module, _, attribute = argv[1].partition(":")
        assert module_exists(module) and attribute == "app"
    if program == "celery":
        assert argv[1] == "-A" and module_exists(argv[2]), argv
        assert argv[3] == "worker"
        if "--queues" in argv:
            queues = argv[argv.index("--queues") + 1].split(",")
            defaults = Settings()
            assert queues == [defaults.queue_name, defaults.gpu_queue_name]
    if program == "python" and argv[1] == "-m":
        assert module_exists(argv[2]), argv
    if program == "alembic":
        assert argv[1:] == ["upgrade", "head"] and (REPO / "alembic.ini").exists()


def test_compose_has_every_service_of_the_deployment():
    services = COMPOSE["services"]
    assert {"postgres", "redis", "migrate", "api", "worker", "watchdog"} <= set(services)
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    assert "container_name" not in services["worker"]  # --scale needs unnamed replicas
    assert services["api"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"


@pytest.mark.parametrize("name", ["migrate", "api", "watchdog", "worker"])
def test_compose_services_build_existing_files_and_run_existing_commands(name, monkeypatch):
    service = COMPOSE["services"][name]
    dockerfile = REPO / service["build"]["context"] / service["build"]["dockerfile"]
    assert dockerfile.exists(), dockerfile
    check_command(service["command"])
    unknown = {key for key in service["environment"] if key.startswith("NEGMERGE_")} - SETTINGS
    assert not unknown, f"{name}: no such settings {unknown}"
    for key, value in service["environment"].items():  # and their values are valid
        monkeypatch.setenv(key, value)
    Settings()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_copy_existing_paths_and_run_existing_commands(dockerfile):
    text = dockerfile.read_text().replace("\\\n", " ")
    copies = re.findall(r"^COPY\s+(.+)$", text, flags=re.M)
    assert copies
    for line in copies:
        *sources, _target = shlex.split(line)
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"
    for variable in re.findall(r"\bNEGMERGE_[A-Z_]+", text):
        assert variable in SETTINGS, f"{dockerfile.name}: no setting {variable}"
    (cmd,) = re.findall(r"^CMD\s+(\[.*\])\s*$", text, flags=re.M)
    check_command(yaml.safe_load(cmd))


def test_the_object_store_profile_configures_the_service_for_it(monkeypatch):
    """The seaweedfs service (profile objectstore) and the commented lines that point the
    service at it: real settings, valid together, naming the store's S3 port and keys."""
    store = COMPOSE["services"]["seaweedfs"]
    assert store["profiles"] == ["objectstore"]
    config_path = store["volumes"][1].split(":")[0]
    identities = json.loads((REPO / config_path).read_text())["identities"]
    compose_text = (REPO / "docker-compose.yml").read_text()
    commented = dict(re.findall(r"^  # (NEGMERGE_[A-Z0-9_]+): (\S+)", compose_text, re.M))
    assert set(commented) <= SETTINGS and "NEGMERGE_ARTIFACT_ROOT" in commented
    for key, value in {**COMPOSE["services"]["worker"]["environment"], **commented}.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.artifact_root.startswith("s3://")
    assert settings.artifact_s3_endpoint_url == "http://seaweedfs:8333"
    assert "-s3.port=8333" in store["command"]
    keys = identities[0]["credentials"][0]
    assert keys["accessKey"] == settings.artifact_s3_access_key_id
    assert keys["secretKey"] == settings.artifact_s3_secret_access_key.get_secret_value()
