"""A 2-process CPU (gloo) run of the console script: equal training batches per rank although the data do not
divide evenly, every validation image seen exactly once, and validation metrics equal to a 1-process validation
of the same checkpoint."""

import pytest

from helpers_multiprocess import (MAX_EPOCHS, STEPS_PER_EPOCH, base_env, callback_args, checkpoint_dir,
                                  load_checkpoint, read_records, reference_run, run)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

VAL_IMAGES = 5


def test_two_processes_train_on_equal_batches_and_see_each_validation_image_once():
    folder = reference_run(2)
    ranks = read_records(folder / "records", "fit")
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    # 5 training batches per epoch, padded to 3 per rank; no rank waits for the other.
    expected_batches = {str(epoch): STEPS_PER_EPOCH[2] for epoch in range(MAX_EPOCHS)}
    assert [rank["train_batches"] for rank in ranks] == [expected_batches, expected_batches]
    seen = [rank["val_images"] for rank in ranks]
    assert sorted(map(len, seen)) == [2, 3]
    assert sorted(seen[0] + seen[1]) == list(range(VAL_IMAGES))
    assert ranks[0]["weights"] == ranks[1]["weights"]
    last = load_checkpoint(checkpoint_dir(folder, "reference") / "last.ckpt")
    assert last["global_step"] == MAX_EPOCHS * STEPS_PER_EPOCH[2]


def test_two_process_validation_metrics_equal_one_process_validation_of_the_same_checkpoint(tmp_path):
    folder = reference_run(2)
    logged = read_records(folder / "records", "fit")[0]["val_metrics"]
    code = run(["validate", "--config", str(folder / "reference.yaml"), "--ckpt_path", "last",
                *callback_args("RankRecorder", folder=tmp_path)], base_env(), tmp_path / "validate.log")
    assert code == 0, (tmp_path / "validate.log").read_text()
    (single,) = read_records(tmp_path, "validate")
    assert single["world_size"] == 1
    assert sorted(single["val_images"]) == list(range(VAL_IMAGES))
    assert {"val/loss", "val/ig", "val/nss", "val/auc", "val/sauc", "val/gold_ig"} <= logged.keys()
    assert single["val_metrics"].keys() == logged.keys()
    for name, value in logged.items():
        assert single["val_metrics"][name] == pytest.approx(value, rel=1e-9, abs=0), name
