"""--decode-on train: Ray Data ships the stored JPEG bytes and the train worker decodes, crops and
flips them on its device. Same run, either side decoding: the model learns as well.

(Its pixels: tests/test_ingest.py and tests/test_device.py; on a GPU: `make gpu-check`.)
"""

from pathlib import Path

import numpy as np
import pytest
from conftest import light

CHANCE = 0.75  # top-1 error of a guess among 4 classes


@pytest.fixture(scope="module")
def learnable_shards(ray_cluster, tmp_path_factory):
    """4 sample classes × (60 train + 40 val) at 72 px: small enough for minutes, big enough to learn."""
    from pipeline.data.prepare import PrepareOptions, prepare
    from pipeline.data.sample import make_sample

    root = tmp_path_factory.mktemp("learnable")
    make_sample(root / "raw", num_classes=4, train_per_class=60, val_per_class=40, seed=3)
    prepare(root / "raw", root / "shards", PrepareOptions(size=72, shard_size=64))
    return root / "shards"


@pytest.mark.slow
def test_decoding_on_the_train_worker_trains_as_well_as_decoding_in_ray_data(learnable_shards, tmp_path):
    """16 epochs of the light AlexNet (the lr ÷10 after 12), the same seed, either side decoding: both
    learn (val error far below chance) and end within a few points of each other, in error and loss."""
    from pipeline.train import checkpoint, driver

    final = {}
    for decode_on in ("data", "train"):
        cfg = light(
            data=str(learnable_shards), decode_on=decode_on, epochs=16, schedule="step", step_epochs=12,
            batch_size=8, lr=0.16, dropout=0.0, tracking=False, storage_path=str(tmp_path / "runs"),
            name=f"decode-on-{decode_on}",
        )  # fmt: skip
        summary = driver.train(cfg, log=lambda line: None)
        kept = [p for p in Path(summary.checkpoint).parent.glob("checkpoint_*") if p.is_dir()]
        latest = max(kept, key=lambda p: checkpoint.read_meta(p).epoch)
        meta = checkpoint.read_meta(latest)
        assert meta.config.decode_on == decode_on and meta.progress.epoch == cfg.epochs
        final[decode_on] = (float(np.mean(meta.progress.val_errors[-4:])), meta.epoch_metrics["val_loss"])
    (data_error, data_loss), (train_error, train_loss) = final["data"], final["train"]
    assert data_error < CHANCE - 0.2 and train_error < CHANCE - 0.2, final  # both learned
    assert abs(train_error - data_error) <= 0.08, final  # val top-1 error, mean of the last 4 epochs
    assert abs(train_loss - data_loss) <= 0.1, final
