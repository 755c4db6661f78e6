"""Prediction throughput (images/s) and memory on a folder of MIT1003-sized JPEGs, as the folder grows.

For each image count (default 200 and 400) a fresh process writes that many 768x1024 JPEGs (`data.write_dataset`)
into a temporary folder and predicts it with `deepgaze_lit.output.PredictionJob` exactly as `deepgaze predict`
does (the released architecture: 10 scanpath components, random weights; uniform centre bias; MIT1003's two
sizes; the chosen formats), on the CPU unless `--device cuda`. It prints images/s, the peak RSS, and the resident
memory after the first tenth of the images, its maximum over the rest of the run and after the last image: memory
is flat when the peak does not grow with the image count and the resident memory after the first tenth stays where
it was.

    .venv/bin/python benchmarks/predict.py                        # 200 vs 400 images (long on a CPU)
    .venv/bin/python benchmarks/predict.py --counts 20 40 --formats npy hdf5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import peak_rss_mb
from data import HEIGHT, WIDTH, write_dataset

from deepgaze_lit.data.centerbias import UniformCenterbias
from deepgaze_lit.inference import DensityPredictor
from deepgaze_lit.model import DeepGazeIII
from deepgaze_lit.output import OUTPUT_FORMATS, PredictionJob, make_writers


def resident_mb() -> float:
    """Current resident memory (MiB) of this process."""
    with open("/proc/self/statm") as stream:
        pages = int(stream.read().split()[1])
    return pages * 4096 / 2**20


class MemoryProbe:
    """A predictor that records the resident memory (MiB) after every image it predicts."""

    def __init__(self, predictor: DensityPredictor):
        self.predictor = predictor
        self.resident: list[float] = []

    def log_density(self, image: np.ndarray, source: str = "image") -> np.ndarray:
        log_density = self.predictor.log_density(image, source=source)
        self.resident.append(resident_mb())
        return log_density


def measure(count: int, formats: list[str], device: str) -> dict:
    """Write `count` images, predict them into `formats`; throughput and memory of this process."""
    torch.manual_seed(0)
    network = DeepGazeIII(num_components=10, scanpath=True, backbone_weights="none").to(device)
    probe = MemoryProbe(DensityPredictor(network, UniformCenterbias(), resize="two_sizes"))
    with tempfile.TemporaryDirectory() as folder:
        images, output = Path(folder) / "images", Path(folder) / "out"
        images.mkdir()
        write_dataset(images, count)
        start_rss = resident_mb()
        start = time.perf_counter()
        with PredictionJob(images, make_writers(output, formats)) as job:
            summary = job.run(probe)
        seconds = time.perf_counter() - start
    tenth = max(1, count // 10)
    return {"images": summary.written, "images_per_s": summary.written / seconds, "peak_rss_mb": peak_rss_mb(),
            "start_rss_mb": start_rss, "rss_after_tenth_mb": probe.resident[tenth - 1],
            "rss_max_after_tenth_mb": max(probe.resident[tenth - 1:]), "rss_at_end_mb": probe.resident[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[200, 400], help="folder sizes (images)")
    parser.add_argument("--formats", nargs="+", default=["npy", "hdf5", "saliency", "overlay"],
                        choices=OUTPUT_FORMATS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.formats, args.device)))
        return
    print(f"{HEIGHT}x{WIDTH} JPEGs, formats {' '.join(args.formats)}, device {args.device}, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'images':>7} {'images/s':>9} {'peak RSS MiB':>13} {'RSS start':>10} {'RSS 1/10':>9} "
          f"{'RSS max after':>14} {'RSS end':>8}")
    for count in args.counts:
        command = [sys.executable, __file__, "--child", str(count), "--device", args.device,
                   "--formats", *args.formats]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        print(f"{result['images']:>7} {result['images_per_s']:>9.3f} {result['peak_rss_mb']:>13.0f} "
              f"{result['start_rss_mb']:>10.0f} {result['rss_after_tenth_mb']:>9.0f} "
              f"{result['rss_max_after_tenth_mb']:>14.0f} {result['rss_at_end_mb']:>8.0f}",
              flush=True)


if __name__ == "__main__":
    main()
