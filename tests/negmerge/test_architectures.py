"""Architectures are names, never code: import paths are refused by validation and by the
builders themselves (a spec read from a database skips validation), init_args are checked
against the architecture's declared parameters, and operators install architectures as
entry points."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from negmerge.errors import NegMergeError
from negmerge.fixtures import ensure_tiny_classifier, ensure_tiny_clip
from negmerge.fixtures.jobs import forget_class_job, forget_domain_job
from negmerge.models import ModelSpec, architectures, check_weights, load_model
from negmerge.models.architectures import Architecture, check_classifier, register_architecture
from negmerge.models.classifier import build_module

CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def classifier() -> ModelSpec:
    return ModelSpec(**forget_class_job(ensure_tiny_classifier())["model"])


@pytest.fixture
def payload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module a tenant could have uploaded: importing it writes a marker file."""
    marker = tmp_path / "imported"
    (tmp_path / "tenant_payload.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\ndef Net(**kwargs):\n    return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return marker


def attacks(tmp_path: Path) -> list[tuple[str, dict]]:
    """The two reported code-execution specs, and an uploaded module by import path."""
    victim = tmp_path / "victim.txt"
    return [
        ("logging:basicConfig", {"force": True, "filename": str(victim), "filemode": "w"}),
        ("torch.hub:load", {"repo_or_dir": str(tmp_path), "model": "net", "source": "local"}),
        ("tenant_payload:Net", {}),
    ]


def test_import_paths_are_refused_by_validation(tmp_path, payload) -> None:
    for architecture, init_args in attacks(tmp_path):
        with pytest.raises(ValidationError, match=r"architecture: .* looks like an import path"):
            ModelSpec(
                family="classifier",
                architecture=architecture,
                classes=CLASSES,
                init_args=init_args,
            )
    assert not payload.exists() and "tenant_payload" not in sys.modules


def test_a_spec_that_skipped_validation_is_never_imported(tmp_path, payload, classifier) -> None:
    """Defence in depth: a worker builds from a stored spec; the builder itself refuses."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for architecture, init_args in attacks(tmp_path):
        spec = ModelSpec.model_construct(
            **{**classifier.model_dump(), "architecture": architecture, "init_args": init_args}
        )
        for build in (build_module, load_model, check_weights):
            with pytest.raises(NegMergeError, match=r"^architecture: .* import path"):
                build(spec)
    assert victim.read_text() == "precious"
    assert not payload.exists() and "tenant_payload" not in sys.modules


@pytest.mark.parametrize(
    ("init_args", "field", "problem"),
    [
        ({"pretrained": True}, "init_args.pretrained", "is not a parameter of test_resnet"),
        ({"pretrained_cfg": {"url": "http://x"}}, "init_args.pretrained_cfg", "not a parameter"),
        ({"pretrained_cfg_overlay": {}}, "init_args.pretrained_cfg_overlay", "not a parameter"),
        ({"checkpoint_path": "/etc/passwd"}, "init_args.checkpoint_path", "not a parameter"),
        ({"num_classes": 5}, "init_args.num_classes", "not a parameter"),
        ({"drop_rate": 5.0}, "init_args.drop_rate", "less than 1"),
        ({"in_chans": 10**9}, "init_args.in_chans", "less than or equal to 16"),
        ({"global_pool": "../x"}, "init_args.global_pool", "Input should be"),
        ({"Odd-Key": 1}, "init_args", "'Odd-Key' is not a parameter"),
    ],
)
def test_timm_init_args_are_checked_against_declared_parameters(
    classifier, init_args, field, problem
) -> None:
    with pytest.raises(ValidationError) as info:
        classifier.model_validate({**classifier.model_dump(), "init_args": init_args})
    message = str(info.value)
    assert f"{field}: " in message and problem in message
    assert "takes drop_path_rate, drop_rate, global_pool, in_chans" in message  # what is allowed


def test_declared_timm_arguments_reach_the_model(classifier) -> None:
    spec = classifier.model_validate({**classifier.model_dump(), "init_args": {"drop_rate": 0.25}})
    assert build_module(spec).drop_rate == 0.25


def test_unknown_names_and_open_clip_init_args_are_refused() -> None:
    # A description is checked without importing timm (the API validates them); an unknown
    # name is refused where the module is built: registration's weights check, a worker.
    unknown = ModelSpec(family="classifier", architecture="no-such", classes=CLASSES)
    with pytest.raises(NegMergeError, match=r"architecture: timm knows no model 'no-such'"):
        check_classifier(unknown.architecture, unknown.init_args)
    with pytest.raises(NegMergeError, match=r"architecture: timm knows no model 'no-such'"):
        build_module(unknown)
    with pytest.raises(ValidationError, match="init_args: open_clip models take none"):
        ModelSpec(family="open_clip", architecture="RN50", classes=CLASSES, init_args={"x": 1})


def test_open_clip_pretrained_is_a_tag_never_a_path(tmp_path) -> None:
    clip = ModelSpec(**forget_domain_job(ensure_tiny_clip())["model"])
    checkpoint = tmp_path / "file.pt"
    checkpoint.write_bytes(b"not read")
    spec = clip.model_copy(update={"weights": None, "pretrained": str(checkpoint)})
    with pytest.raises(NegMergeError, match=r"^pretrained: .* is not one of open_clip's tags"):
        load_model(spec)


def write_distribution(folder: Path) -> None:
    """An installed package (as pip would leave it) declaring one architecture."""
    (folder / "operator_models.py").write_text(
        "from pydantic import BaseModel, ConfigDict, Field\n"
        "from torch import nn\n"
        "from negmerge.models.architectures import Architecture\n"
        "class MlpParameters(BaseModel):\n"
        "    width: int = Field(16, ge=1, le=256)\n"
        "def build(num_classes, width=16):\n"
        "    return nn.Sequential(\n"
        "        nn.Flatten(), nn.LazyLinear(width), nn.Linear(width, num_classes)\n"
        "    )\n"
        "mlp = Architecture(build=build, parameters=MlpParameters)\n"
        "not_one = build\n"
    )
    dist = folder / "operator_models-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: operator-models\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[negmerge.architectures]\n"
        "tiny-mlp = operator_models:mlp\n"
        "broken = operator_models:not_one\n"
    )


@pytest.fixture
def installed(tmp_path, monkeypatch) -> None:
    write_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    architectures._entry_points.cache_clear()
    yield
    architectures._entry_points.cache_clear()


def test_an_operator_installs_architectures_as_entry_points(installed) -> None:
    assert {"tiny-mlp", "broken"} <= set(architectures.installed_names())
    spec = ModelSpec(family="classifier", architecture="tiny-mlp", classes=CLASSES)
    module = build_module(spec.model_copy(update={"init_args": {"width": 8}}))
    assert module[1].out_features == 8 and module[2].out_features == 3
    # An installed architecture is loaded, and its parameters checked, where modules are
    # built (the API validates descriptions without importing model code).
    with pytest.raises(NegMergeError, match=r"init_args.depth: 'depth' is not a parameter"):
        check_classifier("tiny-mlp", {"depth": 2})
    with pytest.raises(NegMergeError, match=r"init_args.width: .*less than or equal to 256"):
        build_module(spec.model_copy(update={"init_args": {"width": 10**6}}))
    with pytest.raises(NegMergeError, match=r"architecture: the installed 'broken' .* is not an"):
        check_classifier("broken", {})
    with pytest.raises(NegMergeError, match=r"installed architecture \(broken, tiny-mlp\)"):
        check_classifier("tiny-mpl", {})


def test_a_program_registers_its_own_architecture(monkeypatch) -> None:
    from torch import nn

    monkeypatch.setattr(architectures, "_registered", {})
    linear = Architecture(build=lambda num_classes: nn.LazyLinear(num_classes))
    register_architecture("linear", linear)
    spec = ModelSpec(family="classifier", architecture="linear", classes=CLASSES)
    assert build_module(spec).out_features == 3
    with pytest.raises(ValidationError, match=r"init_args.bias: .*\(linear takes none\)"):
        ModelSpec.model_validate({**spec.model_dump(), "init_args": {"bias": 1}})
