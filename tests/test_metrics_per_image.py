"""The per-image table (`metrics_per_image.csv`): one row per image with fixations, whose column means are the
report's image averages, IG over the centre bias included."""

import csv
import math

import pytest
import torch

from deepgaze_lit.metrics import Evaluation, ShufflePool
from deepgaze_lit.metrics.evaluation import CENTERBIAS, MODEL
from deepgaze_lit.metrics.per_image import write_per_image_csv
from deepgaze_lit.metrics.report import build_report

SHAPE = (20, 24)
FIXATIONS = (4, 0, 1, 3)  # image 1 has none


def evaluation_batch():
    generator = torch.Generator().manual_seed(3)
    counts = torch.tensor(FIXATIONS)
    fix_batch = torch.repeat_interleave(torch.arange(len(FIXATIONS)), counts)
    xs = (torch.rand(fix_batch.numel(), generator=generator) * SHAPE[1]).floor()
    ys = (torch.rand(fix_batch.numel(), generator=generator) * SHAPE[0]).floor()
    logits = torch.randn(len(FIXATIONS), 1, *SHAPE, generator=generator)
    log_density = logits - logits.logsumexp(dim=(2, 3), keepdim=True)
    centre = torch.randn(len(FIXATIONS), *SHAPE, generator=generator)
    batch = {"fix_batch": fix_batch, "fix_x": xs, "fix_y": ys, "image_index": torch.arange(len(FIXATIONS)),
             "weight": torch.ones(len(FIXATIONS)), "centerbias": centre - centre.logsumexp(dim=(1, 2), keepdim=True)}
    return batch, log_density, fix_batch, xs, ys


def test_per_image_rows_average_to_the_reports_image_means(tmp_path):
    batch, log_density, fix_batch, xs, ys = evaluation_batch()
    pool = ShufflePool(xs.double(), ys.double(), fix_batch, [SHAPE] * len(FIXATIONS))
    evaluation = Evaluation(pool, len(FIXATIONS), gold_kernel_size=2.0)
    ll_bits = torch.zeros(len(FIXATIONS))
    evaluation.update(batch, log_density, ll_bits, torch.tensor(FIXATIONS))
    results, _ = evaluation.compute(complete=True)
    report, _ = build_report(results[MODEL], results[CENTERBIAS])
    rows = evaluation.per_image_rows([f"img{i}.png" for i in range(4)], [10, 11, 12, 13])
    assert [(row["image"], row["image_id"], row["fixations"]) for row in rows] == [
        ("img0.png", 10, 4), ("img2.png", 12, 1), ("img3.png", 13, 3)]
    path = write_per_image_csv(tmp_path, rows)
    with open(path, newline="") as file:
        written = list(csv.DictReader(file))
    assert list(written[0]) == ["image", "image_id", "fixations", "ll_nats", "ig_uniform_bits", "ig_centerbias_bits",
                                "nss", "auc", "sauc", "cc", "kldiv", "mit_kldiv", "sim"]
    for metric in ("ll_nats", "ig_uniform_bits", "ig_centerbias_bits", "nss", "auc", "sauc", "cc", "kldiv", "sim"):
        column = [float(row[metric]) for row in written if row[metric] != ""]
        assert sum(column) / len(column) == pytest.approx(report["model"][f"{metric}_image"], rel=1e-12), metric
    # IG over the centre bias per image: (model LL - centre-bias LL) / ln 2 of that image's fixations
    image0 = fix_batch == 0
    flat = (ys[image0] * SHAPE[1] + xs[image0]).long()
    model_ll = log_density[0, 0].flatten()[flat].double().mean()
    centre_ll = batch["centerbias"][0].flatten()[flat].double().mean()
    assert float(written[0]["ig_centerbias_bits"]) == pytest.approx(float(model_ll - centre_ll) / math.log(2),
                                                                    rel=1e-6)
