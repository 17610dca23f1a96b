"""Registration checks weights in a child process and leaves the API process as it was.

The API process never imports torch (the job schema, negmerge.job_spec, is torch-free) and
freezes what it imported at start-up out of the garbage collector; model code imported or
built later (torch, timm, torchvision, open_clip) would stay on the heap that every full
collection walks, in the middle of requests. These tests run the app in a fresh
interpreter, because this test process has imported timm itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.settings import Settings
from app.weights_check import check_weights_in_child
from negmerge.errors import CheckpointError, NegMergeError
from negmerge.fixtures import ensure_tiny_clip
from negmerge.models import ModelSpec
from tests.app.conftest import CLASSES, model_body

REPO = Path(__file__).resolve().parents[2]
MODEL_CODE = ("torch", "timm", "torchvision", "open_clip")

# The app as uvicorn runs it (lifespan: gc.freeze at start-up), in-process over TestClient;
# reads {"settings", "key", "bodies"} on stdin, prints what registration left behind.
API_PROCESS = """
import gc, json, sys
from fastapi.testclient import TestClient
from app.main import create_app
from app.settings import Settings

request = json.loads(sys.stdin.read())
headers = {"Authorization": "Bearer " + request["key"]}
app = create_app(Settings(**request["settings"]))

def heap():
    gc.collect()
    return len(gc.get_objects())

with TestClient(app) as client:
    client.get("/v1/models", headers=headers)  # the request path's own first-use caches
    before = {"modules": sorted(m for m in MODEL_CODE if m in sys.modules), "heap": heap()}
    statuses = [client.post("/v1/models", json=b, headers=headers).status_code
                for b in request["bodies"]]
    after = {"modules": sorted(m for m in MODEL_CODE if m in sys.modules), "heap": heap()}
print(json.dumps({"before": before, "after": after, "statuses": statuses}))
""".replace("MODEL_CODE", repr(MODEL_CODE))


def test_registering_models_leaves_the_api_process_without_model_code(
    settings: Settings, caller, weights_file: Path, data_root: Path
) -> None:
    clip = ensure_tiny_clip()
    config = data_root / "configs" / "tiny-clip-guard.json"
    config.parent.mkdir(exist_ok=True)
    config.write_text(clip.config_path.read_text())
    clip_weights = data_root / "weights" / "tiny-clip-guard.safetensors"
    shutil.copy(clip.weights_path, clip_weights)
    bodies = [
        model_body(weights_file, name="net"),
        {**model_body(weights_file, name="misfit"), "architecture": "resnet18"},  # a 422
        {
            **model_body(clip_weights, name="clip"),
            "family": "open_clip",
            "architecture": "tiny-clip",
            "templates": ["a photo of a {}."],
            "model_config_uri": str(config),
        },
    ]
    request = {"settings": settings.model_dump(mode="json"), "key": caller.key, "bodies": bodies}
    done = subprocess.run(
        [sys.executable, "-c", API_PROCESS],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["statuses"] == [201, 422, 201]
    assert report["before"]["modules"] == []
    assert report["after"]["modules"] == []  # the model code was imported in the child only
    # Building the models in the API process added ~197,000 objects; with the check in a
    # child, registration leaves ~1,200 (multiprocessing's own modules among them).
    assert report["after"]["heap"] - report["before"]["heap"] < 20_000, report


def spec(weights: Path, **changes: object) -> ModelSpec:
    fields = {"family": "classifier", "architecture": "test_resnet", "classes": CLASSES}
    return ModelSpec(**{**fields, "weights": str(weights), "image_size": 32, **changes})


def test_the_child_raises_what_the_check_raises(weights_file: Path, data_root: Path) -> None:
    check_weights_in_child(spec(weights_file), timeout_seconds=60, memory_mib=512)
    with pytest.raises(NegMergeError, match="does not fit test_resnet: key 'fc.weight'") as info:
        check_weights_in_child(
            spec(weights_file, classes=["a", "b"]), timeout_seconds=60, memory_mib=512
        )
    assert not isinstance(info.value, CheckpointError)
    junk = data_root / "weights" / "junk-guard.safetensors"
    junk.write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="not a safetensors or PyTorch file"):
        check_weights_in_child(spec(junk), timeout_seconds=60, memory_mib=512)


def test_a_check_past_its_time_limit_is_refused_naming_the_architecture(
    weights_file: Path,
) -> None:
    huge = spec(weights_file, architecture="vit_huge_patch14_224")  # ~0.4 s to build on meta
    with pytest.raises(NegMergeError, match="^architecture: .* took longer than 0.001 s"):
        check_weights_in_child(huge, timeout_seconds=0.001, memory_mib=512)


@pytest.mark.parametrize(("megabytes", "fails"), [(4, False), (64, True)])
def test_the_child_may_grow_by_its_memory_limit_only(megabytes: int, fails: bool) -> None:
    grow = (
        "from app.weights_check import _limit_address_space\n"
        "_limit_address_space(16 * 1024 * 1024)\n"
        f"block = bytearray({megabytes} * 1024 * 1024)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", grow], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert (done.returncode != 0) == fails, done.stderr[-2000:]
    assert ("MemoryError" in done.stderr) == fails
