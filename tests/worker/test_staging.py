"""A step's scratch folder with an object store: bounded, emptied however the step ends, and
its outputs named by their objects (worker/staging.py; the jobs: test_object_store.py)."""

from __future__ import annotations

import pytest

from app.artifacts import ArtifactMissing, ArtifactStore
from negmerge.errors import NegMergeError
from worker.staging import StagedStep, StepFiles, scratch_folder


def test_a_step_whose_inputs_exceed_the_scratch_bound_fails_naming_the_setting(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    source = tmp_path / "merged.safetensors"
    source.write_bytes(b"x" * 1000)
    store.put_file(source, "jobs/j/merged.safetensors")
    with scratch_folder(str(tmp_path / "scratch"), "j", "search") as folder:
        staged = StagedStep(store, folder, "j", StepFiles(["merged.safetensors"], ["search.json"]))
        with pytest.raises(
            NegMergeError, match=r"1000 bytes .* NEGMERGE_SCRATCH_MAX_BYTES \(999\)"
        ):
            staged.download(max_bytes=999)
        staged.download(max_bytes=1000)
        assert (folder / "merged.safetensors").read_bytes() == b"x" * 1000
    assert not (tmp_path / "scratch" / "j").exists()


def test_the_scratch_folder_is_emptied_when_the_step_fails(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    with (
        pytest.raises(ArtifactMissing),
        scratch_folder(str(tmp_path / "s"), "j", "merge") as folder,
    ):
        (folder / "partial.tmp").write_bytes(b"half")
        StagedStep(store, folder, "j", StepFiles(["variants/000-a.safetensors"], [])).download(10)
    assert not list((tmp_path / "s").rglob("*"))


def test_outputs_are_uploaded_and_recorded_by_their_objects_uri(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    with scratch_folder(str(tmp_path / "s"), "j", "finetune:0") as folder:
        staged = StagedStep(store, folder, "j", StepFiles([], ["variants/000-a.json"]))
        (folder / "variants").mkdir()
        (folder / "variants" / "000-a.json").write_text("{}")
        staged.upload()
        record = staged.to_store_uris({"path": str(folder / "variants" / "000-a.json"), "n": 1})
    assert record == {"path": store.uri("jobs/j/variants/000-a.json"), "n": 1}
    assert store.exists("jobs/j/variants/000-a.json")
