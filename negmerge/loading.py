"""The training data path of a fine-tuning run: parallel, deterministic and decoded once.

Determinism whatever the number of loader workers: every draw a sample's augmentation makes
(Python's `random`, which timm's RandAugment uses, NumPy's global generator, which chooses its
ops, and torch's CPU generator, which the random crop and flip use) comes from generators
seeded by (variant seed, epoch, sample index) just for that sample, and restored afterwards.
So a sample is augmented the same in the main process or in any worker, in any order, and
loading never moves the training's own random stream (dropout). The data order comes from a
generator seeded by (variant seed, epoch).

Decode once: the deterministic part of the training transform (decode, then resize to the
model's input resolution: `TrainPipeline.prepare`) runs once per image and run, and each
epoch augments from the kept result (`DecodedImages`). The cached and the uncached path
run the same functions on the same pixels, so they give the same tau bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from negmerge.data import Manifest, Sample
from negmerge.errors import NegMergeError

Transform = Callable[[Image.Image], object]
MiB = 1024 * 1024
MAX_AUTO_WORKERS = 8


@dataclass(frozen=True)
class TrainPipeline:
    """A training transform split where the randomness starts: `prepare` (deterministic,
    decoded image -> image at the model's input resolution) and `augment` (random, image ->
    tensor)."""

    prepare: Transform
    augment: Transform

    def __call__(self, image: Image.Image) -> object:
        return self.augment(self.prepare(image))


@dataclass(frozen=True)
class LoaderOptions:
    """How a run loads its data; none of it changes tau (see the module's docstring), so it
    is an operator's setting, not a hyperparameter.

    num_workers: loader processes; None chooses min(cores - 1, 8) on CUDA and 0 on CPU,
      where the training step itself uses every core. They are forked by the run itself, in
      the process that runs the step (after Celery's fork), and never touch CUDA.
    decoded_cache_bytes: most bytes of prepared images a run keeps in memory (0: decode
      every image every epoch); images past the bound are decoded each time.
    channels_last: on CUDA, give the model its batches in channels-last memory format
      (faster convolutions under bf16; no effect on a ViT beyond its patch embedding).
    compile: run the forward through torch.compile (off: its first steps compile for a while).
    """

    num_workers: int | None = None
    decoded_cache_bytes: int = 1024 * MiB
    channels_last: bool = True
    compile: bool = False

    def workers_for(self, device: str) -> int:
        if self.num_workers is not None:
            return self.num_workers
        if not device.startswith("cuda"):
            return 0
        return max(0, min(usable_cores() - 1, MAX_AUTO_WORKERS))


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation in one epoch: independent streams per triple."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's data order (its own stream, apart from the samples')."""
    state = np.random.SeedSequence([seed, epoch, 2**32 - 1]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's CPU generators for the block and restore them after
    it. torch's CUDA generators are left alone (`torch.manual_seed` would reseed them too)."""
    saved = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.random.set_rng_state(saved[2])


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """`steps` batches of (epoch, sample index) pairs: each epoch a fresh permutation seeded
    by (seed, epoch), cut into batches of `batch_size` (the last one of an epoch may be
    smaller), as a shuffling DataLoader over `size` samples would give them."""

    def __init__(self, size: int, batch_size: int, seed: int, steps: int) -> None:
        self.size, self.batch_size, self.seed, self.steps = size, batch_size, seed, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        given = 0
        for epoch in range(math.ceil(self.steps / steps_per_epoch(self.size, self.batch_size))):
            order = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            permutation = torch.randperm(self.size, generator=order).tolist()
            for start in range(0, self.size, self.batch_size):
                if given == self.steps:
                    return
                yield [(epoch, i) for i in permutation[start : start + self.batch_size]]
                given += 1


def steps_per_epoch(size: int, batch_size: int) -> int:
    return math.ceil(size / batch_size)


class DecodedImages:
    """Prepared images (uint8 arrays), decoded once, as many as fit in `max_bytes`; a sample
    past the bound is prepared again each time it is asked for."""

    def __init__(self, arrays: dict[int, np.ndarray]) -> None:
        self.arrays = arrays

    @classmethod
    def build(
        cls,
        manifest: Manifest,
        samples: Sequence[Sample],
        prepare: Transform,
        max_bytes: int,
        num_workers: int = 0,
    ) -> DecodedImages:
        """Decode and prepare every sample (on `num_workers` loader processes) until the
        next one would pass `max_bytes`."""
        arrays: dict[int, np.ndarray] = {}
        if max_bytes <= 0 or not samples:
            return cls(arrays)
        source = PreparedImages(manifest, samples, prepare)
        loader = DataLoader(source, batch_size=None, num_workers=num_workers)
        used = 0
        for i, array in enumerate(batches(loader)):
            array = array.numpy().copy()  # off the shared memory (an open file each) it came in
            if used + array.nbytes > max_bytes:
                break  # the rest are decoded as they are needed
            arrays[i] = array
            used += array.nbytes
        return cls(arrays)

    def save(self, path: str | os.PathLike, key: str) -> None:
        """Write the images to a safetensors file (atomically), stamped with `key`."""
        from negmerge.io import save_file

        arrays = {str(i): array for i, array in self.arrays.items()}
        save_file(arrays, path, {"format": DECODED_FORMAT, "key": key})

    @classmethod
    def load(cls, path: str | os.PathLike, key: str) -> DecodedImages | None:
        """The images of a file `save` wrote with the same `key`, else None (no such file,
        or one made for other samples or another resize)."""
        from negmerge.errors import CheckpointError
        from negmerge.io import load_arrays, open_checkpoint

        try:
            with open_checkpoint(path, hashing=False) as stored:
                if stored.metadata.get("format") != DECODED_FORMAT:
                    return None
                if stored.metadata.get("key") != key:
                    return None
            return cls({int(i): array for i, array in load_arrays(path).items()})
        except CheckpointError:
            return None

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())

    def get(self, index: int) -> Image.Image | None:
        array = self.arrays.get(index)
        return None if array is None else Image.fromarray(array)


DECODED_FORMAT = "negmerge.decoded_images"


def decoded_key(samples: Sequence[Sample], prepare: Transform, max_bytes: int) -> str:
    """What a decoded-images file was made from: the samples in order, the resize and the
    bound; a file with another key is not used."""
    resize = getattr(prepare, "__qualname__", None) or repr(prepare)  # no address in it
    described = [[s.id, s.path] for s in samples], resize, max_bytes
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()


class PreparedImages(Dataset):
    """The samples decoded and prepared, as uint8 (height, width, channels) tensors."""

    def __init__(self, manifest: Manifest, samples: Sequence[Sample], prepare: Transform) -> None:
        self.manifest, self.samples, self.prepare = manifest, list(samples), prepare

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.prepare(self.manifest.open(self.samples[i]))
        return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))


