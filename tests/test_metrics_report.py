"""The evaluation report: model beside centre bias (and true density), JSON and table on disk; every catalogue
metric in it."""

import json
import math

import pytest
import torch

from deepgaze_lit.metrics import (SaliencyMetrics, ShufflePool, build_report, evaluation_scalars, information_gain_bits,
                                  write_report)
from deepgaze_lit.metrics.catalogue import AVERAGES, CATALOGUE, OVER_CENTERBIAS

LN2 = math.log(2.0)


def result(ll_fixation, ll_image, auc, cc=None):
    values = {
        "n_fixations": 30.0,
        "n_images": 4.0,
        "ll_nats_fixation": ll_fixation,
        "ll_nats_image": ll_image,
        "ig_uniform_bits_fixation": ll_fixation / LN2 + 10.0,
        "ig_uniform_bits_image": ll_image / LN2 + 10.0,
        "auc_fixation": auc,
        "auc_image": auc - 0.01,
    }
    if cc is not None:
        values["cc_image"] = cc
    return values


def test_report_with_gold_standard(tmp_path):
    model = result(-6.0, -6.2, 0.85, cc=0.6)
    centerbias = result(-6.5, -6.6, 0.80, cc=0.4)
    gold = result(-5.5, -5.8, 0.90, cc=0.9)
    report = write_report(tmp_path / "eval", model, centerbias, gold)

    assert report["model"]["ig_centerbias_bits_fixation"] == pytest.approx(0.5 / LN2)
    assert report["model"]["ig_centerbias_bits_image"] == pytest.approx(0.4 / LN2)
    assert report["centerbias"]["ig_centerbias_bits_fixation"] == 0.0
    assert report["gold"]["ig_centerbias_bits_fixation"] == pytest.approx(1.0 / LN2)
    assert report["explained_information_gain"]["fixation"] == pytest.approx(0.5)
    assert report["explained_information_gain"]["image"] == pytest.approx(0.4 / 0.8)
    assert report["model"]["auc_fixation"] == 0.85

    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == report
    table = (tmp_path / "eval" / "metrics.txt").read_text()
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "model", "fixation", "model", "image", "centre", "bias", "fixation",
                                "centre", "bias", "image", "gold", "fixation", "gold", "image"]
    auc_row = next(line for line in lines if line.startswith("AUC"))
    assert auc_row.split() == ["AUC", "0.8500", "0.8400", "0.8000", "0.7900", "0.9000", "0.8900"]
    cc_row = next(line for line in lines if line.startswith("CC"))
    assert cc_row.split() == ["CC", "-", "0.6000", "-", "0.4000", "-", "0.9000"]
    assert not any(line.startswith("NSS") for line in lines)
    assert "50.0 % per fixation, 50.0 % per image" in table


def test_report_without_gold_and_with_nan():
    model = result(-6.0, -6.2, float("nan"))
    report, table = build_report(model, result(-6.5, -6.6, 0.8))
    assert "gold" not in report and "explained_information_gain" not in report
    assert report["model"]["auc_fixation"] is None
    assert "explained" not in table
    assert json.dumps(report, allow_nan=False)


def test_information_gain_needs_the_same_fixations():
    with pytest.raises(ValueError, match="different fixations"):
        information_gain_bits(result(-6.0, -6.0, 0.8), {**result(-6.0, -6.0, 0.8), "n_fixations": 29.0})


def test_every_catalogue_metric_reaches_the_json_and_the_table():
    """Accumulated with a shuffle pool and a gold kernel, every catalogue metric has finite values for every density
    in the JSON, its row in the table (showing the JSON's numbers) and its logged scalars; the accumulator computes no
    metric the catalogue does not list."""
    generator = torch.Generator().manual_seed(0)
    height, width = 8, 10
    fix_batch = torch.tensor([0, 0, 1, 2, 2, 2])
    fix_x = torch.rand(6, generator=generator, dtype=torch.float64) * width
    fix_y = torch.rand(6, generator=generator, dtype=torch.float64) * height
    pool = ShufflePool(fix_x, fix_y, fix_batch, torch.tensor([[height, width]] * 3))
    results = {}
    for source in ("model", "centerbias", "gold"):
        log_density = torch.log_softmax(torch.randn(3, height * width, generator=generator), dim=1)
        accumulator = SaliencyMetrics(pool, gold_kernel_size=1.5, num_images=3)
        accumulator.update(log_density.reshape(3, height, width), fix_batch, fix_x, fix_y, torch.arange(3))
        results[source] = accumulator.compute()
    report, table = build_report(results["model"], results["centerbias"], results["gold"])
    for entry in CATALOGUE:
        row = next(line for line in table.splitlines() if line.startswith(entry.label + "  "))
        cells = row[len(entry.label):].split()
        averages = ("image",) if entry.needs_gold_map else ("fixation", "image")
        for column, density in enumerate(("model", "centerbias", "gold")):
            for average in averages:
                value = report[density][f"{entry.name}_{average}"]
                assert math.isfinite(value), (entry.name, density, average)
                assert cells[2 * column + AVERAGES.index(average)] == f"{value:.4f}", (entry.name, density, average)
    computed = {key.rsplit("_", 1)[0] for key in results["model"] if key.endswith(("_fixation", "_image"))}
    assert computed == {entry.name for entry in CATALOGUE if entry.kind != OVER_CENTERBIAS}
    scalars = evaluation_scalars(results, loss=1.5)
    for entry in (entry for entry in CATALOGUE if entry.tag is not None):
        assert scalars[entry.tag] == report["model"][f"{entry.name}_image"]
        for density in entry.also_logged_for:
            assert scalars[f"{density}_{entry.tag}"] == report[density][f"{entry.name}_image"]
