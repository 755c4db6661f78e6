"""SplitInfo: what the model side learns about a split, handed over by `SaliencyDataModule.split_info(stage)`.

The one contract between the data and the LightningModule besides the batches: the module reads a split only
through it (evaluation accumulators, sAUC pool, gold standard, feature-cache namespace), never through the
DataModule's or the `FixationDataset`'s attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .dataset import FixationDataset


@dataclass(frozen=True, eq=False)
class SplitInfo:
    """One split after resizing, as batches' `image_index` indexes it.

    Attributes:
        name: "train", "val" or "test".
        num_images: number of images.
        shapes: (N,2) int64 image heights and widths in pixels (network input size).
        target_x, target_y: (F,) float64 pixel coordinates of every target fixation (not the forced initial
            ones), in their own image.
        target_image: (F,) int64 image index of each target fixation.
        true_log_densities: per image its true (H,W) float64 log density in nats (synthetic data; a read-only
            sequence), None where unknown.
        image_names: per image where it comes from (its file, or a description; `FixationDataset.describe_image`).
        image_ids: (N,) int64 index of each image in its data source.
        provenance: the data settings that made the split (`SaliencyDataModule.provenance`).
        data_fingerprint: returns the hex digest of the images' contents and sizes
            (`SaliencyDataModule.data_fingerprint`); reads every image on its first call, so call it only when
            needed (the feature cache).
    """

    name: str
    num_images: int
    shapes: np.ndarray
    target_x: np.ndarray
    target_y: np.ndarray
    target_image: np.ndarray
    true_log_densities: Optional[Sequence[np.ndarray]]
    image_names: tuple[str, ...]
    image_ids: np.ndarray
    provenance: dict
    data_fingerprint: Callable[[], str]

    @classmethod
    def of(cls, name: str, dataset: FixationDataset, data_fingerprint: Callable[[], str],
           provenance: Optional[dict] = None) -> SplitInfo:
        """The split info of `dataset` (one split of the DataModule) named `name`."""
        targets = dataset.is_target
        return cls(name=name, num_images=dataset.n_images, shapes=dataset.shapes, target_x=dataset.x[targets],
                   target_y=dataset.y[targets], target_image=dataset.n[targets],
                   true_log_densities=dataset.true_log_densities,
                   image_names=tuple(dataset.describe_image(index) for index in range(dataset.n_images)),
                   image_ids=dataset.image_ids, provenance=dict(provenance or {}),
                   data_fingerprint=data_fingerprint)
