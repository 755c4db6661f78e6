"""Loader throughput (images/s) on MIT1003-sized JPEGs (1024x768), first epoch versus cached epochs.

Writes `--images` JPEGs of 1024x768 pixels with smooth random content (file sizes like natural photos) and a CSV of
fixations into a temporary folder, then times full passes of `SaliencyDataModule.train_dataloader()` with 0 and
2 loader workers, with the shared image cache and without it (`image_cache_mb=0`).

    .venv/bin/python benchmarks/data.py [--images 64] [--epochs 3] [--batch-size 8] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from deepgaze_lit.data import SaliencyDataModule

HEIGHT, WIDTH = 768, 1024
FIXATIONS_PER_IMAGE = 40


def write_dataset(folder: Path, n_images: int, seed: int = 0) -> Path:
    """JPEG images (quality 90) and a CSV with FIXATIONS_PER_IMAGE random fixations each; returns the CSV path."""
    rng = np.random.default_rng(seed)
    rows = ["image,x,y"]
    for index in range(n_images):
        coarse = rng.uniform(0, 255, size=(HEIGHT // 32, WIDTH // 32, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC), dtype=float)
        image = np.clip(smooth + rng.normal(0, 6, size=smooth.shape), 0, 255).astype(np.uint8)
        name = f"img{index:04d}.jpg"
        Image.fromarray(image).save(folder / name, quality=90)
        for x, y in zip(rng.uniform(0, WIDTH, FIXATIONS_PER_IMAGE), rng.uniform(0, HEIGHT, FIXATIONS_PER_IMAGE)):
            rows.append(f"{name},{x:.2f},{y:.2f}")
    csv_path = folder / "fixations.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


def time_epochs(folder: Path, csv_path: Path, workers: int, cache_mb: int, epochs: int, batch_size: int) -> list[float]:
    """Images per second of each full pass over the training split."""
    data = SaliencyDataModule(source="csv", path=str(folder), csv_path=str(csv_path), val_images=1,
                              batch_size=batch_size, num_workers=workers, image_cache_mb=cache_mb, pin_memory=False)
    data.setup("fit")
    loader = data.train_dataloader()
    rates = []
    for epoch in range(epochs):
        loader.batch_sampler.set_epoch(epoch)
        start = time.perf_counter()
        count = sum(len(batch["image_index"]) for batch in loader)
        rates.append(count / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        start = time.perf_counter()
        csv_path = write_dataset(folder, args.images)
        size_mb = sum(file.stat().st_size for file in folder.glob("*.jpg")) / 2**20
        print(f"{args.images} JPEGs of {HEIGHT}x{WIDTH} ({size_mb:.1f} MB) written in "
              f"{time.perf_counter() - start:.1f} s; batch size {args.batch_size}")
        print(f"{'workers':>7} {'cache':>6} {'epoch 1 img/s':>14} {'later epochs img/s':>19}")
        for workers in args.workers:
            for cache_mb in (2048, 0):
                rates = time_epochs(folder, csv_path, workers, cache_mb, args.epochs, args.batch_size)
                later = np.mean(rates[1:]) if len(rates) > 1 else float("nan")
                print(f"{workers:>7} {'on' if cache_mb else 'off':>6} {rates[0]:>14.1f} {later:>19.1f}")


if __name__ == "__main__":
    main()
