from __future__ import annotations

import json

import pytest
from PIL import Image

from negmerge.data import Manifest, safe_relative_path
from negmerge.errors import DataError


def write_images(root, rows):
    for row in rows:
        path = root / row["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10 * len(row["id"]), 0, 0)).save(path)


@pytest.fixture
def dataset(tmp_path):
    rows = [
        {"id": "a", "path": "img/a.png", "label": "cat"},
        {"id": "b", "path": "img/b.png", "label": "dog", "split": "val"},
        {"id": "c", "path": "img/c.png", "label": "cat", "split": "test"},
        {"id": "d", "path": "img/d.png", "label": "dog"},
    ]
    write_images(tmp_path, rows)
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path


def test_jsonl_manifest_folder_and_file_load_the_same(dataset):
    by_folder = Manifest.load(dataset)
    by_file = Manifest.load(dataset / "manifest.jsonl")
    assert by_folder.samples == by_file.samples
    assert [s.split for s in by_file.samples] == ["train", "val", "test", "train"]
    assert by_file.labels == ["cat", "dog"]
    assert by_file.open(by_file.samples[0]).size == (8, 8)


def test_csv_manifest(dataset):
    (dataset / "m.csv").write_text("id,path,label\na,img/a.png,cat\nd,img/d.png,dog\n")
    manifest = Manifest.load(dataset / "m.csv")
    assert [s.id for s in manifest.samples] == ["a", "d"]


def test_image_folder_tree(tmp_path):
    write_images(tmp_path, [{"id": "x", "path": "cat/1.png"}, {"id": "yy", "path": "dog/2.png"}])
    manifest = Manifest.load(tmp_path)
    assert [(s.id, s.label) for s in manifest.samples] == [
        ("cat/1.png", "cat"),
        ("dog/2.png", "dog"),
    ]


def test_select_by_ids_classes_and_splits(dataset):
    manifest = Manifest.load(dataset)
    assert [s.id for s in manifest.select(ids=["d", "a"])] == ["d", "a"]
    assert [s.id for s in manifest.select(classes=["dog"])] == ["b", "d"]
    assert [s.id for s in manifest.select(classes=["dog"], splits=["train"])] == ["d"]
    assert manifest.sha256(manifest.select(ids=["a"])) != manifest.sha256()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.select(ids=["a", "zz"]), "ids: 1 not in .* e.g. 'zz'"),
        (lambda m: m.select(classes=["horse"]), "classes: 'horse' is not a label"),
        (
            lambda m: m.select(classes=["dgo", "cat", "horse"]),
            "classes: 'dgo' \\(did you mean 'dog'\\?\\), 'horse' are not labels in .*; "
            "its labels are 'cat', 'dog'$",
        ),
        (lambda m: m.check_labels(["cat"]), "sample 'b' has label 'dog', which is not one of"),
    ],
)
def test_bad_selections_name_the_problem(dataset, call, message):
    with pytest.raises(DataError, match=message):
        call(Manifest.load(dataset))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "a", "path": "../outside.png", "label": "cat"}', "leaves the data set's root"),
        ('{"id": "a", "path": "/etc/passwd", "label": "cat"}', "leaves the data set's root"),
        ('{"id": "a", "label": "cat"}', "field 'path' is missing"),
        ('{"id": "a", "path": "x.png", "label": "cat", "split": "dev"}', "split 'dev' is not one"),
        ("not json", "not valid JSON"),
    ],
)
def test_malformed_rows_name_the_line(tmp_path, line, message):
    (tmp_path / "manifest.jsonl").write_text(line + "\n")
    with pytest.raises(DataError, match=f"manifest.jsonl:1: .*{message}"):
        Manifest.load(tmp_path)


def test_duplicate_ids_are_refused(tmp_path):
    row = json.dumps({"id": "a", "path": "a.png", "label": "cat"})
    (tmp_path / "manifest.jsonl").write_text(f"{row}\n{row}\n")
    with pytest.raises(DataError, match="duplicate id 'a'"):
        Manifest.load(tmp_path)


def test_unreadable_images_and_escaping_links_are_named(dataset, tmp_path_factory):
    (dataset / "img" / "a.png").write_bytes(b"not an image")
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    Image.new("RGB", (2, 2)).save(outside)
    (dataset / "img" / "d.png").unlink()
    (dataset / "img" / "d.png").symlink_to(outside)
    manifest = Manifest.load(dataset)
    with pytest.raises(DataError, match="sample 'a': .*a.png: not a readable image"):
        manifest.open(manifest.samples[0])
    with pytest.raises(DataError, match="sample 'd': img/d.png leaves the data set's root"):
        manifest.open(manifest.samples[3])


def test_safe_relative_path_normalises():
    assert safe_relative_path("a/./b/../c.png", "here") == "a/c.png"
    with pytest.raises(DataError):
        safe_relative_path("a/../../c.png", "here")
