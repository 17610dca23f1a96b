"""/v1/datasets: registration by URI and archive uploads, where nothing unsafe gets stored."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.db.models import Dataset
from tests.app import bombs
from tests.app.conftest import CLASSES, write_dataset


def png_bytes(color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def manifest(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def good_files(n: int = 3) -> dict[str, bytes]:
    rows = [{"id": f"s{i}", "path": f"img/{i}.png", "label": CLASSES[i % 3]} for i in range(n)]
    files = {f"img/{i}.png": png_bytes((10 * i, 0, 0)) for i in range(n)}
    return {"manifest.jsonl": manifest(rows), **files}


def zip_of(files: dict[str, bytes], prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(prefix + name, data)
    return buffer.getvalue()


def tar_of(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buffer.getvalue()


def upload(client, caller, data: bytes, filename: str = "data.zip", **form):  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/datasets:upload",
        files={"file": (filename, data, "application/octet-stream")},
        data={"name": "uploaded", **form},
        headers=caller.headers,
    )


def stored_nothing(db, settings) -> bool:  # type: ignore[no-untyped-def]
    with db.unit_of_work() as session:
        rows = session.scalar(select(func.count()).select_from(Dataset))
    store = Path(settings.artifact_root)
    leftovers = [p for p in store.rglob("*") if p.is_file()] if store.exists() else []
    return rows == 0 and not leftovers


def test_register_by_uri_hashes_and_counts(client, caller, shapes_dir):
    response = client.post(
        "/v1/datasets",
        json={"name": "shapes", "manifest_uri": str(shapes_dir / "manifest.jsonl")},
        headers=caller.headers,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["sample_count"] == 18 and body["labels"] == sorted(CLASSES)
    assert body["split_counts"] == {"train": 12, "val": 3, "test": 3}
    assert len(body["content_sha256"]) == 64 and body["source"] == "uri"
    assert response.headers["Location"] == f"/v1/datasets/{body['id']}"
    got = client.get(response.headers["Location"], headers=caller.headers)
    assert got.json() == body
    listed = client.get("/v1/datasets", headers=caller.headers).json()
    assert [d["id"] for d in listed["items"]] == [body["id"]]


def test_register_by_uri_outside_the_data_roots_is_refused(client, caller, tmp_path):
    write_dataset(tmp_path / "elsewhere")
    response = client.post(
        "/v1/datasets",
        json={"name": "x", "manifest_uri": str(tmp_path / "elsewhere" / "manifest.jsonl")},
        headers=caller.headers,
    )
    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["field"] == "manifest_uri"
    passwd = client.post(
        "/v1/datasets", json={"name": "x", "manifest_uri": "/etc/passwd"}, headers=caller.headers
    )
    assert passwd.status_code == 422


def test_register_checks_labels_against_the_model(client, registered, data_root):
    write_dataset(data_root / "odd-labels", per_class=3, classes=["circle", "blob"])
    response = client.post(
        "/v1/datasets",
        json={
            "name": "odd",
            "manifest_uri": str(data_root / "odd-labels"),
            "model_id": registered.model_id,
        },
        headers=registered.caller.headers,
    )
    assert response.status_code == 422
    assert "'blob'" in response.json()["error"]["message"]


@pytest.mark.parametrize("packer", ["zip", "zip-in-folder", "tar"])
def test_upload_a_good_archive(client, caller, settings, packer):
    data = {
        "zip": lambda: zip_of(good_files()),
        "zip-in-folder": lambda: zip_of(good_files(), prefix="mydata/"),
        "tar": lambda: tar_of(good_files()),
    }[packer]()
    response = upload(client, caller, data, "data.tar.gz" if packer == "tar" else "data.zip")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["source"] == "upload" and body["sample_count"] == 3
    assert body["manifest_uri"] is None and len(body["archive_sha256"]) == 64
    stored = list(Path(settings.artifact_root, "datasets").rglob("*.png"))
    assert len(stored) == 3
    assert not any(Path(settings.artifact_root, "tmp").iterdir())


def test_uploaded_dataset_can_be_used_by_a_job(client, registered):
    files = {
        "manifest.jsonl": manifest(
            [
                {
                    "id": f"u{i}",
                    "path": f"{i}.png",
                    "label": CLASSES[i % 3],
                    "split": "val" if i > 6 else "train",
                }
                for i in range(9)
            ]
        ),
        **{f"{i}.png": png_bytes((i, i, i)) for i in range(9)},
    }
    dataset = upload(client, registered.caller, zip_of(files))
    assert dataset.status_code == 201, dataset.text
    body = {
        "model": {"id": registered.model_id},
        "forget": {"dataset_id": dataset.json()["id"], "ids": ["u0"]},
        "variants": {"preset": "tiny-classifier"},
    }
    job = client.post("/v1/unlearning-jobs", json=body, headers=registered.caller.headers)
    assert job.status_code == 202, job.text


def _symlink_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in good_files().items():
            zf.writestr(name, data)
        link = zipfile.ZipInfo("img/link.png")
        link.external_attr = 0o120777 << 16  # a symbolic link
        zf.writestr(link, "/etc/passwd")
    return buffer.getvalue()


def _bomb_zip() -> bytes:
    files = good_files()
    files["padding.bin"] = b"\0" * (4 * 1024 * 1024)  # 4 MiB of zeros: ~1000x
    return zip_of(files)


def _duplicate_ids_zip() -> bytes:
    files = good_files()
    rows = [{"id": "same", "path": f"img/{i}.png", "label": "circle"} for i in range(2)]
    files["manifest.jsonl"] = manifest(rows)
    return zip_of(files)


def _not_an_image_zip() -> bytes:
    files = good_files()
    files["img/1.png"] = b"this is text, not a PNG"
    return zip_of(files)


def _escaping_manifest_zip() -> bytes:
    files = good_files()
    files["manifest.jsonl"] = manifest([{"id": "a", "path": "../../etc/passwd", "label": "circle"}])
    return zip_of(files)


def _duplicate_member_zip() -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as zf:
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": that is the point
        for name, data in good_files().items():
            zf.writestr(name, data)
        zf.writestr("img/0.png", b"second copy")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: zip_of({"../evil.txt": b"x", **good_files()}), "leaves the archive's root"),
        (lambda: zip_of({"/abs/evil.txt": b"x", **good_files()}), "leaves the archive's root"),
        (_symlink_zip, "is a link"),
        (lambda: tar_of(good_files(), links={"img/link.png": "/etc/passwd"}), "is a link"),
        (lambda: tar_of({"../../evil": b"x"}), "leaves the archive's root"),
        (_bomb_zip, "decompression bomb"),
        (_not_an_image_zip, "not a readable image"),
        (_duplicate_ids_zip, "duplicate id 'same'"),
        (_escaping_manifest_zip, "leaves the data set's root"),
        (_duplicate_member_zip, "appears twice"),
        (lambda: b"just some bytes", "not a zip or tar archive"),
        (lambda: zip_of({"readme.txt": b"no manifest, no images"}), "no manifest"),
    ],
    ids=[
        "zip-slip",
        "absolute",
        "zip-symlink",
        "tar-symlink",
        "tar-slip",
        "bomb",
        "non-image",
        "duplicate-ids",
        "manifest-escape",
        "duplicate-member",
        "not-archive",
        "no-manifest",
    ],
)
def test_unsafe_or_broken_archives_are_refused_and_nothing_is_stored(
    client, caller, db, settings, make, words
):
    response = upload(client, caller, make())
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["fields"][0]["field"] == "file"
    assert words in error["message"], error["message"]
    assert str(settings.artifact_root) not in error["message"]  # no server paths leak
    assert stored_nothing(db, settings)


def test_tar_bomb_is_stopped_by_its_header(client, caller, db, settings):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        info = tarfile.TarInfo("huge.bin")
        info.size = 64 * 1024 * 1024
        tf.addfile(info, io.BytesIO(b"\0" * info.size))
    response = upload(client, caller, buffer.getvalue(), "bomb.tar.gz")
    assert response.status_code == 422
    assert "more than" in response.json()["error"]["message"]
    assert stored_nothing(db, settings)


def test_oversize_upload_is_413(client, caller, db, settings):
    response = upload(client, caller, b"\0" * (settings.max_upload_bytes + 1))
    assert response.status_code == 413
    assert stored_nothing(db, settings)


def test_unknown_model_for_the_label_check_is_422(client, caller):
    import uuid

    response = upload(client, caller, zip_of(good_files()), model_id=str(uuid.uuid4()))
    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["field"] == "model_id"


# ---- bounded uploads: no archive may cost the server more than its limits --------------


@pytest.mark.parametrize(
    ("make", "filename"),
    [
        (lambda: bombs.tar_bomb("bz2"), "bomb.tar.bz2"),
        (lambda: bombs.tar_bomb("xz"), "bomb.tar.xz"),
        (lambda: bombs.tar_bomb("gz"), "bomb.tar.gz"),
        (lambda: bombs.zip_bomb(zipfile.ZIP_BZIP2), "bomb.zip"),
        (lambda: bombs.zip_bomb(zipfile.ZIP_LZMA), "bomb.zip"),
        (lambda: bombs.zip_bomb(zipfile.ZIP_DEFLATED), "bomb.zip"),
    ],
    ids=["tar-bz2", "tar-xz", "tar-gz", "zip-bzip2", "zip-lzma", "zip-deflate"],
)
def test_decompression_bombs_cost_the_api_bounded_memory(
    client, caller, db, settings, make, filename
):
    data = make()
    with bombs.peak_memory() as peak:
        response = upload(client, caller, data, filename)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["fields"][0]["field"] == "file"
    assert peak[0] < bombs.PEAK_BOUND, f"the API took {peak[0] / bombs.MiB:.0f} MiB to refuse it"
    assert stored_nothing(db, settings)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_over_the_pixel_limit_is_refused_from_its_header(client, caller, db, settings):
    files = good_files()
    files["img/1.png"] = bombs.png_header_bomb(13000, 13000)  # ~20 KB; 484 MiB as RGB
    with bombs.peak_memory() as peak:
        response = upload(client, caller, zip_of(files))
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert "img/1.png" in message and "13000 x 13000" in message, message
    assert str(settings.max_image_pixels) in message, message
    assert peak[0] < bombs.PEAK_BOUND, f"{peak[0] / bombs.MiB:.0f} MiB: it was decoded"
    assert stored_nothing(db, settings)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_pixel_limit_applies_to_registration_by_uri(client, caller, data_root, settings):
    root = data_root / "big-image"
    write_dataset(root, per_class=2)
    (root / "circle" / "0.png").write_bytes(bombs.png_header_bomb(13000, 13000))
    response = client.post(
        "/v1/datasets",
        json={"name": "big", "manifest_uri": str(root / "manifest.jsonl")},
        headers=caller.headers,
    )
    assert response.status_code == 422, response.text
    assert "13000 x 13000 pixels" in response.json()["error"]["message"]


def test_pillows_bomb_warning_raised_as_an_error_is_a_422(
    client, caller, db, settings, monkeypatch
):
    # Above our own limit's reach (an operator raised it), Pillow warns at 89 Mpx; where
    # warnings are errors that warning is an exception, which was a 500.
    from PIL import Image

    monkeypatch.setattr(settings, "max_image_pixels", 10**9)
    files = good_files()
    files["img/1.png"] = bombs.png_header_bomb(13000, 13000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        response = upload(client, caller, zip_of(files))
    assert response.status_code == 422, response.text
    assert "img/1.png: image has too many pixels" in response.json()["error"]["message"]
    assert stored_nothing(db, settings)


@pytest.mark.parametrize("packer", ["zip", "tar"])
def test_files_that_are_not_listed_images_are_refused_by_name(client, caller, db, settings, packer):
    files = {
        **good_files(),
        "hubconf.py": b"import os\nos.system('id')\n",
        "run.sh": b"#!/bin/sh\nid\n",
        "img/notes.txt": b"notes",
    }
    data = zip_of(files) if packer == "zip" else tar_of(files)
    response = upload(client, caller, data, f"data.{'zip' if packer == 'zip' else 'tar.gz'}")
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert "3 files are neither the manifest nor an image it lists" in message, message
    assert all(name in message for name in ("hubconf.py", "run.sh", "img/notes.txt")), message
    assert stored_nothing(db, settings)


def test_a_listed_file_must_be_named_as_an_image(client, caller, db, settings):
    files = good_files()
    # A valid GIF is also valid Python ("GIF89a=..."): the name must say image, not code.
    rows = [{"id": "s0", "path": "hubconf.py", "label": "circle"}]
    files = {"manifest.jsonl": manifest(rows), "hubconf.py": files["img/0.png"]}
    response = upload(client, caller, zip_of(files))
    assert response.status_code == 422, response.text
    assert "hubconf.py is not an image file name" in response.json()["error"]["message"]
    assert stored_nothing(db, settings)


def test_an_image_folder_tree_with_other_files_is_refused(client, caller, db, settings):
    files = {f"{label}/0.png": png_bytes() for label in CLASSES}
    files["circle/hubconf.py"] = b"print('x')"
    response = upload(client, caller, zip_of(files))
    assert response.status_code == 422, response.text
    assert (
        "1 file is neither the manifest nor an image it lists: circle/hubconf.py"
        in (response.json()["error"]["message"])
    )
    assert stored_nothing(db, settings)


def test_operating_system_metadata_is_dropped_and_only_listed_images_stored(
    client, caller, settings
):
    files = {
        **good_files(),
        "__MACOSX/._manifest.jsonl": b"\0\5\26\7 AppleDouble",
        "__MACOSX/img/._0.png": b"\0\5\26\7 AppleDouble",
        ".DS_Store": b"\0\0\0\1Bud1",
        "img/._1.png": b"\0\5\26\7 AppleDouble",
        "img/Thumbs.db": b"thumbs",
    }
    response = upload(client, caller, zip_of(files, prefix="mydata/"))
    assert response.status_code == 201, response.text
    dataset = Path(settings.artifact_root, "datasets", str(caller.tenant_id), response.json()["id"])
    stored = sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*"))
    assert stored == ["mydata", *(f"mydata/{n}" for n in ["img", *sorted(good_files())])]


def test_concurrent_uploads_of_a_tenant_are_capped_with_429(
    client, caller, make_caller, db, settings
):
    from app.services.upload_slots import upload_slot

    limit = settings.max_concurrent_uploads
    # Other uploads in progress, seen as they are: transactions holding the tenant's slots.
    with contextlib.ExitStack() as others:
        for _ in range(limit):
            session = others.enter_context(db.unit_of_work())
            assert others.enter_context(upload_slot(session, caller.tenant_id, limit))
        refused = upload(client, caller, zip_of(good_files()))
        other_tenant = upload(client, make_caller("globex"), zip_of(good_files()))
    assert refused.status_code == 429, refused.text
    assert refused.headers["Retry-After"] == str(settings.upload_retry_after_seconds)
    error = refused.json()["error"]
    assert error["code"] == "too_many_requests"
    assert f"already has {limit} uploads being checked" in error["message"]
    assert "max_concurrent_uploads" in error["message"]
    assert other_tenant.status_code == 201, other_tenant.text  # the cap is per tenant
    with db.unit_of_work() as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == 1
    # The slots are free again once those transactions ended, and a refusal held none.
    assert upload(client, caller, zip_of(good_files())).status_code == 201


def test_an_oversize_manifest_is_refused_before_it_is_parsed(
    client, caller, db, settings, monkeypatch
):
    monkeypatch.setattr(settings, "max_manifest_bytes", 1000)
    files = good_files()
    files["manifest.jsonl"] += b"\n" * 1000
    response = upload(client, caller, zip_of(files))
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert "manifest.jsonl is " in message and "max_manifest_bytes" in message, message
    assert stored_nothing(db, settings)
