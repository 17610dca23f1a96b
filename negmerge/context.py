"""What every stage of a job needs, loaded once per process: the model on its device, the
manifests and the data splits, and the model's evaluations as it is now.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from negmerge.data import Manifest, Sample
from negmerge.errors import NegMergeError
from negmerge.evaluate import EvalSet, evaluate_accuracy, predict
from negmerge.job_spec import JobSpec, group_samples, make_splits
from negmerge.loading import DecodedImages, LoaderOptions, decoded_key
from negmerge.metrics import accuracy, mia_efficacy, true_label_probabilities
from negmerge.models import load_model
from negmerge.models.base import UnlearningModel
from negmerge.task_vector import subtract_task_vector
from negmerge.workdir import Workdir

# The splits the report gives metrics for (the search reads forget_val and retain_val).
REPORT_SPLITS = ("forget", "forget_test", "retain", "test")


@dataclass
class JobContext:
    """What every stage needs, loaded once per process: the model and the data splits."""

    spec: JobSpec
    workdir: Workdir
    model: UnlearningModel
    device: str
    forget_manifest: Manifest
    retain_manifest: Manifest
    splits: dict[str, list[Sample]]
    pretrained: dict[str, torch.Tensor]  # the tau keys' original values
    loader: LoaderOptions = field(default_factory=LoaderOptions)
    _eval_sets: dict[str, EvalSet] = field(default_factory=dict)
    _decoded: DecodedImages | None = None

    @classmethod
    def load(
        cls, spec: JobSpec, workdir: str | os.PathLike, loader: LoaderOptions | None = None
    ) -> JobContext:
        device = resolve_device(spec.device)
        model = load_model(spec.model, device, spec.finetuning)
        forget_manifest = Manifest.load(spec.forget.dataset, spec.forget.root)
        retain_ref = spec.retain or spec.forget
        retain_manifest = (
            forget_manifest
            if spec.retain is None
            else Manifest.load(retain_ref.dataset, retain_ref.root)
        )
        forget_manifest.check_labels(model.classes)
        retain_manifest.check_labels(model.classes)
        splits = make_splits(spec, forget_manifest, retain_manifest)
        state = model.module.state_dict()
        pretrained = {key: state[key].detach().clone() for key in model.tau_keys}
        return cls(
            spec,
            Workdir(Path(workdir)),
            model,
            device,
            forget_manifest,
            retain_manifest,
            splits,
            pretrained,
            loader or LoaderOptions(),
        )

    def decoded_forget_set(self) -> DecodedImages:
        """The forget set decoded and resized once per job: kept in this process and in the
        work directory, where the variants fine-tuned by other processes find it."""
        if self._decoded is None:
            from negmerge.finetune import prepare_images

            samples = self.splits["forget"]
            bound = self.loader.decoded_cache_bytes
            key = decoded_key(samples, self.model.train_pipeline(None).prepare, bound)
            path = self.workdir.decoded
            self._decoded = DecodedImages.load(path, key) if path.exists() else None
            if self._decoded is None:
                self._decoded = prepare_images(
                    self.model, self.forget_manifest, samples, self.loader, self.device
                )
                if self._decoded.arrays:
                    self._decoded.save(path, key)
        return self._decoded

    def manifest_for(self, split: str) -> Manifest:
        return self.forget_manifest if split.startswith("forget") else self.retain_manifest

    def eval_set(self, split: str) -> EvalSet:
        if split not in self._eval_sets:
            self._eval_sets[split] = EvalSet.build(
                split,
                self.model,
                self.manifest_for(split),
                self.splits[split],
                self.spec.max_eval_samples,
                self.spec.seed,
            )
        return self._eval_sets[split]

    def accuracy(self, split: str) -> float | None:
        data = self.eval_set(split)
        if not len(data):
            return None
        return evaluate_accuracy(self.model, data, self.device, self.spec.eval_batch_size)

    def accuracy_and_confidence(self, split: str) -> tuple[float, float]:
        """Accuracy and mean true-label probability (both percent), from one forward pass."""
        data = self.eval_set(split)
        logits = predict(self.model, data, self.device, self.spec.eval_batch_size)
        confidence = float(true_label_probabilities(logits, data.labels).mean()) * 100
        return accuracy(logits, data.labels), confidence

    def group_metrics(self) -> dict[str, dict[str, float | int | None]]:
        """Each group's accuracy and mean true-label confidence (percent) over its samples in
        the forget set (every split: all of them are the subject's data), as the model is now."""
        found: dict[str, dict[str, float | int | None]] = {}
        forgotten = {s.id for s in forget_set(self)}
        for name, group in self.spec.groups.items():
            chosen = group_samples(self.forget_manifest, name, group)  # checked in make_splits
            samples = [s for s in chosen if s.id in forgotten]
            key = f"group:{name}"
            if key not in self._eval_sets:
                self._eval_sets[key] = EvalSet.build(
                    key,
                    self.model,
                    self.forget_manifest,
                    samples,
                    self.spec.max_eval_samples,
                    self.spec.seed,
                )
            data = self._eval_sets[key]
            if not len(data):
                found[name] = {"count": 0, "acc": None, "true_label_confidence": None}
                continue
            logits = predict(self.model, data, self.device, self.spec.eval_batch_size)
            confidence = float(true_label_probabilities(logits, data.labels).mean()) * 100
            found[name] = {
                "count": len(data),
                "acc": accuracy(logits, data.labels),
                "true_label_confidence": confidence,
            }
        return found

    def set_scale(self, vector: Mapping[str, torch.Tensor], lam: float) -> None:
        """Put theta_pre - lam * tau into the model, in place."""
        subtract_task_vector(self.pretrained, vector, lam, out=self.model.module.state_dict())

    def metrics(self) -> dict[str, float | None]:
        """Accuracy on every report split, and MIA-efficacy, of the model as it is now."""
        # One forward pass a split: accuracy and the MIA feature come from the same logits.
        data = {s: self.eval_set(s) for s in REPORT_SPLITS}
        logits = {
            s: predict(self.model, d, self.device, self.spec.eval_batch_size)
            for s, d in data.items()
            if len(d)
        }
        result: dict[str, float | None] = {
            f"{s}_acc": accuracy(logits[s], data[s].labels) if s in logits else None
            for s in REPORT_SPLITS
        }
        result["mia"] = None
        if all(s in logits for s in ("retain", "forget", "test")):
            retain, forget, test = (
                true_label_probabilities(logits[s], data[s].labels)
                for s in ("retain", "forget", "test")
            )
            result["mia"] = mia_efficacy(retain, forget, test)
        return result


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise NegMergeError("device: cuda was asked for, but no CUDA device is available")
    return device


def forget_set(ctx: JobContext) -> list[Sample]:
    return ctx.forget_manifest.select(ids=ctx.spec.forget.ids, classes=ctx.spec.forget.classes)
