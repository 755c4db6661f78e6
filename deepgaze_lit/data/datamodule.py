"""SaliencyDataModule: everything between files on disk and the batches DeepGaze III consumes."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Literal, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from ..resilience import ignore_stop_signals
from .centerbias import (MIT1003_BANDWIDTH, MIT1003_EPS, BaselineCenterbias, CenterbiasModel,
                         CrossvalidatedBaselineCenterbias, TemplateCenterbias, UniformCenterbias)
from .dataset import FixationDataset
from .errors import DataError
from .image_cache import SharedImageCache
from .readers import SourceSettings, read_source, reader_for
from .resize import target_shapes
from .sampler import ResumableDataLoader, ShapeBucketBatchSampler
from .split_info import SplitInfo
from .splits import crossval_split, holdout_split
from .torch_dataset import CenterbiasTensors, FixationSamples, ImageSamples, collate_samples

STAGE_SPLITS = {"fit": "train", "validate": "val", "test": "test"}
"""Lightning stage -> split whose images `split_dataset(stage)` returns."""


def test_split_is_validation(hparams) -> bool:
    """Whether the settings make the test split the validation split (holdout with test_images 0, given)."""
    return hparams.split == "given" or (hparams.split == "holdout" and hparams.test_images == 0)


class SaliencyDataModule(pl.LightningDataModule):
    """Eye-tracking data for DeepGaze III: reading, splitting, resizing, centre bias, history and batching.

    Batches are the dict of ARCHITECTURE.md (see `torch_dataset.py`); `image_index` indexes the stage's
    `split_dataset(stage)`. One summary line (images, fixations, dropped, per split) is printed at setup.

    Args:
        source: where the data comes from, a format registered in `data/readers.py`: "synthetic": built-in
            images with a known fixation density; "pysaliency": pysaliency 0.2.22 cache (stimuli.hdf5 +
            fixations.hdf5) in `path`; "mit1003": the official MIT1003 download (ALLSTIMULI/, ALLFIXATIONMAPS/) in
            `path`; "csv": images in `path`, fixations in `csv_path`.
        path: dataset folder (pysaliency, mit1003) or image folder (csv).
        csv_path: CSV of fixations (columns image,x,y and optional subject,t,scanpath), for source "csv".
        synthetic_images: number of synthetic images.
        synthetic_seed: seed of the synthetic images and fixations.
        synthetic_sizes: (H, W) sizes in pixels of the synthetic images, used in turn.
        synthetic_subjects: scanpaths (subjects) per synthetic image.
        initial_fixation: whether scanpaths start with a forced central fixation that is history only, never a
            target; null detects it (at least 80% of scanpath starts near the image centre).
        split: "holdout" (seeded shuffle), "crossval" (pysaliency's folds) or "given" (all of `path` trains, all of
            `val_path` validates, e.g. SALICON's train and val caches; the test split is the validation split,
            which `deepgaze test` refuses).
        val_path: split "given": the validation data, a second dataset of the same source format.
        val_images: holdout: number of validation images.
        test_images: holdout: number of separate test images; 0 makes the test split the validation split, which
            `deepgaze test` refuses (those images chose the checkpoint): use `validate` or set test_images > 0.
        fold: crossval: fold whose chunk is the test split (chunk fold-1 is validation).
        folds: crossval: number of folds.
        split_seed: holdout: seed of the shuffle (crossval always uses pysaliency's seed 42).
        resize: "native" sizes; "two_sizes" (768x1024 landscape, 1024x768 otherwise, as DeepGaze training);
            "max_side" (scale down so the longer side is at most `max_side` pixels). Fixations follow the image.
            Unset (None) is "native" (`hparams.resize` then says "native", `resize_configured` is False), except
            that `deepgaze predict` then uses the size the checkpoint was trained at.
        max_side: longest image side in pixels for resize "max_side".
        centerbias: "kde" (pysaliency BaselineModel of the TRAINING fixations), "kde_crossval" (pysaliency
            CrossvalidatedBaselineModel, the DeepGaze III protocol's: each image's own bias is the KDE of ALL the
            dataset's fixations except that image's; computed per image at setup and held in memory, about 3 GB
            for MIT1003 at two_sizes; prediction on other images uses the KDE of all fixations), "uniform", or
            "template" (a 2-D log-density .npy file zoomed to each image size).
        centerbias_template: .npy file for centerbias "template" (e.g. the released centerbias_mit1003.npy).
        centerbias_bandwidth: kde bandwidth as a fraction of the image height/width (MIT1003 fit by default).
        centerbias_eps: kde weight of the uniform component (MIT1003 fit by default).
        history: "none" (spatial model: all history slots NaN), "dummy" (slot 0 = image centre, W/2, H/2),
            "real" (the 4 preceding fixations of the scanpath, most recent first; needs targets "fixation" and
            data with scanpaths).
        targets: "image" (one sample per image with all its fixations, images weighted equally) or "fixation"
            (one sample per fixation with its own history, weight 1/fixations of its image).
        batch_size: training samples per batch (all of one image size).
        eval_batch_size: validation/test samples per batch; null uses batch_size.
        num_workers: loader worker processes (persistent between epochs when > 0).
        pin_memory: pin batches in page-locked memory when CUDA is available.
        seed: seed of the training order; epoch e's order depends only on (seed, e).
        image_cache_mb: budget in MB of the shared-memory cache of decoded, resized images, shared by the loader
            workers of one process (0: decode each time). MIT1003 at two_sizes needs about 2.4 GB.
        min_image_side: smallest image side (pixels, after resizing) the network accepts (`batch.MIN_IMAGE_SIDE`
            at downsample 2); every image is checked at setup, naming the file of the first one that is smaller.
            The command line sets it from model.downsample (`model.backbone.minimum_image_side`); None: no check.
    """

    def __init__(
        self,
        source: str = "synthetic",
        path: Optional[str] = None,
        csv_path: Optional[str] = None,
        synthetic_images: int = 100,
        synthetic_seed: int = 0,
        synthetic_sizes: Sequence[tuple[int, int]] = ((256, 320), (320, 256)),
        synthetic_subjects: int = 8,
        initial_fixation: Optional[bool] = None,
        split: Literal["holdout", "crossval", "given"] = "holdout",
        val_path: Optional[str] = None,
        val_images: int = 101,
        test_images: int = 0,
        fold: int = 0,
        folds: int = 10,
        split_seed: int = 42,
        resize: Optional[Literal["native", "two_sizes", "max_side"]] = None,
        max_side: Optional[int] = None,
        centerbias: Literal["kde", "kde_crossval", "uniform", "template"] = "kde",
        centerbias_template: Optional[str] = None,
        centerbias_bandwidth: float = MIT1003_BANDWIDTH,
        centerbias_eps: float = MIT1003_EPS,
        history: Literal["none", "dummy", "real"] = "dummy",
        targets: Literal["image", "fixation"] = "image",
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        seed: int = 42,
        image_cache_mb: int = 3072,
        min_image_side: Optional[int] = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.resize_configured = resize is not None
        """Whether `resize` was given (an unset resize is "native" here, the trained size in `deepgaze predict`)."""
        self.hparams.resize = resize or "native"
        self._check_settings()
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.summary: Optional[str] = None
        self._splits: dict[str, FixationDataset] = {}
        self._dataset: Optional[FixationDataset] = None
        self._image_cache: Optional[SharedImageCache] = None
        self._centerbias: Optional[CenterbiasTensors] = None
        self._samples: dict[str, ImageSamples | FixationSamples] = {}
        self._digests: dict[int, str] = {}

    def _check_settings(self) -> None:
        """DataError for settings that cannot work, before any data is read."""
        hp = self.hparams
        if hp.history == "real" and hp.targets != "fixation":
            raise DataError("data.history 'real' needs targets 'fixation' (data.targets): every fixation has its own "
                            "history")
        reader_for(hp.source, self._source_settings())
        if hp.split == "given":
            if hp.val_path is None:
                raise DataError("data.split 'given' needs data.val_path (the validation data, same format as path)")
            if hp.centerbias == "kde_crossval":
                raise DataError("data.centerbias 'kde_crossval' leaves each image of ONE dataset out; with split "
                                "'given' use 'kde' (fitted on the training data)")
        if hp.resize == "max_side" and (hp.max_side is None or hp.max_side < 1):
            raise DataError("data.resize 'max_side' needs a positive data.max_side (pixels)")
        if hp.centerbias == "template" and hp.centerbias_template is None:
            raise DataError("data.centerbias 'template' needs data.centerbias_template (a .npy log density)")
        for name in ("batch_size", "eval_batch_size", "synthetic_images", "synthetic_subjects"):
            if hp[name] is not None and hp[name] < 1:
                raise DataError(f"data.{name} must be at least 1, got {hp[name]}")
        if hp.num_workers < 0 or hp.image_cache_mb < 0:
            raise DataError("data.num_workers and data.image_cache_mb must not be negative")
        if hp.split == "crossval" and (hp.folds < 3 or not 0 <= hp.fold < hp.folds):
            raise DataError(f"data.split 'crossval' needs data.folds >= 3 and 0 <= data.fold < data.folds, got "
                            f"folds {hp.folds} and fold {hp.fold}")
        if hp.split == "holdout" and (hp.val_images < 1 or hp.test_images < 0):
            raise DataError(f"data.split 'holdout' needs data.val_images >= 1 and data.test_images >= 0, got "
                            f"{hp.val_images} and {hp.test_images}")
        if hp.centerbias == "template" and not Path(hp.centerbias_template).is_file():
            raise DataError(f"{hp.centerbias_template}: centre-bias template not found (data.centerbias_template); "
                            "expected a .npy file with a 2-D log density")

    def _check_image_sizes(self, dataset: FixationDataset) -> None:
        """DataError naming the first image whose (resized) size is below `min_image_side` on either side."""
        minimum = self.hparams.min_image_side
        if minimum is None:
            return
        small = np.flatnonzero(dataset.shapes.min(axis=1) < minimum)
        if len(small):
            height, width = (int(side) for side in dataset.shapes[small[0]])
            raise DataError(
                f"{dataset.describe_image(int(small[0]))}: {height}x{width} pixels (after data.resize "
                f"'{self.hparams.resize}') is below the network's minimum of {minimum} pixels per side "
                f"({len(small)} image(s) this small); remove or upscale such images, or choose another data.resize")

    def setup(self, stage: Optional[str] = None) -> None:
        """Read, resize and split the data and build the centre bias once (idempotent)."""
        if stage == "test" and test_split_is_validation(self.hparams):
            raise DataError(f"deepgaze test would score the validation images that chose the checkpoint (split "
                            f"{self.hparams.split}, test split = validation split): set data.test_images > 0 for a "
                            "separate test split, or use `deepgaze validate`")
        self._setup_splits()

    def _source_settings(self) -> SourceSettings:
        return SourceSettings.pick(self.hparams)

    def _read_source(self) -> FixationDataset:
        return read_source(self.hparams.source, self._source_settings())

    def _split_indices(self, dataset: FixationDataset) -> dict[str, np.ndarray]:
        hp = self.hparams
        try:
            if hp.split == "crossval":
                train, val, test = crossval_split(dataset.n_images, hp.folds, hp.fold)
            else:
                train, val, test = holdout_split(dataset.n_images, hp.val_images, hp.test_images, hp.split_seed)
        except DataError as err:
            raise DataError(f"{dataset.source}: {err}") from err
        return {"train": train, "val": val, "test": test}

    def _given_validation(self, first_image_id: int) -> FixationDataset:
        """Split "given": the resized `val_path` dataset, its image ids numbered on from `first_image_id` (the
        training data's image count), so that the caches keyed by image id keep both datasets apart."""
        hp = self.hparams
        native = read_source(hp.source, dataclasses.replace(self._source_settings(), path=hp.val_path))
        dataset = native.resized(target_shapes(native.shapes, hp.resize, hp.max_side))
        return dataclasses.replace(dataset, image_ids=dataset.image_ids + first_image_id)

    def _setup_splits(self) -> None:
        if self._splits:
            return
        hp = self.hparams
        native = self._read_source()
        dataset = native.resized(target_shapes(native.shapes, hp.resize, hp.max_side))
        self._check_image_sizes(dataset)
        if hp.split == "given":
            validation = self._given_validation(dataset.n_images)
            self._check_image_sizes(validation)
            parts = {"train": (dataset, np.arange(dataset.n_images)),
                     "val": (validation, np.arange(validation.n_images)),
                     "test": (validation, np.arange(validation.n_images))}
            all_shapes = np.concatenate([dataset.shapes, validation.shapes])
        else:
            parts = {name: (dataset, indices) for name, indices in self._split_indices(dataset).items()}
            all_shapes = dataset.shapes
        splits, empty = {}, {}
        for name, (source, indices) in parts.items():
            with_targets = indices[source.targets_per_image()[indices] > 0]
            empty[name] = len(indices) - len(with_targets)
            splits[name] = source.subset(with_targets)
            if splits[name].n_images == 0:
                raise DataError(f"{source.source}: the {name} split has no image with fixations; "
                                "expected a larger dataset or other split settings")
        self._splits = splits
        self._dataset = dataset
        self._image_cache = SharedImageCache(all_shapes, hp.image_cache_mb << 20)
        centerbias = self._centerbias_tensors()
        for split in splits.values():  # before loader workers start, so that they inherit them
            if centerbias.per_image:
                for image_id, shape in zip(split.image_ids, split.shapes):
                    centerbias.for_image(image_id, shape)
            else:
                for shape in np.unique(split.shapes, axis=0):
                    centerbias(tuple(shape))
        self.summary = self._summary(native, dataset, empty)
        rank_zero_info(self.summary)

    def _summary(self, native: FixationDataset, dataset: FixationDataset, empty: dict[str, int]) -> str:
        hp = self.hparams
        initial = int(dataset.is_initial.sum())
        parts = [f"data {hp.source} ({dataset.source}): {dataset.n_images} images, {dataset.n_fixations} fixations "
                 f"({initial} forced initial, history only), dropped {native.dropped_fixations} fixations outside "
                 "their image"]
        for name, split in self._splits.items():
            parts.append(f"{name} {split.n_images} images / {int(split.is_target.sum())} target fixations"
                         f" (dropped {empty[name]} images without fixations)")
        shapes = len(np.unique(dataset.shapes, axis=0))
        parts.append(f"split {hp.split}; resize {hp.resize}: {shapes} image size(s); centre bias {hp.centerbias}; "
                     f"history {hp.history}; targets {hp.targets}; "
                     f"image cache {self._image_cache.n_cached}/{dataset.n_images} images")
        return " | ".join(parts)

    def centerbias_model(self) -> CenterbiasModel:
        hp = self.hparams
        if hp.centerbias == "uniform":
            return UniformCenterbias()
        if hp.centerbias == "template":
            return TemplateCenterbias(hp.centerbias_template)
        self._setup_splits()
        if hp.centerbias == "kde_crossval":
            return CrossvalidatedBaselineCenterbias(self._dataset, hp.centerbias_bandwidth, hp.centerbias_eps)
        return BaselineCenterbias(self._splits["train"], hp.centerbias_bandwidth, hp.centerbias_eps)

    def _centerbias_tensors(self) -> CenterbiasTensors:
        if self._centerbias is None:
            self._centerbias = CenterbiasTensors(self.centerbias_model())
        return self._centerbias

    def centerbias_for(self, shape: tuple[int, int]) -> torch.Tensor:
        """(H,W) float32 centre-bias log density (nats) for an image of `shape` (H, W), cached per shape."""
        return self._centerbias_tensors()(shape)

    def split_dataset(self, stage: str) -> FixationDataset:
        """The images of the split used in `stage` ("fit": train, "validate": validation, "test": test), after
        resizing, without images that have no target fixation; batches' `image_index` indexes it."""
        if stage not in STAGE_SPLITS:
            raise ValueError(f"stage must be one of {', '.join(STAGE_SPLITS)}, got {stage!r}")
        self._setup_splits()
        return self._splits[STAGE_SPLITS[stage]]

    def split_info(self, stage: str) -> SplitInfo:
        """What the model needs to know about the split of `stage` (see `split_dataset`): sizes, target fixations,
        true densities where known and its data fingerprint (computed when first asked for)."""
        dataset = self.split_dataset(stage)
        return SplitInfo.of(STAGE_SPLITS[stage], dataset, functools.partial(self.data_fingerprint, stage),
                            self.provenance(stage))

    def provenance(self, stage: str) -> dict:
        """The data settings behind the split of `stage`, as reports record them: `source` and its reader's
        settings (`path`, `csv_path` as absolute paths, synthetic seed and sizes, ...), `split` (name, kind, fold and folds or
        holdout seed and sizes, number of images), `resize` (policy, max_side, the (H, W) input sizes of the
        split's images), `centerbias` (kind and its parameters), `history` and `targets`."""
        hp = self.hparams
        dataset = self.split_dataset(stage)
        split = {"name": STAGE_SPLITS[stage], "kind": hp.split, "images": dataset.n_images}
        if hp.split == "crossval":
            split.update(fold=hp.fold, folds=hp.folds)
        else:
            split.update(seed=hp.split_seed, val_images=hp.val_images, test_images=hp.test_images)
        centerbias = {"kind": hp.centerbias}
        if hp.centerbias == "kde":
            centerbias.update(fitted_on="train", bandwidth=hp.centerbias_bandwidth, eps=hp.centerbias_eps)
        elif hp.centerbias == "template":
            centerbias["template"] = str(Path(hp.centerbias_template).resolve())
        settings = dataclasses.asdict(self._source_settings())
        settings["synthetic_sizes"] = [list(size) for size in settings["synthetic_sizes"]]
        for key in ("path", "csv_path"):
            if settings[key] is not None:
                settings[key] = str(Path(settings[key]).resolve())
        return {
            "source": hp.source,
            **settings,
            "split": split,
            "resize": {"policy": hp.resize, "max_side": hp.max_side,
                       "sizes": np.unique(dataset.shapes, axis=0).tolist()},
            "centerbias": centerbias,
            "history": hp.history,
            "targets": hp.targets,
        }

    def data_fingerprint(self, stage: str = "fit") -> str:
        """Hex digest of the stage's images (content hashes, in order) and their network input sizes.

        Two runs with equal fingerprints feed identical images at identical sizes, so per-image results such as
        backbone features can be cached under it.
        """
        dataset = self.split_dataset(stage)
        digest = hashlib.sha256()
        policy = {"resize": self.hparams.resize, "max_side": self.hparams.max_side,
                  "shapes": dataset.shapes.tolist()}
        digest.update(json.dumps(policy, sort_keys=True).encode())
        for index, image_id in enumerate(dataset.image_ids):
            if int(image_id) not in self._digests:
                self._digests[int(image_id)] = dataset.image_digest(index)
            digest.update(self._digests[int(image_id)].encode())
        return digest.hexdigest()[:32]

    def _samples_for(self, stage: str) -> ImageSamples | FixationSamples:
        if stage not in self._samples:
            samples_cls = ImageSamples if self.hparams.targets == "image" else FixationSamples
            self._samples[stage] = samples_cls(self.split_dataset(stage), self._centerbias_tensors(),
                                               self.hparams.history, self._image_cache)
        return self._samples[stage]

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _loader_options(self) -> dict:
        """Workers ignore SIGUSR1 and SIGTERM: SLURM sends them to every process of the job, the training process
        handles them."""
        workers = self.hparams.num_workers
        return {"num_workers": workers, "persistent_workers": workers > 0,
                "worker_init_fn": ignore_stop_signals if workers > 0 else None,
                "pin_memory": self.hparams.pin_memory and torch.cuda.is_available()}

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled, shape-bucketed training batches; every rank gets the same number of batches."""
        samples = self._samples_for("fit")
        rank, world_size = self._rank_and_world_size()
        sampler = ShapeBucketBatchSampler(samples.sample_shapes, self.hparams.batch_size, shuffle=True,
                                          seed=self.hparams.seed, rank=rank, world_size=world_size)
        if self.trainer is not None:
            sampler.set_epoch(self.trainer.fit_loop.epoch_progress.current.processed)
        return ResumableDataLoader(samples, sampler, collate_fn=collate_samples, **self._loader_options())

    def _evaluation_loader(self, stage: str) -> DataLoader:
        samples = self._samples_for(stage)
        rank, world_size = self._rank_and_world_size()
        batch_size = self.hparams.eval_batch_size or self.hparams.batch_size
        sampler = ShapeBucketBatchSampler(samples.sample_shapes, batch_size, shuffle=False, rank=rank,
                                          world_size=world_size)
        return DataLoader(samples, batch_sampler=sampler, collate_fn=collate_samples, **self._loader_options())

    def val_dataloader(self) -> DataLoader:
        """Validation batches; every sample is seen exactly once across all ranks."""
        return self._evaluation_loader("validate")

    def test_dataloader(self) -> DataLoader:
        """Test batches; every sample is seen exactly once across all ranks."""
        return self._evaluation_loader("test")
