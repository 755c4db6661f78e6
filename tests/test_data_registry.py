"""Dataset formats by registry: a reader added with one line in `data/readers.py` READERS loads through
SaliencyDataModule like the built-in formats, and the DataModule validates every source through the table."""

import numpy as np
import pytest

from deepgaze_lit.data import DataError, FixationDataset, SaliencyDataModule
from deepgaze_lit.data.readers import READERS, Reader, SourceSettings

SHAPE = (64, 80)


def read_tiny(settings: SourceSettings) -> FixationDataset:
    """Four uniform grey images (grey level 40 * (i + 1)), image i with i + 1 fixations on its diagonal."""
    counts = np.arange(1, 5)
    n = np.repeat(np.arange(4), counts)
    within = np.concatenate([np.arange(count) for count in counts])
    images = [np.full(SHAPE + (3,), 40 * (index + 1), np.uint8) for index in range(4)]
    return FixationDataset(shapes=[SHAPE] * 4, x=10.5 + 7 * within, y=3.25 + 5 * within, n=n, images=images,
                           source=f"tiny({settings.path})")


@pytest.fixture
def tiny_format(monkeypatch):
    """The one line a new format adds to READERS."""
    monkeypatch.setitem(READERS, "tiny", Reader(read_tiny, needs=("path",)))


def test_a_registered_reader_loads_through_the_data_module(tiny_format):
    data = SaliencyDataModule(source="tiny", path="somewhere", centerbias="uniform", val_images=1, batch_size=8,
                              image_cache_mb=0, split_seed=0)
    data.setup("fit")
    train, val = data.split_dataset("fit"), data.split_dataset("validate")
    assert train.source == "tiny(somewhere)" and data.summary.startswith("data tiny (tiny(somewhere)): 4 images, 10 ")
    assert train.n_images == 3 and val.n_images == 1
    assert train.n_fixations + val.n_fixations == 10
    batches = list(data.train_dataloader())
    assert len(batches) == 1
    batch = batches[0]
    assert batch["image"].shape == (3, 3) + SHAPE
    for sample, index in enumerate(batch["image_index"].tolist()):
        image_id = int(train.image_ids[index])
        assert batch["image"][sample].unique().tolist() == [40 * (image_id + 1)]
        mine = batch["fix_batch"] == sample
        assert mine.sum() == image_id + 1
        assert batch["fix_x"][mine].tolist() == [10.5 + 7 * k for k in range(image_id + 1)]
        assert batch["fix_y"][mine].tolist() == [3.25 + 5 * k for k in range(image_id + 1)]
        assert batch["x_hist"][sample, 0] == SHAPE[1] / 2 and batch["y_hist"][sample, 0] == SHAPE[0] / 2


def test_the_registry_validates_sources(tiny_format):
    with pytest.raises(DataError, match=r"source 'tiny' needs data.path \(the dataset or image folder\)"):
        SaliencyDataModule(source="tiny")
    with pytest.raises(DataError, match=r"source 'csv' needs data.csv_path \(the CSV of fixations\)"):
        SaliencyDataModule(source="csv", path="images")
    with pytest.raises(DataError, match=r"unknown data.source 'hdf9'; expected one of 'synthetic', 'pysaliency', "
                                         r"'mit1003', 'csv', 'tiny' \(.*data/readers.py\)"):
        SaliencyDataModule(source="hdf9")


def test_the_built_in_formats_are_registered():
    assert list(READERS) == ["synthetic", "pysaliency", "mit1003", "csv"]
    assert [READERS[name].needs for name in READERS] == [(), ("path",), ("path",), ("path", "csv_path")]
