"""End-to-end training benchmark: time per epoch split into data, backbone, readout+loss, optimiser, validation
and the rest, training images/s and peak memory, for the quickstart and for an MIT1003-sized synthetic run.

    .venv/bin/python benchmarks/train.py                          # all runs below, CPU, float32
    .venv/bin/python benchmarks/train.py --runs mit1003 --epochs 2
    .venv/bin/python benchmarks/train.py --device cuda --channels-last [--compile]   # GPU: bf16-mixed by default

Runs (each `deepgaze fit` in its own process, so each peak memory is its own):
- quickstart: `configs/quickstart.yaml` as shipped (feature cache on), for `--quickstart-epochs` epochs.
- mit1003: `configs/baseline.yaml` (10 scanpath components, DeepGaze's recipe) on synthetic images of MIT1003's
  sizes (768x1024 and 1024x768), batch 2, float32 on CPU, without the feature cache; measured on
  `--mit-train-images` / `--mit-val-images` images and extrapolated to MIT1003's 902 training and 101 validation
  images (per-image costs times image counts; `other` is per epoch).
- mit1003+cache: the same with the feature cache on: the first epoch computes the backbone, later ones reuse it.

Peak RSS is the process's (resource.getrusage), including the data; on a GPU the table adds
torch.cuda.max_memory_allocated. Backbone weights are random ("none"): timing does not depend on them.

`--malloc release` runs the children with GLIBC_TUNABLES set so that glibc maps every block of 4 MiB or more
separately, on transparent huge pages, and unmaps it when freed: freed feature maps then leave the process instead
of staying resident in fragmented heap arenas (lower peak RSS, slightly slower steps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import PHASES, REFERENCE, cpu_stall_microseconds, format_table

ROOT = Path(__file__).resolve().parent.parent
MIT1003_TRAIN_IMAGES = 902
MIT1003_VAL_IMAGES = 101
MIT1003_SIZES = "[[768, 1024], [1024, 768]]"
RUNS = ("quickstart", "mit1003", "mit1003+cache")
RELEASE_LARGE_BLOCKS = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4194304"
"""GLIBC_TUNABLES of `--malloc release` (glibc >= 2.35)."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the mit1003 runs")
    parser.add_argument("--quickstart-epochs", type=int, default=3)
    parser.add_argument("--mit-train-images", type=int, default=8, help="measured training images")
    parser.add_argument("--mit-val-images", type=int, default=4, help="measured validation images")
    parser.add_argument("--batch-size", type=int, default=2, help="batch size of the mit1003 runs")
    parser.add_argument("--num-workers", type=int, default=0, help="loader workers of the mit1003 runs")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", default=None, help="Lightning precision (default 32 on CPU, bf16-mixed on GPU)")
    parser.add_argument("--channels-last", action="store_true", help="model.channels_last for every run")
    parser.add_argument("--compile", action="store_true", help="model.compile_head for every run")
    parser.add_argument("--malloc", choices=["default", "release"], default="default",
                        help="glibc malloc settings of the runs (see the module docstring)")
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    parser.add_argument("--one-run", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32")
    return args


def device_overrides(args) -> list[str]:
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    options = ["--trainer.accelerator", accelerator, "--trainer.devices", "1", "--trainer.strategy", "auto",
               "--trainer.precision", args.precision]
    if args.channels_last:
        options += ["--model.channels_last", "true"]
    if args.compile:
        options += ["--model.compile_head", "true"]
    return options


def fit_arguments(args, run: str, workdir: Path, output: Path) -> list[str]:
    """`deepgaze fit` arguments of one run, with the StageTimer callback writing to `output`."""
    timer = json.dumps({"class_path": "common.StageTimer", "init_args": {"output": str(output)}})
    common = ["--experiments_root", str(workdir), "--trainer.callbacks+=" + timer,
              "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
              *device_overrides(args)]
    if run == "quickstart":
        return ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), *common,
                "--trainer.max_epochs", str(args.quickstart_epochs)]
    images = args.mit_train_images + args.mit_val_images
    fit = ["fit", "--config", str(ROOT / "configs" / "baseline.yaml"), *common,
           "--experiment", run.replace("+", "_"), "--trainer.max_epochs", str(args.epochs),
           "--model.backbone_weights", "none",
           "--data.source", "synthetic", "--data.path", "null", "--data.synthetic_images", str(images),
           "--data.synthetic_sizes", MIT1003_SIZES, "--data.val_images", str(args.mit_val_images),
           "--data.batch_size", str(args.batch_size), "--data.num_workers", str(args.num_workers)]
    if run == "mit1003+cache":
        fit += ["--model.feature_cache_mb", "4096"]
    return fit


