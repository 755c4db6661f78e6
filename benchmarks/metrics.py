"""Time the full metric set against the network's forward pass for the same images.

    .venv/bin/python benchmarks/metrics.py [--images 100] [--height 768] [--width 1024] [--fixations 15]

The metric set is one `SaliencyMetrics` with every metric (LL, IG, NSS, AUC, sAUC with the split's pool,
CC/KLDiv/MIT KLDiv/SIM with a gold map) over log densities shaped like the network's output (constant on 4x4
blocks, so with ties). The forward pass is `DeepGazeIII(num_components=10, backbone_weights="none")` under
torch.no_grad on `--network-images` images, extrapolated to `--images`.
"""

import argparse
import math
import time

import torch

from deepgaze_lit import DeepGazeIII
from deepgaze_lit.metrics import SaliencyMetrics


def block_log_densities(generator, batch_size, height, width) -> torch.Tensor:
    """(B,1,H,W) float32 log densities (nats) constant on 4x4 blocks, as the network's finalizer grid gives."""
    logits = torch.randn(batch_size, 1, math.ceil(height / 4), math.ceil(width / 4), generator=generator)
    logits = logits.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)[:, :, :height, :width]
    return logits - logits.flatten(1).logsumexp(dim=1)[:, None, None, None]


def make_batches(args, generator) -> list[dict]:
    batches = []
    for start in range(0, args.images, args.batch_size):
        size = min(args.batch_size, args.images - start)
        batches.append({
            "log_density": block_log_densities(generator, size, args.height, args.width),
            "fix_batch": torch.arange(size).repeat_interleave(args.fixations),
            "fix_x": torch.rand(size * args.fixations, generator=generator) * args.width,
            "fix_y": torch.rand(size * args.fixations, generator=generator) * args.height,
            "image_index": torch.arange(start, start + size),
            "weight": torch.ones(size),
        })
    return batches


def time_metrics(args, batches, **options) -> float:
    """Seconds for updating one accumulator with every batch and computing its result."""
    accumulator = SaliencyMetrics(num_images=args.images, **options)
    begin = time.perf_counter()
    for batch in batches:
        accumulator.update(**batch)
    accumulator.compute()
    return time.perf_counter() - begin


def time_network_per_image(args) -> float:
    """Seconds per image of DeepGazeIII's forward pass (batch size 1, no gradient), after one warm-up image."""
    model = DeepGazeIII(num_components=10, backbone_weights="none").eval()
    image = torch.randint(0, 256, (1, 3, args.height, args.width), dtype=torch.uint8)
    centerbias = torch.full((1, args.height, args.width), -math.log(args.height * args.width))
    history = torch.rand(1, 4) * torch.tensor([args.width]), torch.rand(1, 4) * torch.tensor([args.height])
    with torch.no_grad():
        model(image, centerbias, *history)
        begin = time.perf_counter()
        for _ in range(args.network_images):
            model(image, centerbias, *history)
    return (time.perf_counter() - begin) / args.network_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--fixations", type=int, default=15, help="fixations per image")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--gold-kernel-size", type=float, default=35.0, help="gold map sigma in pixels")
    parser.add_argument("--network-images", type=int, default=2, help="images to time the forward pass on")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    batches = make_batches(args, generator)
    pool = (torch.rand(args.images * args.fixations, generator=generator),
            torch.rand(args.images * args.fixations, generator=generator),
            torch.arange(args.images).repeat_interleave(args.fixations))
    print(f"{args.images} images of {args.height}x{args.width}, {args.fixations} fixations each, "
          f"batch size {args.batch_size}, {torch.get_num_threads()} CPU threads")
    parts = {
        "LL, IG, NSS, AUC": time_metrics(args, batches),
        "+ sAUC": time_metrics(args, batches, shuffle_pool=pool),
        "+ sAUC, CC, KLDiv, SIM (full set)": time_metrics(
            args, batches, shuffle_pool=pool, gold_kernel_size=args.gold_kernel_size
        ),
    }
    for name, seconds in parts.items():
        print(f"metrics {name:36s} {seconds:8.2f} s  ({1000 * seconds / args.images:.1f} ms/image)")

    per_image = time_network_per_image(args)
    network = per_image * args.images
    print(f"DeepGazeIII forward (10 components), {per_image:.2f} s/image over {args.network_images} images, "
          f"extrapolated to {args.images} images: {network:8.2f} s")
    full = parts["+ sAUC, CC, KLDiv, SIM (full set)"]
    print(f"full metric set / forward pass: {full / network:.3f}")


if __name__ == "__main__":
    main()
