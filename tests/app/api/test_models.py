"""/v1/models: registration with a server-computed hash, versions, weights download."""

from __future__ import annotations

import hashlib
import shutil
import uuid

import torch

from app.services.models import add_version
from negmerge.fixtures import ensure_tiny_clip
from negmerge.io import save_file
from tests.app.conftest import model_body


def test_register_get_list_versions_and_download(client, caller, weights_file):
    response = client.post("/v1/models", json=model_body(weights_file), headers=caller.headers)
    assert response.status_code == 201, response.text
    model = response.json()
    assert response.headers["Location"] == f"/v1/models/{model['id']}"
    assert model["latest_version"] == 1 and model["image_size"] == 32
    assert client.get(f"/v1/models/{model['id']}", headers=caller.headers).json() == model
    assert [m["id"] for m in client.get("/v1/models", headers=caller.headers).json()["items"]] == [
        model["id"]
    ]

    versions = client.get(f"/v1/models/{model['id']}/versions", headers=caller.headers).json()
    expected = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert [(v["version"], v["weights_sha256"]) for v in versions["items"]] == [(1, expected)]
    one = client.get(f"/v1/models/{model['id']}/versions/1", headers=caller.headers).json()
    assert one["size_bytes"] == weights_file.stat().st_size

    download = client.get(one["download_url"], headers=caller.headers)
    assert download.status_code == 200
    assert download.content == weights_file.read_bytes()
    assert download.headers["X-Checksum-Sha256"] == expected


def test_a_new_version_records_its_lineage(client, caller, db, weights_file):
    model = client.post("/v1/models", json=model_body(weights_file), headers=caller.headers).json()
    with db.unit_of_work() as session:
        from app.db.repositories import ModelRepository

        parent = ModelRepository(session, caller.tenant_id).version(uuid.UUID(model["id"]), 1)
        add_version(
            session,
            caller.tenant_id,
            uuid.UUID(model["id"]),
            weights_uri=str(weights_file),
            weights_sha256="ab" * 32,
            size_bytes=1,
            parent_version_id=parent.id,
            produced_by_job_id=None,
            actor="test",
        )
    versions = client.get(f"/v1/models/{model['id']}/versions", headers=caller.headers).json()
    assert [(v["version"], v["parent_version"]) for v in versions["items"]] == [(1, None), (2, 1)]
    assert (
        client.get(f"/v1/models/{model['id']}", headers=caller.headers).json()["latest_version"]
        == 2
    )


def test_duplicate_name_is_409(client, caller, weights_file):
    assert (
        client.post("/v1/models", json=model_body(weights_file), headers=caller.headers).status_code
        == 201
    )
    again = client.post("/v1/models", json=model_body(weights_file), headers=caller.headers)
    assert again.status_code == 409 and "name" in again.json()["error"]["message"]


def test_weights_outside_the_data_roots_or_missing_are_422(client, caller, tmp_path):
    outside = tmp_path / "w.safetensors"
    outside.write_bytes(b"x")
    for uri in (str(outside), "/etc/passwd", "file:///etc/hostname"):
        response = client.post(
            "/v1/models", json={**model_body(outside), "weights_uri": uri}, headers=caller.headers
        )
        assert response.status_code == 422, uri
        assert response.json()["error"]["fields"][0]["field"] == "weights_uri"
        assert "NEGMERGE_DATA_ROOTS" in response.json()["error"]["message"]  # what to set


def test_weights_that_do_not_fit_the_architecture_are_422_and_nothing_is_stored(
    client, caller, weights_file, data_root
):
    junk = data_root / "weights" / "junk.safetensors"
    junk.write_bytes(b"hello")
    other_classes = data_root / "weights" / "two-classes.safetensors"
    save_file({"fc.weight": torch.zeros(2, 4), "fc.bias": torch.zeros(2)}, other_classes)
    for changes, field, problem in [
        ({"architecture": "resnet18"}, "weights_uri", "does not fit resnet18: missing key"),
        ({"classes": ["a", "b"]}, "weights_uri", "key 'fc.weight' is shaped [3, "),
        ({"weights_uri": str(junk)}, "weights_uri", "not a safetensors or PyTorch file"),
        ({"weights_uri": str(other_classes)}, "weights_uri", "does not fit test_resnet"),
        ({"architecture": "no-such-net"}, "architecture", "timm knows no model"),
        ({"init_args": {"bogus": 1}}, "init_args.bogus", "is not a parameter of test_resnet"),
    ]:
        response = client.post(
            "/v1/models", json={**model_body(weights_file), **changes}, headers=caller.headers
        )
        assert response.status_code == 422, (changes, response.text)
        (error,) = response.json()["error"]["fields"]
        assert error["field"] == field and problem in error["problem"], error
        assert str(data_root) not in response.text  # no server paths in the answer
    assert client.get("/v1/models", headers=caller.headers).json()["items"] == []


