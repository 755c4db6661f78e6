"""The feature cache inside DeepGazeModule: training with and without it is bit-identical (CPU, float32), and a
changed image, resize policy or backbone weight makes it recompute."""

import csv

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import StepLosses, two_component_module
from deepgaze_lit.data.datamodule import SaliencyDataModule

IMAGES = 6
VAL_IMAGES = 2
SHAPE = (128, 160)


def write_dataset(folder, seed: int = 0):
    """IMAGES random PNGs of SHAPE and a CSV with 5 fixations each; returns (image folder, CSV path)."""
    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True)
    rows = []
    for index in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (*SHAPE, 3), dtype=np.uint8)).save(images / f"img{index}.png")
        for _ in range(5):
            rows.append({"image": f"img{index}.png", "x": rng.uniform(0, SHAPE[1]), "y": rng.uniform(0, SHAPE[0])})
    csv_path = folder / "fixations.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "x", "y"])
        writer.writeheader()
        writer.writerows(rows)
    return images, csv_path


def datamodule(images, csv_path, **options) -> SaliencyDataModule:
    settings = dict(source="csv", path=str(images), csv_path=str(csv_path), val_images=VAL_IMAGES, batch_size=2,
                    centerbias="uniform", history="dummy", initial_fixation=False, image_cache_mb=0)
    settings.update(options)
    return SaliencyDataModule(**settings)


def trainer(max_epochs: int = 1, callbacks=()) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, deterministic=True, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=list(callbacks))


@pytest.mark.timeout(300)
def test_training_with_and_without_the_cache_is_bit_identical(tmp_path):
    images, csv_path = write_dataset(tmp_path)
    runs = {}
    for cache_mb in (0, 64):
        L.seed_everything(0)
        network = two_component_module(feature_cache_mb=cache_mb)
        losses = StepLosses()
        trainer(max_epochs=3, callbacks=[losses]).fit(network, datamodule=datamodule(images, csv_path))
        runs[cache_mb] = (losses.losses, network.model.state_dict(), network)
    (plain_losses, plain_weights, _), (cached_losses, cached_weights, cached) = runs[0], runs[64]
    train_images = IMAGES - VAL_IMAGES
    assert len(plain_losses) == 3 * train_images // 2
    assert cached_losses == plain_losses
    for key, value in plain_weights.items():
        assert torch.equal(cached_weights[key], value), key
    stats = cached.feature_cache.stats
    assert stats.computed == train_images + VAL_IMAGES
    assert stats.memory_hits == 2 * train_images + 2 * VAL_IMAGES


@pytest.mark.timeout(300)
def test_a_changed_image_resize_policy_or_backbone_is_recomputed(tmp_path):
    images, csv_path = write_dataset(tmp_path)
    network = two_component_module(feature_cache_mb=64)
    stats = network.feature_cache.stats
    data = datamodule(images, csv_path)
    first = trainer().validate(network, datamodule=data, verbose=False)
    assert stats.computed == VAL_IMAGES
    again = trainer().validate(network, datamodule=datamodule(images, csv_path), verbose=False)
    assert stats.computed == VAL_IMAGES and stats.memory_hits == VAL_IMAGES
    assert again == first

    changed = data.split_dataset("validate").image_paths[0]
    Image.fromarray(np.zeros((*SHAPE, 3), dtype=np.uint8)).save(changed)
    after_edit = trainer().validate(network, datamodule=datamodule(images, csv_path), verbose=False)
    assert stats.computed == 2 * VAL_IMAGES
    assert after_edit != first

    trainer().validate(network, datamodule=datamodule(images, csv_path, resize="max_side", max_side=128),
                       verbose=False)
    assert stats.computed == 3 * VAL_IMAGES

    with torch.no_grad():
        network.model.features.features[1].features.conv0.weight.mul_(0.5)
    trainer().validate(network, datamodule=datamodule(images, csv_path, resize="max_side", max_side=128),
                       verbose=False)
    assert stats.computed == 4 * VAL_IMAGES
