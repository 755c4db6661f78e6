"""SaliencyDataModule and the torch datasets: batch contents, history modes, targets, splits, synthetic data,
fingerprints and the setup summary."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from deepgaze_lit.data import (BaselineCenterbias, CrossvalidatedBaselineCenterbias, DataError, FixationSamples,
                               SaliencyDataModule, make_synthetic,
                               read_mit1003)
from deepgaze_lit.data.centerbias import UniformCenterbias
from deepgaze_lit.data.torch_dataset import CenterbiasTensors

# Origin: fixture written by pysaliency 0.2.22 itself (the shared fixtures folder pysaliency_mini), copied into tests/data.
FIXTURE = Path(__file__).parent / "data" / "pysaliency_mini"
SMALL = dict(synthetic_images=12, val_images=3, synthetic_sizes=[(64, 96), (96, 64)], synthetic_subjects=3,
             batch_size=4, image_cache_mb=16)
BATCH_KEYS = {"image", "centerbias", "x_hist", "y_hist", "fix_batch", "fix_x", "fix_y", "weight", "image_index"}


def _batches(loader):
    return list(loader)


def test_synthetic_is_deterministic_and_its_density_integrates_to_one():
    first, second = make_synthetic(n_images=6, seed=3), make_synthetic(n_images=6, seed=3)
    for key in ("x", "y", "n", "subject", "t", "x_hist", "y_hist"):
        np.testing.assert_array_equal(getattr(first, key), getattr(second, key))
    assert all(np.array_equal(a, b) for a, b in zip(first.images, second.images))
    assert not np.array_equal(first.x, make_synthetic(n_images=6, seed=4).x)
    longer = make_synthetic(n_images=8, seed=3)
    np.testing.assert_array_equal(longer.images[5], first.images[5])
    for density, shape in zip(first.true_log_densities, first.shapes):
        assert density.shape == tuple(shape) and np.exp(density).sum() == pytest.approx(1, abs=1e-12)
    assert first.shapes.tolist()[:2] == [[256, 320], [320, 256]]
    initial = first.is_initial
    np.testing.assert_array_equal(first.x[initial], first.shapes[first.n[initial], 1] / 2)
    assert first.has_history and int(initial.sum()) == 6 * 8


def test_batches_follow_the_contract():
    data = SaliencyDataModule(**SMALL)
    data.setup("fit")
    train = data.split_dataset("fit")
    batches = _batches(data.train_dataloader())
    assert sum(len(batch["image_index"]) for batch in batches) == train.n_images
    for batch in batches:
        assert set(batch) == BATCH_KEYS
        size = len(batch["image_index"])
        height, width = batch["image"].shape[-2:]
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (size, 3, height, width)
        assert batch["centerbias"].dtype == torch.float32 and batch["centerbias"].shape == (size, height, width)
        assert batch["x_hist"].shape == (size, 4) and batch["weight"].tolist() == [1.0] * size
        torch.testing.assert_close(batch["centerbias"][0], data.centerbias_for((height, width)))
        for sample, index in enumerate(batch["image_index"].tolist()):
            np.testing.assert_array_equal(batch["image"][sample].permute(1, 2, 0).numpy(), train.load_image(index))
            targets = (train.n == index) & train.is_target
            rows = batch["fix_batch"] == sample
            np.testing.assert_allclose(batch["fix_x"][rows].numpy(), train.x[targets], rtol=1e-6)
            assert batch["x_hist"][sample, 0] == width / 2 and batch["y_hist"][sample, 0] == height / 2
            assert torch.isnan(batch["x_hist"][sample, 1:]).all()
    expected = BaselineCenterbias(train).log_density((64, 96)).astype(np.float32)
    np.testing.assert_array_equal(data.centerbias_for((64, 96)).numpy(), expected)


def test_splits_are_disjoint_and_setup_is_idempotent():
    data = SaliencyDataModule(**SMALL)
    data.setup("fit")
    train = data.split_dataset("fit")
    data.setup("validate")
    with pytest.raises(DataError, match="set data.test_images > 0 for a separate test split, or use `deepgaze validate`"):
        data.setup("test")  # the test split is the validation split: scoring it would leak
    assert data.split_dataset("fit") is train
    val, test = data.split_dataset("validate"), data.split_dataset("test")
    assert not set(train.image_ids) & set(val.image_ids)
    assert val.image_ids.tolist() == test.image_ids.tolist() and val.n_images == 3
    assert train.n_images + val.n_images == 12
    val_indices = sorted(i for batch in _batches(data.val_dataloader()) for i in batch["image_index"].tolist())
    assert val_indices == list(range(val.n_images))


def test_crossval_split_in_module():
    data = SaliencyDataModule(split="crossval", folds=4, fold=1, **SMALL)
    sizes = [data.split_dataset(stage).n_images for stage in ("fit", "validate", "test")]
    assert sizes == [6, 3, 3]


def test_fixation_targets_with_real_history_on_the_fixture():
    data = SaliencyDataModule(source="pysaliency", path=str(FIXTURE), history="real", targets="fixation",
                              split="holdout", val_images=2, batch_size=5, image_cache_mb=16)
    data.setup("fit")
    train = data.split_dataset("fit")
    batches = _batches(data.train_dataloader())
    assert sum(len(batch["weight"]) for batch in batches) == int(train.is_target.sum())
    weight_per_image = np.zeros(train.n_images)
    for batch in batches:
        assert torch.equal(batch["fix_batch"], torch.arange(len(batch["weight"])))
        np.add.at(weight_per_image, batch["image_index"].numpy(), batch["weight"].numpy())
        for sample in range(len(batch["weight"])):
            index = int(batch["image_index"][sample])
            match = np.flatnonzero((train.n == index) & np.isclose(train.x, float(batch["fix_x"][sample]))
                                   & np.isclose(train.y, float(batch["fix_y"][sample])))
            assert len(match) == 1 and not train.is_initial[match[0]]
            recorded = train.x_hist[match[0]][~np.isnan(train.x_hist[match[0]])]
            expected = np.full(4, np.nan)
            expected[:min(4, len(recorded))] = recorded[::-1][:4]
            np.testing.assert_allclose(batch["x_hist"][sample].numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(weight_per_image, 1, rtol=1e-6)


def test_history_none_and_two_sizes_resize():
    data = SaliencyDataModule(source="pysaliency", path=str(FIXTURE), history="none", resize="two_sizes",
                              val_images=2, batch_size=3, image_cache_mb=64)
    data.setup("fit")
    train = data.split_dataset("fit")
    assert {tuple(shape) for shape in train.shapes} == {(768, 1024), (1024, 768)}
    batch = _batches(data.train_dataloader())[0]
    assert torch.isnan(batch["x_hist"]).all() and batch["image"].shape[-2:] in {(768, 1024), (1024, 768)}


def test_real_history_needs_scanpaths_and_fixation_targets(tmp_path):
    with pytest.raises(ValueError, match="needs targets 'fixation'"):
        SaliencyDataModule(history="real", targets="image")
    root = tmp_path / "mit"
    (root / "ALLSTIMULI").mkdir(parents=True)
    (root / "ALLFIXATIONMAPS").mkdir()
    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(root / "ALLSTIMULI" / "a.jpeg")
    points = np.zeros((64, 80), np.uint8)
    points[10, 20] = 255
    Image.fromarray(points).save(root / "ALLFIXATIONMAPS" / "a_fixPts.jpg")
    with pytest.raises(DataError, match="history 'real' needs scanpaths"):
        FixationSamples(read_mit1003(root), CenterbiasTensors(UniformCenterbias()), "real")


def test_summary_reports_dropped_fixations_and_images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(8):
        Image.fromarray(np.full((64, 64, 3), index * 20, np.uint8)).save(images / f"img{index}.png")
    rows = [f"img{index},{x},{y}" for index in range(7) for x, y in ((10, 10), (30, 40), (70, 5))]
    (tmp_path / "fix.csv").write_text("image,x,y\n" + "\n".join(f"{r.split(',')[0]}.png,{r.split(',', 1)[1]}"
                                                                 for r in rows) + "\n")
    data = SaliencyDataModule(source="csv", path=str(images), csv_path=str(tmp_path / "fix.csv"), val_images=2,
                              batch_size=2, image_cache_mb=16)
    data.setup("fit")
    assert "8 images, 14 fixations" in data.summary
    assert "dropped 7 fixations outside their image" in data.summary
    per_split = sum(data.split_dataset(stage).n_images for stage in ("fit", "validate"))
    assert per_split == 7 and data.summary.count("dropped 1 images without fixations") == 1


def test_fingerprint_depends_on_images_and_resize_policy():
    first = SaliencyDataModule(**SMALL).data_fingerprint("fit")
    assert first == SaliencyDataModule(**SMALL).data_fingerprint("fit")
    assert first != SaliencyDataModule(**SMALL).data_fingerprint("validate")
    assert first != SaliencyDataModule(resize="max_side", max_side=48, **SMALL).data_fingerprint("fit")
    assert first != SaliencyDataModule(**{**SMALL, "synthetic_seed": 1}).data_fingerprint("fit")


def test_missing_paths_fail_with_the_path(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        SaliencyDataModule(source="pysaliency", path=str(tmp_path / "gone")).setup("fit")
    with pytest.raises(ValueError, match="needs data.path"):
        SaliencyDataModule(source="mit1003")


@pytest.mark.timeout(120)
def test_workers_share_the_image_cache():
    data = SaliencyDataModule(num_workers=2, **SMALL)
    data.setup("fit")
    loader = data.train_dataloader()
    first = _batches(loader)
    cache = data._image_cache
    assert int(cache.filled.sum()) == data.split_dataset("fit").n_images
    loader.batch_sampler.set_epoch(1)
    second = _batches(loader)
    assert sorted(i for b in first for i in b["image_index"].tolist()) == sorted(
        i for b in second for i in b["image_index"].tolist())


@pytest.mark.parametrize("world_size", [2, 3])
def test_loaders_take_rank_and_world_size_from_the_trainer(world_size):
    seen, train_counts = [], set()
    for rank in range(world_size):
        data = SaliencyDataModule(**{**SMALL, "val_images": 5, "batch_size": 2})
        progress = SimpleNamespace(current=SimpleNamespace(processed=3))
        data.trainer = SimpleNamespace(global_rank=rank, world_size=world_size,
                                       fit_loop=SimpleNamespace(epoch_progress=progress))
        data.setup("fit")
        seen += [i for batch in _batches(data.val_dataloader()) for i in batch["image_index"].tolist()]
        train = data.train_dataloader()
        assert train.batch_sampler.epoch == 3
        train_counts.add(len(_batches(train)))
    assert sorted(seen) == list(range(5)) and len(train_counts) == 1


def test_split_info_names_its_images_and_records_the_data_settings(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(6):
        Image.fromarray(np.full((64, 80, 3), index * 30, np.uint8)).save(images / f"img{index}.png")
    (tmp_path / "fix.csv").write_text("image,x,y\n" + "".join(f"img{index}.png,{10 + index},20\n"
                                                              for index in range(6)))
    template = tmp_path / "centre.npy"
    np.save(template, np.zeros((8, 8)))
    data = SaliencyDataModule(source="csv", path=str(images), csv_path=str(tmp_path / "fix.csv"), split="crossval",
                              folds=3, fold=1, resize="max_side", max_side=40, centerbias="template",
                              centerbias_template=str(template), batch_size=2, image_cache_mb=0)
    info = data.split_info("test")
    assert len(info.image_names) == info.num_images == 2 and len(info.image_ids) == 2
    assert all(name == str(images / f"img{index}.png") for name, index in zip(info.image_names, info.image_ids))
    provenance = info.provenance
    assert provenance["source"] == "csv" and provenance["path"] == str(images.resolve())
    assert provenance["csv_path"] == str((tmp_path / "fix.csv").resolve())
    assert provenance["split"] == {"name": "test", "kind": "crossval", "images": 2, "fold": 1, "folds": 3}
    assert provenance["resize"] == {"policy": "max_side", "max_side": 40, "sizes": [[32, 40]]}
    assert provenance["centerbias"] == {"kind": "template", "template": str(template.resolve())}


def test_kde_crossval_gives_every_image_its_leave_one_out_centre_bias():
    """centerbias "kde_crossval": each batch sample's centre bias is the KDE of all the dataset's target fixations
    but its own image's (pysaliency CrossvalidatedBaselineModel), in every split, fixation targets included."""
    data = SaliencyDataModule(split="crossval", folds=4, fold=1, centerbias="kde_crossval", history="real",
                              targets="fixation", **SMALL)
    data.setup("fit")
    everything = data._dataset
    for stage, loader in (("fit", data.train_dataloader()), ("test", data.test_dataloader())):
        split = data.split_dataset(stage)
        for batch in _batches(loader):
            for sample, index in enumerate(batch["image_index"].tolist()):
                image_id = int(split.image_ids[index])
                own_left_out = CrossvalidatedBaselineCenterbias(everything, data.hparams.centerbias_bandwidth,
                                                                data.hparams.centerbias_eps)
                expected = own_left_out.log_density_for_image(image_id).astype(np.float32)
                np.testing.assert_array_equal(batch["centerbias"][sample].numpy(), expected)
    first = int(data.split_dataset("test").image_ids[0])
    second = next(i for i in range(everything.n_images)
                  if i != first and tuple(everything.shapes[i]) == tuple(everything.shapes[first]))
    with_all = BaselineCenterbias(everything, data.hparams.centerbias_bandwidth, data.hparams.centerbias_eps)
    shape = tuple(everything.shapes[first])
    assert not np.allclose(own_left_out.log_density_for_image(first), with_all.log_density(shape))
    assert not np.allclose(own_left_out.log_density_for_image(first), own_left_out.log_density_for_image(second))