def test_the_library_rules_apply(client, caller, weights_file):
    body = {**model_body(weights_file), "classes": ["a", "a"]}
    response = client.post("/v1/models", json=body, headers=caller.headers)
    assert response.status_code == 422
    assert "unique" in response.json()["error"]["message"]
    clip = {**model_body(weights_file), "family": "open_clip", "templates": ["no placeholder"]}
    response = client.post("/v1/models", json=clip, headers=caller.headers)
    assert response.status_code == 422 and "templates" in response.json()["error"]["message"]


def test_a_custom_open_clip_architecture_comes_with_its_config(
    client, caller, weights_file, data_root, tmp_path
):
    clip = ensure_tiny_clip()
    config = data_root / "configs" / "tiny-clip.json"
    config.parent.mkdir(exist_ok=True)
    config.write_text(clip.config_path.read_text())
    weights = data_root / "weights" / "tiny-clip.safetensors"
    shutil.copy(clip.weights_path, weights)
    body = {
        **model_body(weights, name="tiny-clip"),
        "family": "open_clip",
        "architecture": "tiny-clip",
        "templates": ["a photo of a {}."],
        "model_config_uri": str(config),
    }
    created = client.post("/v1/models", json=body, headers=caller.headers)
    assert created.status_code == 201, created.text
    assert created.json()["model_config_uri"] == str(config)

    outside = tmp_path / "tiny-clip.json"
    outside.write_text(config.read_text())
    not_json = data_root / "configs" / "broken.json"
    not_json.write_text("{")
    not_clip = data_root / "configs" / "list.json"
    not_clip.write_text("[1, 2]")
    for name, changes, problem in [
        ("c1", {"model_config_uri": str(outside)}, "not under"),
        ("c2", {"model_config_uri": str(not_json)}, "JSON"),
        ("c3", {"model_config_uri": str(not_clip)}, "embed_dim"),
        ("c4", {"family": "classifier", "templates": None}, "open_clip"),
    ]:
        bad = client.post(
            "/v1/models", json={**body, "name": name, **changes}, headers=caller.headers
        )
        assert bad.status_code == 422, bad.text
        (field,) = bad.json()["error"]["fields"]
        assert field["field"] == "model_config_uri" and problem in field["problem"], field


def test_architectures_that_are_import_paths_are_422_and_nothing_runs(
    client, caller, weights_file, tmp_path
):
    """Tenant input is data, never code: `module:Class` was once imported and called with the
    tenant's init_args (torch.hub:load ran an uploaded hubconf.py; logging:basicConfig
    truncated a file). Architectures are names: both are refused, naming the field and what
    is allowed."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "hubconf.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\ndef net(): 0\n")
    for architecture, init_args in [
        ("logging:basicConfig", {"force": True, "filename": str(victim), "filemode": "w"}),
        ("torch.hub:load", {"repo_or_dir": str(tmp_path), "model": "net", "source": "local"}),
    ]:
        body = {**model_body(weights_file), "architecture": architecture, "init_args": init_args}
        response = client.post("/v1/models", json=body, headers=caller.headers)
        assert response.status_code == 422, response.text
        (error,) = response.json()["error"]["fields"]
        assert error["field"] == "architecture", error
        assert "looks like an import path" in error["problem"]
        assert "give a timm model name" in error["problem"]  # what is allowed instead
    assert victim.read_text() == "precious" and not (tmp_path / "ran").exists()
    assert client.get("/v1/models", headers=caller.headers).json()["items"] == []


def test_init_args_outside_the_declared_parameters_are_422(client, caller, weights_file):
    for init_args, field, problem in [
        ({"pretrained": True}, "init_args.pretrained", "is not a parameter of test_resnet"),
        ({"checkpoint_path": "/etc/passwd"}, "init_args.checkpoint_path", "not a parameter"),
        ({"pretrained_cfg_overlay": {"file": "/x"}}, "init_args.pretrained_cfg_overlay", "not"),
        ({"drop_rate": 3}, "init_args.drop_rate", "less than 1"),
    ]:
        body = {**model_body(weights_file), "init_args": init_args}
        response = client.post("/v1/models", json=body, headers=caller.headers)
        assert response.status_code == 422, response.text
        (error,) = response.json()["error"]["fields"]
        assert error["field"] == field and problem in error["problem"], error
        assert "takes drop_path_rate, drop_rate, global_pool, in_chans" in error["problem"]
    body = {**model_body(weights_file), "init_args": {"drop_rate": 0.1}}
    assert client.post("/v1/models", json=body, headers=caller.headers).status_code == 201


def test_an_import_path_already_in_the_database_never_becomes_a_job(
    client, caller, db, register, redis_client, settings
):
    """Defence in depth: a model row stored before the fix cannot start a job."""
    from sqlalchemy import update

    from app.db.models import Model
    from tests.app.conftest import job_body

    registered = register(caller)
    with db.unit_of_work() as session:
        session.execute(
            update(Model)
            .where(Model.id == uuid.UUID(registered.model_id))
            .values(architecture="logging:basicConfig", spec={"init_args": {"force": True}})
        )
    response = client.post("/v1/unlearning-jobs", json=job_body(registered), headers=caller.headers)
    assert response.status_code == 422, response.text
    assert "looks like an import path" in response.text
    assert redis_client.llen(settings.queue_name) == 0
