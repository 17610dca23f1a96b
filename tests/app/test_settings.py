"""Data roots apart from the server's own files: a data root that
contains the artifact root (or lies inside it) is refused at start-up, and no shipped
configuration has one."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from app.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("data_roots", "artifact_root", "what"),
    [
        (["/srv/var"], "/srv/var/artifacts", "NEGMERGE_ARTIFACT_ROOT"),  # the shipped mistake
        (["/srv/var/artifacts/models"], "/srv/var/artifacts", "NEGMERGE_ARTIFACT_ROOT"),
        (["/srv/data", "/srv/var/artifacts"], "/srv/var/artifacts/", "NEGMERGE_ARTIFACT_ROOT"),
        (["/srv/data/{tenant}"], "/srv/data/shared/artifacts", "NEGMERGE_ARTIFACT_ROOT"),
        (["s3://bucket/negmerge"], "s3://bucket/negmerge/artifacts", "NEGMERGE_ARTIFACT_ROOT"),
        (["file:///srv/var"], "/srv/var/artifacts", "NEGMERGE_ARTIFACT_ROOT"),
    ],
)
def test_a_data_root_overlapping_the_artifact_root_is_refused(data_roots, artifact_root, what):
    with pytest.raises(ValidationError) as info:
        Settings(data_roots=data_roots, artifact_root=artifact_root)
    message = str(info.value)
    assert f"overlaps {what}" in message and "NEGMERGE_DATA_ROOTS: " in message
    assert "postgres" not in message and "sqlite" not in message  # no database URL shown


def test_a_link_into_the_artifact_root_is_an_overlap(tmp_path):
    (tmp_path / "var" / "artifacts").mkdir(parents=True)
    (tmp_path / "data").symlink_to(tmp_path / "var" / "artifacts")
    with pytest.raises(ValidationError, match="overlaps NEGMERGE_ARTIFACT_ROOT"):
        Settings(data_roots=[str(tmp_path / "data")], artifact_root=str(tmp_path / "var"))


def test_the_sqlite_file_and_the_broker_folder_are_the_servers_too(tmp_path):
    with pytest.raises(ValidationError, match="overlaps NEGMERGE_DATABASE_URL"):
        Settings(
            data_roots=[str(tmp_path)],
            artifact_root="/srv/var/artifacts",
            broker_folder="/srv/var/broker",
            database_url=f"sqlite:///{tmp_path / 'negmerge.db'}",
        )
    with pytest.raises(ValidationError, match="overlaps NEGMERGE_BROKER_FOLDER"):
        Settings(
            data_roots=[str(tmp_path)],
            artifact_root="/srv/var/artifacts",
            broker_folder=str(tmp_path / "broker"),
            database_url="postgresql+psycopg://u:secret@db/negmerge",
        )


def test_the_tenant_placeholder_is_a_whole_segment():
    with pytest.raises(ValidationError, match=r"\{tenant\} must be a whole path segment"):
        Settings(data_roots=["/srv/data/x{tenant}"], artifact_root="/srv/var/artifacts")
    ok = Settings(data_roots=["/srv/data/{tenant}/models"], artifact_root="/srv/var/artifacts")
    assert ok.data_roots == ["/srv/data/{tenant}/models"]


def apart(settings: Settings) -> None:
    """Checked here without the settings' own rule: no data root contains or lies in the
    artifact root."""
    artifacts = os.path.abspath(settings.artifact_root.removeprefix("file://")) + "/"
    for root in settings.data_roots:
        shared = os.path.abspath(root.split("{tenant}")[0].removeprefix("file://")) + "/"
        assert not artifacts.startswith(shared) and not shared.startswith(artifacts), (
            root,
            settings.artifact_root,
        )


def shipped_environments() -> dict[str, dict[str, str]]:
    """The NEGMERGE_ variables of every shipped configuration."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    found = {
        f"compose:{name}": {k: str(v) for k, v in service["environment"].items()}
        for name, service in compose["services"].items()
        if any(k.startswith("NEGMERGE_") for k in service.get("environment", {}))
    }
    for dockerfile in sorted((REPO / "docker").glob("Dockerfile.*")):
        text = dockerfile.read_text().replace("\\\n", " ")
        pairs = re.findall(r"(NEGMERGE_[A-Z_]+)=('[^']*'|\S+)", text)
        found[dockerfile.name] = {k: v.strip("'") for k, v in pairs}
    return found


@pytest.mark.parametrize("name", sorted(shipped_environments()))
def test_every_shipped_configuration_keeps_the_data_roots_apart(name, monkeypatch):
    for key in [k for k in os.environ if k.startswith("NEGMERGE_")]:
        monkeypatch.delenv(key)
    for key, value in shipped_environments()[name].items():
        monkeypatch.setenv(key, value)
    apart(Settings())


def test_the_embedded_default_and_the_demo_keep_the_data_roots_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("NEGMERGE_")]:
        monkeypatch.delenv(key)
    apart(Settings())  # ./var/data beside ./var/artifacts
    # The demo keeps its artifacts under `home`: home itself is no data root.
    source = (REPO / "examples" / "demo.py").read_text()
    (roots,) = re.findall(r"service_env\(home, (\[.*?\])\)", source)
    assert "home" not in roots, roots