def run_one(args) -> None:
    """Inside the child process: one `deepgaze fit`."""
    from deepgaze_lit.cli import main

    with tempfile.TemporaryDirectory() as workdir:
        main(fit_arguments(args, args.one_run, Path(workdir), args.output))


def launch(args, run: str, argv: list[str]) -> dict:
    """Run `run` in a child process; its StageTimer result."""
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "result.json"
        command = [sys.executable, __file__, *argv, "--one-run", run, "--output", str(output)]
        stall_before, begin = cpu_stall_microseconds(), time.perf_counter()
        env = dict(os.environ)
        if args.malloc == "release":
            env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), RELEASE_LARGE_BLOCKS]))
        completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
        stall_after, seconds = cpu_stall_microseconds(), time.perf_counter() - begin
        if completed.returncode != 0 or not output.exists():
            sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-8000:])
            raise SystemExit(f"run {run} failed with status {completed.returncode}")
        result = json.loads(output.read_text())
        result["cpu_pressure"] = None if stall_before is None else (stall_after - stall_before) / 1e6 / seconds
        return result


def train_seconds(epoch: dict) -> float:
    return sum(epoch[phase] for phase in PHASES if phase not in ("validation", "other"))


def extrapolated(epoch: dict, val_images: int) -> float:
    """Seconds of this epoch scaled to MIT1003's image counts."""
    per_train_image = train_seconds(epoch) / epoch["images"]
    per_val_image = epoch["validation"] / val_images
    return per_train_image * MIT1003_TRAIN_IMAGES + per_val_image * MIT1003_VAL_IMAGES + epoch["other"]


def report(args, results: dict[str, dict]) -> str:
    header = ["run", "epoch", "train img", *PHASES, "total s", "train img/s", "val img/s", "peak RSS MB"]
    gpu = any(result["cuda_peak_mb"] is not None for result in results.values())
    if gpu:
        header.append("CUDA max alloc MB")
    rows, notes = [], []
    for run, result in results.items():
        for epoch in result["epochs"]:
            row = [run, epoch["epoch"], epoch["images"], *(f"{epoch[phase]:.2f}" for phase in PHASES),
                   f"{epoch['total']:.2f}", f"{epoch['images'] / train_seconds(epoch):.3f}",
                   f"{epoch['val_images'] / epoch['validation']:.3f}" if epoch.get("val_images") else "-",
                   f"{result['peak_rss_mb']:.0f}"]
            if gpu:
                row.append(f"{result['cuda_peak_mb']:.0f}" if result["cuda_peak_mb"] is not None else "-")
            rows.append(row)
            if run.startswith("mit1003"):
                notes.append(f"{run} epoch {epoch['epoch']}: {extrapolated(epoch, args.mit_val_images):.0f} s "
                             f"per epoch at MIT1003 size ({MIT1003_TRAIN_IMAGES} train, {MIT1003_VAL_IMAGES} val images)")
        marks = ", ".join(f"epoch {epoch['epoch']} training {epoch['train_rss_mb']:.0f}, after validation "
                          f"{epoch['end_rss_mb']:.0f}" for epoch in result["epochs"])
        if result.get("cpu_pressure") is not None:
            notes.append(f"{run}: CPUs oversubscribed {100 * result['cpu_pressure']:.0f}% of the run "
                         "(/proc/pressure/cpu; near 0 = the machine was ours)")
        notes.append(f"{run}: peak RSS MB at fit start {result['setup_rss_mb']:.0f}, {marks}")
        if len(result["epochs"]) > 1:
            first, last = result["epochs"][0]["total"], result["epochs"][-1]["total"]
            notes.append(f"{run}: last epoch / first epoch = {last / first:.3f}")
    lines = [f"{torch.get_num_threads()} CPU threads, device {args.device}, precision "
             f"{args.precision}, channels_last "
             f"{args.channels_last}, compiled head {args.compile}, malloc {args.malloc}; seconds per epoch",
             format_table(header, rows), *notes]
    if "mit1003" in results:
        epoch = results["mit1003"]["epochs"][-1]
        rate = epoch["images"] / train_seconds(epoch)
        lines.append(f"mit1003 training (768x1024, batch {args.batch_size}, 10 scanpath components): {rate:.3f} images/s "
                     f"= {rate / REFERENCE['images_per_s']:.1f}x the reference's {REFERENCE['images_per_s']}; "
                     f"peak RSS {results['mit1003']['peak_rss_mb']:.0f} MB = "
                     f"{results['mit1003']['peak_rss_mb'] / REFERENCE['peak_rss_mb']:.2f} of the reference's "
                     f"{REFERENCE['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.one_run:
        run_one(args)
        return
    results = {run: launch(args, run, argv) for run in args.runs}
    print(report(args, results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
