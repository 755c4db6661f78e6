"""A 2-process (gloo, CPU) evaluation gives the 1-process numbers: per-image and per-fixation batches."""

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepgaze_lit.metrics import SaliencyMetrics, ShufflePool

SHAPES = ((24, 32), (20, 28))
NUM_IMAGES = 7
FIXATIONS_PER_IMAGE = (5, 1, 6, 0, 3, 4, 2)  # image 3 has none


def make_split():
    """Log densities (nats, float32), shapes and the fixations x, y (pixels), n of a small split."""
    generator = torch.Generator().manual_seed(11)
    shapes = [SHAPES[image % 2] for image in range(NUM_IMAGES)]
    log_densities = []
    for height, width in shapes:
        logits = torch.randn(height, width, generator=generator)
        log_densities.append((logits - logits.logsumexp(dim=(0, 1))).float())
    n = torch.repeat_interleave(torch.arange(NUM_IMAGES), torch.tensor(FIXATIONS_PER_IMAGE))
    sizes = torch.tensor(shapes, dtype=torch.float64)[n]
    x = (torch.rand(n.numel(), generator=generator, dtype=torch.float64) * sizes[:, 1]).floor()
    y = (torch.rand(n.numel(), generator=generator, dtype=torch.float64) * sizes[:, 0]).floor()
    x[1], y[1] = x[0], y[0]  # a duplicate fixation
    return log_densities, shapes, x, y, n


def batch_of(samples, log_densities, x, y, n):
    """Batch dict entries for samples (image, fixation indices), all of one image size."""
    counts = torch.bincount(n, minlength=NUM_IMAGES)
    fixations = [torch.as_tensor(indices, dtype=torch.int64) for _, indices in samples]
    return {
        "log_density": torch.stack([log_densities[image] for image, _ in samples])[:, None],
        "fix_batch": torch.cat([torch.full((len(f),), b, dtype=torch.int64) for b, f in enumerate(fixations)]),
        "fix_x": torch.cat([x[f] for f in fixations]).float(),
        "fix_y": torch.cat([y[f] for f in fixations]).float(),
        "image_index": torch.tensor([image for image, _ in samples]),
        "weight": torch.tensor([len(f) / max(int(counts[image]), 1) for (image, _), f in zip(samples, fixations)]),
    }


def make_batches(mode: str) -> list[dict]:
    """Batches of up to 3 samples of one size, as a bucketing sampler makes."""
    log_densities, shapes, x, y, n = make_split()
    batches = []
    for shape in SHAPES:
        images = [image for image in range(NUM_IMAGES) if shapes[image] == shape]
        if mode == "image":
            samples = [(image, (n == image).nonzero().flatten().tolist()) for image in images]
        else:
            samples = [(int(n[index]), [index]) for index in range(n.numel()) if int(n[index]) in images]
        batches += [batch_of(samples[start : start + 3], log_densities, x, y, n) for start in range(0, len(samples), 3)]
    return batches


def accumulate(mode: str, rank: int, world_size: int) -> SaliencyMetrics:
    _, shapes, x, y, n = make_split()
    accumulator = SaliencyMetrics(ShufflePool(x, y, n, shapes), gold_kernel_size=2.0, num_images=NUM_IMAGES)
    for batch in make_batches(mode)[rank::world_size]:
        accumulator.update(**batch)
    return accumulator


def evaluate(mode: str, rank: int, world_size: int) -> dict[str, float]:
    return accumulate(mode, rank, world_size).compute()


def per_image(mode: str, rank: int, world_size: int) -> dict[str, list[float]]:
    """`SaliencyMetrics.per_image()` as lists (NaN kept as float nan)."""
    return {name: values.tolist() for name, values in accumulate(mode, rank, world_size).per_image().items()}


def _worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = {mode: evaluate(mode, rank, world_size) for mode in ("image", "fixation")}
        results.update({f"{mode}_per_image": per_image(mode, rank, world_size) for mode in ("image", "fixation")})
        if rank == 0:
            with open(out_file, "w") as handle:
                json.dump(results, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_two_process_evaluation_equals_one_process(tmp_path):
    assert len(make_batches("image")) % 2 == 1  # the ranks get different numbers of batches
    out_file = tmp_path / "results.json"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    distributed = json.loads(out_file.read_text())

    single = {mode: evaluate(mode, 0, 1) for mode in ("image", "fixation")}
    # per-image batches: every image lives in one sample, so the sums are the same numbers
    assert distributed["image"] == single["image"]
    assert single["image"]["n_images"] == 6 and single["image"]["n_fixations"] == sum(FIXATIONS_PER_IMAGE)
    # per-fixation batches: an image's sum is added up in another order across ranks
    assert distributed["fixation"].keys() == single["fixation"].keys()
    for key, value in single["fixation"].items():
        assert distributed["fixation"][key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    for key in ("ll_nats_fixation", "ll_nats_image", "nss_image", "auc_image", "sauc_image"):
        assert single["fixation"][key] == pytest.approx(single["image"][key], rel=1e-12), key
    assert single["fixation"]["n_map_images"] == 1  # only image 1, with its single fixation
    assert not any(math.isnan(value) for value in single["image"].values())
    # per-image values are summed across ranks too: the 1-process values, NaN where an image has none
    for mode in ("image", "fixation"):
        one_process = per_image(mode, 0, 1)
        assert distributed[f"{mode}_per_image"].keys() == one_process.keys()
        for name, values in one_process.items():
            assert distributed[f"{mode}_per_image"][name] == pytest.approx(values, rel=1e-12, abs=1e-12, nan_ok=True)
        assert one_process["n_fixations"] == list(map(float, FIXATIONS_PER_IMAGE))
        assert math.isnan(one_process["ll_nats"][3]) and math.isnan(one_process["cc"][3])
        assert math.isnan(one_process["cc"][0]) == (mode == "fixation")  # no sample holds all 5 fixations
        seen = [value for value in one_process["nss"] if not math.isnan(value)]
        assert sum(seen) / len(seen) == pytest.approx(single[mode]["nss_image"], rel=1e-12)
