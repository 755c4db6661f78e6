"""The evaluation report: model beside centre bias (and true density), JSON and table on disk."""

import json
import math

import pytest

from deepgaze_lit.metrics import build_report, information_gain_bits, write_report

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
