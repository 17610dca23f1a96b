"""The offline fixtures: data sets, tiny CLIP and tiny classifier, and their cache.

The expensive fixtures are built once into the shared cache (``$NEGMERGE_FIXTURES_DIR`` or
``~/.cache/negmerge/fixtures``) and reused by later runs; cache behaviour is tested on tmp dirs.
"""

import json
import threading
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import negmerge.fixtures as fixtures
from negmerge.fixtures import datasets, tiny_classifier, tiny_clip


@pytest.fixture(scope="session")
def built():
    """(datasets, tiny CLIP, classifier) from the shared cache, built there if missing."""
    return fixtures.ensure_all()


@pytest.fixture(scope="session")
def data(built):
    return built[0]


def test_datasets_are_well_formed(data):
    for domain in datasets.DOMAINS:
        root = data.roots[domain].resolve()
        classes = datasets.read_classes(root)
        records = datasets.read_manifest(root)
        assert len(classes) == 10 == len(set(classes))
        assert len({r.id for r in records}) == len(records) >= 1000
        for record in records:
            path = (root / record.path).resolve()
            assert path.is_relative_to(root), record
            assert record.label in classes, record
            assert record.split in datasets.SPLITS, record
            with Image.open(path) as image:
                assert image.size == (32, 32)
                assert image.convert("RGB").mode == "RGB"
        for split in datasets.SPLITS:
            assert {r.label for r in records if r.split == split} == set(classes), split


def test_digits_and_shapes_look_different(data):
    def mean_saturation(domain):
        images = datasets.ManifestDataset(data.roots[domain], "test").images
        return np.mean([np.asarray(image.convert("HSV"))[..., 1].mean() for image in images])

    assert mean_saturation("digits") == 0  # grey
    assert mean_saturation("shapes") > 60  # colourful


def test_datasets_are_deterministic():
    first, _ = datasets.make_shapes(seed=3, per_class=2)
    again, labels = datasets.make_shapes(seed=3, per_class=2)
    other, _ = datasets.make_shapes(seed=4, per_class=2)
    assert [im.tobytes() for im in first] == [im.tobytes() for im in again]
    assert [im.tobytes() for im in first] != [im.tobytes() for im in other]
    assert datasets.split_assignment(labels * 10, 1) == datasets.split_assignment(labels * 10, 1)


def test_tiny_clip_loads_strictly_and_classifies_both_domains_zero_shot(built):
    clip = built[1]
    open_clip.add_model_config(clip.config_path)
    model, _, preprocess = open_clip.create_model_and_transforms(clip.model_name)
    model.load_state_dict(load_file(clip.weights_path), strict=True)
    model.eval()
    tokenizer = open_clip.get_tokenizer(clip.model_name)

    for domain in datasets.DOMAINS:
        test = datasets.ManifestDataset(clip.dataset_roots[domain], "test", preprocess)
        with torch.no_grad():
            head = []
            for name in test.classes:
                prompts = [template.format(name) for template in clip.templates[domain]]
                text = model.encode_text(tokenizer(prompts))
                mean = (text / text.norm(dim=-1, keepdim=True)).mean(dim=0)
                head.append(mean / mean.norm())
            head = torch.stack(head)
            images = model.encode_image(torch.stack([image for image, _ in test]))
            images = images / images.norm(dim=-1, keepdim=True)
            logits = model.logit_scale.exp() * images @ head.T
        accuracy = (logits.argmax(dim=1) == torch.tensor(test.targets)).float().mean().item()
        print(f"tiny CLIP zero-shot accuracy on {domain}: {accuracy:.1%}")
        assert accuracy >= 0.4, f"{domain}: {accuracy:.1%}"
        assert accuracy == pytest.approx(clip.accuracies[domain], abs=0.01)


def test_tiny_clip_loads_as_open_clip_local_dir(built):
    clip = built[1]
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{clip.root}")
    expected = load_file(clip.weights_path)
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_classifier_loads_strictly_and_is_accurate(built):
    classifier = built[2]
    info = json.loads(classifier.info_path.read_text())
    model = timm.create_model(info["model_name"], pretrained=False, num_classes=10)
    model.load_state_dict(load_file(classifier.weights_path), strict=True)
    model.eval()
    test = datasets.ManifestDataset(
        classifier.dataset_root, "test", tiny_classifier.eval_transform(info["mean"], info["std"])
    )
    with torch.no_grad():
        predictions = model(torch.stack([image for image, _ in test])).argmax(dim=1)
    accuracy = (predictions == torch.tensor(test.targets)).float().mean().item()
    print(f"tiny classifier accuracy on {classifier.domain}: {accuracy:.1%}")
    assert accuracy > 0.8
    assert accuracy == pytest.approx(classifier.accuracies["test"], abs=0.01)