def test_given_split_validates_on_a_second_dataset_and_refuses_test(tmp_path):
    """split "given": all of `path` trains, all of `val_path` validates (e.g. SALICON train / val caches); the two
    datasets' images keep distinct ids (the image cache and per-image caches are keyed by them)."""
    fixture = Path(__file__).parent / "data" / "pysaliency_mini"
    with pytest.raises(ValueError, match="split 'given' needs data.val_path"):
        SaliencyDataModule(source="pysaliency", path=str(fixture), split="given")
    data = SaliencyDataModule(source="pysaliency", path=str(fixture), val_path=str(fixture), split="given",
                              batch_size=4, image_cache_mb=16)
    data.setup("fit")
    train, val = data.split_dataset("fit"), data.split_dataset("validate")
    assert train.n_images == val.n_images == 12
    assert train.image_ids.tolist() == list(range(12)) and val.image_ids.tolist() == list(range(12, 24))
    batches = _batches(data.val_dataloader())
    assert sum(len(batch["image_index"]) for batch in batches) == 12
    for batch in batches:
        for sample, index in enumerate(batch["image_index"].tolist()):
            np.testing.assert_array_equal(batch["image"][sample].numpy(), val.load_image(index).transpose(2, 0, 1))
    with pytest.raises(DataError, match="split given, test split = validation split"):
        data.setup("test")
