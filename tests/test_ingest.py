import numpy as np
import pyarrow.parquet as pq

from pipeline import ingest
from pipeline.data.transforms import center_crop, decode


def test_train_stream_gives_every_image_once_per_epoch_in_a_new_order(tiny_shards, ray_cluster):
    ds = ingest.train_dataset(str(tiny_shards / "train"), crop=64, seed=0)
    epochs = []
    for _ in range(2):
        batches = list(ds.iter_batches(batch_size=16, batch_format="numpy"))
        assert all(b["image"].dtype == np.uint8 and b["image"].shape[1:] == (64, 64, 3) for b in batches)
        epochs.append(np.concatenate([b["label"] for b in batches]))
    truth = np.sort(pq.read_table(tiny_shards / "train", columns=["label"])["label"].to_numpy())
    for labels in epochs:
        np.testing.assert_array_equal(np.sort(labels), truth)
    assert not np.array_equal(epochs[0], epochs[1])


def test_val_stream_is_the_centre_crop_of_every_stored_image(tiny_shards, ray_cluster):
    rows = pq.read_table(tiny_shards / "val").to_pydict()
    expected = sorted(center_crop(decode(data), 64).tobytes() for data in rows["image"])
    got = []
    for batch in ingest.eval_dataset(str(tiny_shards / "val"), crop=64).iter_batches(batch_format="numpy"):
        got.extend(image.tobytes() for image in batch["image"])
    assert sorted(got) == expected