class TrainingImages(Dataset):
    """(augmented image tensor, class index) for an (epoch, sample index) pair, the same in
    whichever process and order it is asked for."""

    def __init__(
        self,
        manifest: Manifest,
        samples: Sequence[Sample],
        classes: Sequence[str],
        pipeline: TrainPipeline,
        seed: int,
        decoded: DecodedImages | None = None,
    ) -> None:
        self.manifest = manifest
        self.samples = list(samples)
        self.class_index = {name: i for i, name in enumerate(classes)}
        self.pipeline = pipeline
        self.seed = seed
        self.decoded = decoded or DecodedImages({})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, i = key
        sample = self.samples[i]
        image = self.decoded.get(i)
        if image is None:
            image = self.pipeline.prepare(self.manifest.open(sample))
        with seeded_global_rngs(sample_seed(self.seed, epoch, i)):
            tensor = self.pipeline.augment(image)
        return tensor, self.class_index[sample.label]


def training_loader(
    data: TrainingImages, batch_size: int, steps: int, num_workers: int, pin_memory: bool
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` batches of `data`, loaded on `num_workers` processes (0: in this one)."""
    loader = DataLoader(
        data,
        batch_sampler=EpochBatches(len(data), batch_size, data.seed, steps),
        num_workers=num_workers,
        pin_memory=pin_memory,
        # A few batches ahead per worker keeps the accelerator fed across slow images.
        prefetch_factor=4 if num_workers > 0 else None,
    )
    return batches(loader)


def batches(loader: DataLoader) -> Iterator:
    """The loader's items; an error of ours raised in a loader process is raised again with
    its own message (the DataLoader prefixes the worker's whole traceback to it)."""
    try:
        yield from loader
    except NegMergeError as exc:
        text = str(exc)
        if not text.startswith("Caught "):
            raise
        last = text.rstrip().splitlines()[-1]
        raise type(exc)(last.split(": ", 1)[-1]) from None


def to_device(
    images: torch.Tensor, labels: torch.Tensor, device: str, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch on `device`: from pinned memory without blocking the host on CUDA, in
    channels-last format when asked (CUDA only: on CPU it changes nothing for the better)."""
    if not device.startswith("cuda"):
        return images.to(device), labels.to(device)
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)