def test_second_ensure_reuses_the_cache(built, monkeypatch):
    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cached fixture")

    monkeypatch.setattr(datasets, "build_datasets", no_rebuild)
    monkeypatch.setattr(tiny_clip, "build_tiny_clip", no_rebuild)
    monkeypatch.setattr(tiny_classifier, "build_tiny_classifier", no_rebuild)
    mtimes = [f.weights_path.stat().st_mtime_ns for f in built[1:]]
    again = fixtures.ensure_all()
    assert again == built
    assert [f.weights_path.stat().st_mtime_ns for f in again[1:]] == mtimes


def _fake_build(calls: list, delay: float = 0.0):
    """A fast stand-in for ``datasets.build_datasets`` that counts its calls."""

    def build(out_dir, seed=0):
        calls.append(out_dir)
        time.sleep(delay)
        for domain in datasets.DOMAINS:
            images = [Image.new("RGB", (32, 32)) for _ in datasets.CLASSES[domain]]
            labels = list(datasets.CLASSES[domain])
            datasets.write_dataset(Path(out_dir) / domain, domain, images, labels, seed)

    return build


def test_cache_builds_once_under_concurrency_and_rebuilds_on_force_or_new_version(
    tmp_path, monkeypatch
):
    calls = []
    monkeypatch.setattr(datasets, "build_datasets", _fake_build(calls, delay=0.3))
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(fixtures.ensure_datasets(tmp_path)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results[0] == results[1] == results[2]
    root = results[0].root

    assert fixtures.ensure_datasets(tmp_path).root == root
    assert len(calls) == 1
    assert fixtures.ensure_datasets(tmp_path, force=True).root == root
    assert len(calls) == 2
    monkeypatch.setattr(datasets, "VERSION", "test-next")
    assert fixtures.ensure_datasets(tmp_path).root != root
    assert len(calls) == 3
    # Only finished fixtures (and lock files) are left behind.
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert len(visible) == 2 and all(name.startswith("datasets-v") for name in visible)


def test_failed_build_leaves_no_fixture(tmp_path, monkeypatch):
    def crash(out_dir, seed=0):
        (Path(out_dir) / "half-written").write_text("x")
        raise RuntimeError("crash")

    monkeypatch.setattr(datasets, "build_datasets", crash)
    with pytest.raises(RuntimeError, match="crash"):
        fixtures.ensure_datasets(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_default_cache_dir_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(fixtures.CACHE_DIR_ENV, str(tmp_path))
    assert fixtures.default_cache_dir() == tmp_path
    monkeypatch.delenv(fixtures.CACHE_DIR_ENV)
    assert fixtures.default_cache_dir() == Path.home() / ".cache" / "negmerge" / "fixtures"


def test_classifier_training_is_deterministic_and_honours_exclusions(data, tmp_path):
    root = data.roots["digits"]
    forget = datasets.read_manifest(root, "train")[0].id
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        tiny_classifier.build_tiny_classifier(
            tmp_path / name, root, seed=1, train_size=64, epochs=1, exclude_ids=[forget]
        )
    a, b = (load_file(tmp_path / name / tiny_classifier.WEIGHTS_FILE) for name in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    train_ids = json.loads((tmp_path / "a" / tiny_classifier.TRAIN_IDS_FILE).read_text())
    assert forget not in train_ids and len(train_ids) <= 64


def test_classifier_can_memorise_its_training_set(data, tmp_path):
    info = tiny_classifier.build_tiny_classifier(
        tmp_path, data.roots["shapes"], train_size=300, epochs=40, augment=False
    )
    print(f"memorising classifier accuracy: {info['accuracy']}")
    assert info["accuracy"]["train"] >= 0.99
    assert info["accuracy"]["test"] < info["accuracy"]["train"] - 0.2


def test_cli_prints_a_summary(built, capsys):
    from negmerge.fixtures.__main__ import main

    main(["--cache-dir", str(built[0].root.parent)])
    out = capsys.readouterr().out
    assert "tiny CLIP" in out and "classifier" in out and "shapes" in out
