"""Time and memory of the DeepGaze III network (10 scanpath components by default) on this machine.

For each image size: backbone forward, full forward (no gradient, full-resolution output) and one training step
(forward, log-likelihood at the fixations via BlockLogDensity.at, backward, Adam step), in seconds (fastest and
median of --repeats: on a shared machine the fastest is the least disturbed), training images/s (from the fastest
step), and peak memory: process peak RSS (resource.getrusage; each size runs in its own process so the peak is that
size's) on CPU, torch.cuda.max_memory_allocated on GPU. Backbone weights are random ("none"): timing does not
depend on them.

Reference implementation for comparison (2-core CPU, 768x1024, batch 2, 10 components): 14.1 s per training step
(0.14 images/s), 7.6 GB peak RSS, of which the backbone forward is 0.5 s.

    python benchmarks/network.py                      # CPU, float32, 768x1024 and 384x512, batch 2
    python benchmarks/network.py --device cuda --dtype bf16 --channels-last
    python benchmarks/network.py --device cuda --dtype bf16 --batch 32 --sizes 768x1024 --compile head
"""

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time

import torch

from common import REFERENCE, peak_rss_mb
from deepgaze_lit import DeepGazeIII

FIXATIONS_PER_IMAGE = 20
REFERENCE_PEAK_GB = REFERENCE["peak_rss_mb"] / 1000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["768x1024", "384x512"], help="image sizes HxW (pixels)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--components", type=int, default=10)
    parser.add_argument("--spatial", action="store_true", help="spatial-only model (no scanpath networks)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", nargs="?", const="all", choices=["head", "all"], default=None,
                        help="torch.compile the head only, or (no value) backbone_features and head")
    parser.add_argument("--json", default=None, help="append each size's result as one JSON line to this file")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--one-size", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timings(function, device, repeats, warmup):
    """(fastest, median) wall time of `function` in seconds over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def make_batch(batch, height, width, device, channels_last, generator):
    """Random uint8 images, a uniform centre bias, 4-slot histories (one slot missing) and target fixations."""
    image = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=generator)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    centerbias = torch.full((batch, height, width), -torch.log(torch.tensor(float(height * width))).item())
    x_hist = torch.rand(batch, 4, generator=generator) * width
    y_hist = torch.rand(batch, 4, generator=generator) * height
    x_hist[:, 3] = float("nan")
    y_hist[:, 3] = float("nan")
    fix_batch = torch.arange(batch).repeat_interleave(FIXATIONS_PER_IMAGE)
    fix_x = torch.rand(fix_batch.numel(), generator=generator) * width
    fix_y = torch.rand(fix_batch.numel(), generator=generator) * height
    tensors = (image, centerbias, x_hist, y_hist, fix_batch, fix_x, fix_y)
    return [tensor.to(device) for tensor in tensors]


def run_one_size(args, size):
    device = torch.device(args.device)
    height, width = (int(side) for side in size.lower().split("x"))
    model = DeepGazeIII(args.components, scanpath=not args.spatial, backbone_weights="none").to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    backbone, head = model.backbone_features, model.head
    if args.compile == "all":
        backbone = torch.compile(backbone)
    if args.compile:
        head = torch.compile(head, dynamic=False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    image, centerbias, x_hist, y_hist, fix_batch, fix_x, fix_y = make_batch(
        args.batch, height, width, device, args.channels_last, torch.Generator().manual_seed(0)
    )
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()
    )

    def backbone_forward():
        with autocast:
            backbone(image)

    def forward():
        with torch.no_grad(), autocast:
            head(backbone(image), centerbias, x_hist, y_hist).full()

    def training_step():
        model.train()
        with autocast:
            density = head(backbone(image), centerbias, x_hist, y_hist)
            loss = -density.at(fix_batch, fix_x, fix_y).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = {"size": size, "batch": args.batch, "components": args.components, "dtype": args.dtype,
              "compile": args.compile, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    result["backbone_forward_s"] = timings(backbone_forward, device, args.repeats, args.warmup)
    result["forward_s"] = timings(forward, device, args.repeats, args.warmup)
    if device.type == "cuda":
        result["forward_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        torch.cuda.reset_peak_memory_stats(device)
    result["train_step_s"] = timings(training_step, device, args.repeats, args.warmup)
    result["train_images_per_s"] = args.batch / result["train_step_s"][0]
    if device.type == "cuda":
        result["train_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        result["peak_rss_gb"] = peak_rss_mb() * 2**20 / 1e9
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one_size:
        print(json.dumps(run_one_size(args, args.sizes[0])))
        return
    passthrough = list(argv if argv is not None else sys.argv[1:])
    print(
        f"DeepGaze III network, {args.components} {'spatial' if args.spatial else 'scanpath'} components, "
        f"batch {args.batch}, device {args.device}, {args.dtype}, channels_last={args.channels_last}, "
        f"compile={args.compile}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    print("times in s as fastest/median of the repeats; img/s from the fastest training step")
    print(f"{'size':>9} {'backbone s':>11} {'forward s':>11} {'train step s':>13} {'train img/s':>11} {'peak GB':>8}")
    for size in args.sizes:
        command = [sys.executable, __file__, *passthrough, "--sizes", size, "--one-size"]
        process = subprocess.run(command, capture_output=True, text=True)
        if process.returncode != 0:
            sys.exit(f"benchmark of {size} failed:\n{process.stderr}")
        result = json.loads(process.stdout.strip().splitlines()[-1])
        if args.json:
            with open(args.json, "a") as stream:
                stream.write(json.dumps(result) + "\n")
        peak = result.get("peak_rss_gb", result.get("train_peak_gb"))
        backbone, forward, step = (
            f"{result[key][0]:.2f}/{result[key][1]:.2f}" for key in ("backbone_forward_s", "forward_s", "train_step_s")
        )
        print(f"{size:>9} {backbone:>11} {forward:>11} {step:>13} {result['train_images_per_s']:11.2f} {peak:8.2f}")
        if size == REFERENCE["size"] and args.batch == 2 and args.components == 10 and not args.spatial:
            print(
                f"{'':>9} vs reference ({REFERENCE['step_s']} s/step, {REFERENCE['images_per_s']} img/s, "
                f"{REFERENCE_PEAK_GB} GB): {REFERENCE['step_s'] / result['train_step_s'][0]:.1f}x the images/s, "
                f"{peak / REFERENCE_PEAK_GB:.2f}x the memory"
            )


if __name__ == "__main__":
    main()
