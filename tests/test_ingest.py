import numpy as np
import pyarrow.parquet as pq

from pipeline import ingest
from pipeline.data.transforms import center_crop, decode


def test_train_stream_gives_every_image_once_per_epoch_in_a_new_order(tiny_shards, ray_cluster):
    def epoch(ds) -> tuple[np.ndarray, np.ndarray]:
        batches = list(ds.iter_batches(batch_size=16, batch_format="numpy"))
        assert all(b["image"].dtype == np.uint8 and b["image"].shape[1:] == (64, 64, 3) for b in batches)
        return np.concatenate([b["image"] for b in batches]), np.concatenate([b["label"] for b in batches])

    def dataset():  # blocks in file order, as training's IngestConfig delivers them
        ds = ingest.train_dataset(str(tiny_shards / "train"), crop=64, seed=0)
        ds.context.execution_options.preserve_order = True
        return ds

    ds = dataset()
    epochs = [epoch(ds) for _ in range(3)]
    truth = np.sort(pq.read_table(tiny_shards / "train", columns=["label"])["label"].to_numpy())
    for _, labels in epochs:
        np.testing.assert_array_equal(np.sort(labels), truth)
    assert not np.array_equal(epochs[0][1], epochs[1][1])
    # Every epoch crops and flips every image afresh: the epochs share (almost) no crop.
    crops = [{image.tobytes() for image in images} for images, _ in epochs]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert len(crops[a] & crops[b]) < len(truth) // 10, (a, b)
    # ... and the same seed gives the same epochs again.
    again = dataset()
    for (images, labels), (images2, labels2) in zip(epochs[:2], [epoch(again) for _ in range(2)], strict=True):
        np.testing.assert_array_equal(labels, labels2)
        np.testing.assert_array_equal(images, images2)


def test_val_stream_is_the_centre_crop_of_every_stored_image(tiny_shards, ray_cluster):
    rows = pq.read_table(tiny_shards / "val").to_pydict()
    expected = sorted(center_crop(decode(data), 64).tobytes() for data in rows["image"])
    got = []
    for batch in ingest.eval_dataset(str(tiny_shards / "val"), crop=64).iter_batches(batch_format="numpy"):
        got.extend(image.tobytes() for image in batch["image"])
    assert sorted(got) == expected
