"""The end-to-end benchmark's pieces: the StageTimer's per-epoch split and the report's extrapolation. Times are
never asserted against targets here; only that the split adds up and counts what it says."""

import importlib
import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from deepgaze_lit.data.datamodule import SaliencyDataModule
from deepgaze_lit.module import DeepGazeModule

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    """Import benchmarks/<name>.py (the folder is not a package; its modules import each other by name)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


@pytest.mark.timeout(300)
def test_stage_timer_splits_each_epoch_and_sees_the_cache(tmp_path):
    common = load_benchmark("common")
    output = tmp_path / "timing.json"
    timer = common.StageTimer(str(output))
    data = SaliencyDataModule(source="synthetic", synthetic_images=6, synthetic_sizes=[(64, 96)], val_images=2,
                              batch_size=2, centerbias="uniform", history="none", image_cache_mb=0)
    torch.manual_seed(0)
    network = DeepGazeModule(num_components=1, scanpath=False, backbone_weights="none", feature_cache_mb=16)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        use_distributed_sampler=False, callbacks=[timer])
    trainer.fit(network, datamodule=data)
    result = json.loads(output.read_text())
    first, second = result["epochs"]
    for epoch in (first, second):
        assert (epoch["images"], epoch["steps"]) == (4, 2)
        assert sum(epoch[phase] for phase in common.PHASES) == pytest.approx(epoch["total"], abs=1e-9)
        assert min(epoch[phase] for phase in common.PHASES if phase != "other") >= 0
        assert epoch["validation"] > 0
    assert first["backbone"] > 0 and second["backbone"] == 0
    assert first["cache"]["computed"] == 6 and second["cache"]["memory_hits"] == 6
    assert 0 < result["setup_rss_mb"] <= first["train_rss_mb"] <= first["end_rss_mb"] <= result["peak_rss_mb"]
    assert result["cuda_peak_mb"] is None


def test_report_extrapolates_per_image_costs_to_mit1003():
    train = load_benchmark("train")
    epoch = {"epoch": 0, "images": 8, "steps": 4, "data": 1.0, "backbone": 2.0, "readout+loss": 4.0,
             "optimiser": 1.0, "validation": 2.0, "other": 0.5, "total": 10.5, "train_rss_mb": 1500.0,
             "end_rss_mb": 1900.0}
    assert train.train_seconds(epoch) == 8.0
    assert train.extrapolated(epoch, val_images=4) == pytest.approx(902 * 1.0 + 101 * 0.5 + 0.5)
    args = train.parse_args(["--runs", "mit1003", "--mit-val-images", "4"])
    text = train.report(args, {"mit1003": {"epochs": [epoch], "setup_rss_mb": 1000.0,
                                                  "peak_rss_mb": 1900.0, "cuda_peak_mb": None}})
    assert "953 s per epoch at MIT1003 size" in text
    assert "1.000 images/s = 7.1x the reference's 0.14" in text
    assert "peak RSS 1900 MB = 0.25 of the reference's 7600 MB" in text
    assert "fit start 1000, epoch 0 training 1500, after validation 1900" in text


def test_cpu_stall_counter_never_decreases():
    common = load_benchmark("common")
    first = common.cpu_stall_microseconds()
    if first is None:
        pytest.skip("this kernel reports no CPU pressure (/proc/pressure/cpu)")
    assert 0 <= first <= common.cpu_stall_microseconds()
