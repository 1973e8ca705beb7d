import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.data.transforms import center_crop, decode
from pipeline.train import ingest


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


def test_decoding_on_the_train_worker_gives_the_data_paths_validation_pixels(tiny_shards, ray_cluster):
    """--decode-on train: the bytes travel, the worker's centre crops equal the data path's, bit for bit."""
    feed = ingest.Feed("train", crop=64, seed=0, device=torch.device("cpu"))
    data_path, worker, labels = [], [], []
    for batch in ingest.eval_dataset(str(tiny_shards / "val"), crop=64).iter_batches(
        batch_size=8, batch_format="numpy"
    ):
        data_path.extend(image.tobytes() for image in batch["image"])
    shard = ingest.eval_dataset(str(tiny_shards / "val"), crop=64, decode_on="train")
    shard.context.execution_options.preserve_order = True
    for batch in feed.batches(shard.iterator(), batch_size=8):
        assert batch["image"].dtype == object  # the stored JPEG bytes, not decoded pixels
        images, batch_labels = feed.tensors(batch)
        assert images.dtype == torch.uint8 and images.shape[1:] == (64, 64, 3) and images.is_contiguous()
        worker.extend(image.numpy().tobytes() for image in images)
        labels.extend(batch_labels.tolist())
    assert sorted(worker) == sorted(data_path)
    assert sorted(labels) == sorted(pq.read_table(tiny_shards / "val", columns=["label"])["label"].to_pylist())


def test_decoding_on_the_train_worker_crops_every_image_once_per_epoch_anew_and_repeats_with_the_seed(
    tiny_shards, ray_cluster
):
    rows = pq.read_table(tiny_shards / "train").to_pydict()
    windows = {}  # every 64-px window of every stored image and of its mirror → its label
    for data, label in zip(rows["image"], rows["label"], strict=True):
        image = decode(data)
        for view in (image, image[:, ::-1]):
            for top in range(image.shape[0] - 63):
                for left in range(image.shape[1] - 63):
                    windows[np.ascontiguousarray(view[top : top + 64, left : left + 64]).tobytes()] = label

    def epochs(n):
        ds = ingest.train_dataset(str(tiny_shards / "train"), crop=64, seed=0, decode_on="train")
        ds.context.execution_options.preserve_order = True
        feed, shard = ingest.Feed("train", crop=64, seed=0, device=torch.device("cpu")), ds.iterator()
        out = []
        for epoch in range(1, n + 1):
            crops, labels = [], []
            for batch in feed.batches(shard, batch_size=16, drop_last=True):
                images, batch_labels = feed.tensors(batch, epoch)
                crops.extend(image.numpy().tobytes() for image in images)
                labels.extend(batch_labels.tolist())
            out.append((crops, labels))
        return out

    first = epochs(2)
    for crops, labels in first:
        assert len(crops) == len(rows["label"]) // 16 * 16
        assert [windows.get(crop) for crop in crops] == labels  # a window of its own image (or mirror)
    assert first[0][1] != first[1][1]  # another order
    assert len(set(first[0][0]) & set(first[1][0])) < len(rows["label"]) // 10  # other crops
    assert epochs(2) == first  # the same seed: the same epochs
