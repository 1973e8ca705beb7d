"""Batch inference with a registered model over real image files, on local disk and in a real S3 server."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
import torch
from conftest import REGISTERED_MODEL, S3_ENV, S3_KEY_ID, S3_SECRET, SECRET, call_job, free_port, job_env, run_job
from mlflow import MlflowClient
from PIL import Image

from pipeline import outputs
from pipeline.cluster.resources import GpuCapacity
from pipeline.data.transforms import center_crop, load_square, ten_crop
from pipeline.scoring import files, inference, loading, pool
from pipeline.storage import locate


def _photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((width, height), Image.BICUBIC)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


@pytest.fixture(scope="module")
def image_files() -> dict[str, bytes]:
    """Relative path → bytes: images of several sizes, formats and colour modes, broken files, strays."""
    good = {
        "a/wide.jpg": _encode(_photo(320, 200, 1), "JPEG", quality=90),
        "a/tall.JPEG": _encode(_photo(90, 150, 2), "JPEG", quality=90),
        "a/deep/nested/small.jpeg": _encode(_photo(70, 64, 3), "JPEG", quality=90),
        "b/gray.jpg": _encode(_photo(120, 100, 4).convert("L"), "JPEG"),
        "b/cmyk.jpg": _encode(_photo(110, 130, 5).convert("CMYK"), "JPEG"),
        "b/alpha.png": _encode(_photo(100, 100, 6).convert("RGBA"), "PNG"),
        "b/photo.WebP": _encode(_photo(150, 90, 7), "WEBP"),
        "b/png-named.jpg": _encode(_photo(96, 96, 8), "PNG"),
    }
    broken = {
        "c/truncated.jpg": _encode(_photo(200, 200, 9), "JPEG", quality=90)[:700],
        "c/empty.jpg": b"",
        "c/not-an-image.jpeg": b"this is text, not a JPEG\n",
    }
    strays = {"c/.DS_Store": b"\x00\x01", "c/readme.txt": b"notes"}
    return {**good, **broken, **strays}


BROKEN = {"c/truncated.jpg", "c/empty.jpg", "c/not-an-image.jpeg"}
STRAYS = {"c/.DS_Store", "c/readme.txt"}


@pytest.fixture(scope="module")
def image_dir(image_files, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for rel, data in image_files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def model(trained):
    """The session's first registered version, resolved and loaded once for the module."""
    ref = loading.resolve(f"models:/{REGISTERED_MODEL}/{trained.first.model_version}", trained.tracking_uri)
    return ref, loading.load(ref)


def _run(ref, input_uri: str, output_uri: str, **options) -> inference.InferenceSummary:
    source, output, chosen = locate(input_uri), locate(output_uri), inference.InferenceOptions(**options)
    return inference.infer(ref, source, inference.prepare_output(ref, source, output, chosen), chosen)


def _expected(model, ref, data: bytes, ten: bool) -> np.ndarray:
    """A direct PyTorch forward on the same preprocessed tensors: softmax, averaged over the views."""
    square = np.asarray(load_square(data, ref.image_size))
    views = ten_crop(square, ref.crop) if ten else center_crop(square, ref.crop)[None]
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(np.ascontiguousarray(views))).float(), dim=1).mean(0).numpy()


def _check_rows(table, root_uri: str, image_files, model, ref, ten: bool) -> None:
    rows = {r["path"]: r for r in table.to_pylist()}
    images = {rel for rel in image_files if rel not in STRAYS}
    assert sorted(rows) == sorted(f"{root_uri}/{rel}" for rel in images)  # exactly one row per image file
    for rel in images:
        row = rows[f"{root_uri}/{rel}"]
        assert row["model_uri"] == ref.uri and row["model_version"] == ref.version
        if rel in BROKEN:
            assert row["error"] and row["top1_wnid"] is None and row["top5_probs"] is None, rel
            continue
        assert row["error"] is None, (rel, row["error"])
        probs = _expected(model, ref, image_files[rel], ten)
        top5 = np.argsort(-probs, kind="stable")[:5]
        np.testing.assert_allclose(row["top5_probs"], probs[top5], rtol=1e-4, atol=1e-6)
        assert row["top5_wnids"] == [ref.wnids[i] for i in top5]
        assert row["top5_names"] == [ref.names[i] for i in top5]
        assert (row["top1_wnid"], row["top1_name"]) == (ref.wnids[top5[0]], ref.names[top5[0]])
        assert row["top1_prob"] == pytest.approx(float(probs[top5[0]]), rel=1e-4)


def test_a_listing_streams_names_into_parquet_and_reports_names_that_are_not_utf8_and_link_loops(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    for name in ("ok.jpg", "b.PNG", "c.webp", "d.jpeg", "notes.txt"):
        (tmp_path / "a" / name).write_bytes(b"x")
    with open(os.fsencode(tmp_path / "a") + b"/caf\xe9.jpg", "wb") as f:  # Latin-1 bytes in the name
        f.write(b"x")
    (tmp_path / "a" / "loop").symlink_to(tmp_path)  # back up the tree
    (tmp_path / "again").symlink_to(tmp_path / "a")  # a second way into the same folder
    monkeypatch.setattr(files, "LISTING_ROWS", 3)  # the driver holds 3 names at a time
    folder = locate(tmp_path.parent / f"{tmp_path.name}-listing")
    listing = files.write_listing(locate(tmp_path), folder)
    assert (listing.images, listing.ignored, len(listing.files)) == (4, 1, 2)
    names = [n for f in listing.files for n in pq.read_table(f)["path"].to_pylist()]
    assert sorted(names) == sorted(str(tmp_path / "a" / n) for n in ("ok.jpg", "b.PNG", "c.webp", "d.jpeg"))
    reasons = dict(listing.unlisted)
    assert reasons[f"{tmp_path}/a/caf\\xe9.jpg"].startswith("its name is not UTF-8")
    assert sum("already listed" in why for why in reasons.values()) == 2, reasons
    assert files.read_listing(folder) == listing  # what a rerun of the job reads instead of listing again


@pytest.mark.slow
def test_every_local_image_gets_one_row_equal_to_a_direct_ten_crop_forward(model, image_dir, image_files, tmp_path):
    # Ten views per image here; the centre crop (the job's default) in the S3 test below.
    ref, loaded = model
    ten = True
    summary = _run(ref, str(image_dir), str(tmp_path / "preds"), ten_crop_views=ten, batch_size=4)
    assert (summary.images, summary.scored, summary.errors, summary.ignored) == (
        len(image_files) - 2, len(image_files) - 2, len(BROKEN), 2
    )  # fmt: skip
    assert summary.reasons == {"cannot decode": 2, "empty file": 1}
    table = inference.read_predictions(locate(tmp_path / "preds"))
    assert table.schema == inference.SCHEMA
    _check_rows(table, str(image_dir), image_files, loaded, ref, ten)
    errors = {Path(r["path"]).name: r["error"] for r in table.to_pylist() if r["error"]}
    assert errors["empty.jpg"] == "empty file (0 bytes)"
    assert errors["not-an-image.jpeg"].startswith("cannot decode: UnidentifiedImageError")
    assert sorted(p.name for p in (tmp_path / "preds").iterdir() if not p.name.endswith(".parquet")) == [
        outputs.SUCCESS_FILE
    ]  # the job's own state (_JOB.json, _listing) is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds"]  # and its checkpoint


@pytest.mark.slow
def test_the_job_reads_and_writes_s3_and_replaces_an_output_only_with_overwrite(
    ray_cluster, trained, model, image_files, s3_server
):
    ref, loaded = model
    assert ref.version == trained.first.model_version == "1"  # the version the job below names
    s3_server.create_dir("photos")
    s3_server.create_dir("preds")
    for rel, data in image_files.items():
        with s3_server.open_output_stream(f"photos/incoming/{rel}") as f:
            f.write(data)
    env = job_env(ray_cluster, trained.tracking_uri)
    args = [
        "--model", f"models:/{REGISTERED_MODEL}/1", "--input", "s3://photos/incoming/", "--output", "s3://preds/run1/",
        "--replicas", "1:2", "--batch-size", "4",
    ]  # fmt: skip
    proc = run_job("jobs/infer.py", *args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(image_files) - 2} images scored" in proc.stdout
    assert f"{len(BROKEN)} failed (2 cannot decode, 1 empty file)" in proc.stdout
    assert "ignoring 2 files without an image extension" in proc.stdout
    # The job joined the session's cluster: its workers read S3 and MLflow with their own credentials,
    # and Ray's job table (what the dashboard shows) holds where the services are, never who the job is.
    assert "credentials not sent to the cluster's workers: MLFLOW_TRACKING_USERNAME" in proc.stdout
    from ray.util.state import list_jobs

    jobs = list_jobs(address=ray_cluster.get_runtime_context().gcs_address, detail=True)
    (job,) = [j for j in jobs if "s3://preds/run1/" in (j.entrypoint or "")]
    assert job.runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == S3_ENV["AWS_ENDPOINT_URL"]
    assert job.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == trained.tracking_uri
    shown = json.dumps(dataclasses.asdict(job) if dataclasses.is_dataclass(job) else dict(job), default=str)
    assert SECRET not in shown and S3_SECRET not in shown and S3_KEY_ID not in shown
    output = locate("s3://preds/run1")
    _check_rows(inference.read_predictions(output), "s3://photos/incoming", image_files, loaded, ref, False)

    again = call_job("jobs/infer.py", *args)  # the same job again, in this process
    assert again.returncode == 2 and "already exists (finished); pass --overwrite" in again.stderr
    with s3_server.open_output_stream("preds/run1/stale-from-an-older-run.parquet") as f:
        f.write(b"old")
    replaced = call_job("jobs/infer.py", *args, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    stored = [i.path for i in s3_server.get_file_info(pafs.FileSelector("preds", recursive=True)) if i.is_file]
    assert "preds/run1/stale-from-an-older-run.parquet" not in stored  # replaced whole, never a mixture
    assert not [p for p in stored if ".checkpoint/" in p or "/_listing/" in p or p.endswith("_JOB.json")]
    assert inference.read_predictions(output).num_rows == len(image_files) - 2


@pytest.mark.slow
def test_an_alias_is_resolved_once_to_the_version_every_model_actor_loads(trained):
    champion = MlflowClient(trained.tracking_uri).get_model_version_by_alias(REGISTERED_MODEL, "champion")
    ref = loading.resolve(f"models:/{REGISTERED_MODEL}@champion", trained.tracking_uri)
    assert ref.uri == f"models:/{REGISTERED_MODEL}@champion"  # what tables and rows show, as the user named it
    assert ref.version == champion.version and ref.version_uri == f"models:/{REGISTERED_MODEL}/{champion.version}"
    version = loading.resolve(ref.version_uri, trained.tracking_uri)
    assert (version.run_id, version.crop, version.wnids, version.image_size) == (
        ref.run_id,
        ref.crop,
        ref.wnids,
        ref.image_size,
    )


@pytest.mark.slow
def test_model_actors_load_the_files_the_driver_shipped_and_never_log_in_to_mlflow(ray_cluster, model):
    ref, loaded = model
    shipped = loading.ship(ref)
    views = np.random.default_rng(0).integers(0, 255, (2, 1, ref.crop, ref.crop, 3), dtype=np.uint8)

    # A worker whose node's MLflow login is wrong: it would get HTTP 401 from the server if it asked.
    @ray.remote(runtime_env={"env_vars": {"MLFLOW_TRACKING_PASSWORD": "not-the-password"}})
    def score(model_ref, batch):
        return loading.Predictor(model_ref, lambda probs, _: probs.numpy())({"image": batch})

    with torch.no_grad():
        expected = torch.softmax(loaded(torch.from_numpy(views[:, 0])).float(), dim=1).numpy()
    np.testing.assert_allclose(ray.get(score.remote(shipped, views))[:, 0], expected, rtol=1e-4, atol=1e-6)
    # The actor loads only the bytes the driver checked: others (changed on the way, a swapped ref) are refused.
    changed = bytearray(ref.program)
    changed[len(changed) // 2] ^= 0xFF
    swapped = dataclasses.replace(shipped, program=ray.put(bytes(changed)))
    with pytest.raises(ray.exceptions.RayTaskError, match="the model's bytes are not the ones checked"):
        ray.get(score.remote(swapped, views))


@pytest.mark.slow
@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--input", "s3://no-such-bucket/x/"], "input s3://no-such-bucket/x does not exist"),
        (["--input", "s3://photos/no/such/prefix/"], "does not exist: check the bucket or prefix"),
        (["--input", "EMPTY"], "no images (.jpg, .jpeg, .png, .webp) under"),
        (["--model", f"models:/{REGISTERED_MODEL}@gold"], f"cannot load models:/{REGISTERED_MODEL}@gold"),
        (["--model", "models:/no-such-model/1"], "cannot load models:/no-such-model/1"),
        (["--output", "s3://no-such-bucket/preds/"], "bucket s3://no-such-bucket does not exist"),
        (["--replicas", "4:2"], "argument --replicas: '4:2' is not N, MIN:MAX (1 <= MIN <= MAX) or auto"),
        (["--tracking", "DEAD"], "does not answer"),
        (["--output", "s3://photos"], "--output s3://photos is a bucket root: name a prefix in it"),
        (["--output", "INSIDE"], "is inside --input"),
        (["--output", "."], "is or holds the working directory"),
    ],
)
def test_bad_input_fails_fast_with_a_message_before_any_cluster_work(
    model, image_dir, s3_server, tmp_path, arguments, message
):  # `model` points MLflow at the session's server, which call_job's jobs use
    s3_server.create_dir("photos")
    (tmp_path / "empty").mkdir()
    values = {"--model": f"models:/{REGISTERED_MODEL}/1", "--input": str(image_dir), "--output": str(tmp_path / "out")}
    dead_server = False
    for flag, value in zip(arguments[::2], arguments[1::2], strict=True):
        if flag == "--tracking":
            dead_server = True
        else:
            values[flag] = {"EMPTY": str(tmp_path / "empty"), "INSIDE": str(image_dir / "c" / "preds")}.get(
                value, value
            )
    args = [x for kv in values.items() for x in kv]
    if dead_server:  # as a process of its own, started by a user: no Ray is started, nothing is written
        env = job_env(tracking_uri=f"http://127.0.0.1:{free_port()}")
        proc = run_job("jobs/infer.py", *args, env=env, timeout=300)
        assert "Ray" not in proc.stdout
    else:
        proc = call_job("jobs/infer.py", *args)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_overwrite_replaces_only_predictions_and_never_touches_the_input(model, image_dir, tmp_path):
    before = {p: p.stat().st_size for p in image_dir.rglob("*")}
    base = ["--model", f"models:/{REGISTERED_MODEL}/1", "--input", str(image_dir), "--overwrite", "--output"]
    for output, message in [
        (image_dir, f"--output {image_dir} is --input {image_dir}"),
        (image_dir / "c", "is inside --input"),
        (image_dir.parent, f"--output {image_dir.parent} holds --input {image_dir}"),
    ]:
        refused = call_job("jobs/infer.py", *base, str(output))
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    # A folder of other files is not an output this job wrote, --overwrite or not.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    refused = call_job("jobs/infer.py", *base, str(tmp_path / "notes"))
    assert refused.returncode == 2 and "holds files jobs/infer.py did not write" in refused.stderr
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert {p: p.stat().st_size for p in image_dir.rglob("*")} == before, "the input tree is intact"


class _Payload(torch.nn.Module):
    """A model whose pickle runs code when loaded: here, it creates a file."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = str(marker)

    def forward(self, x):
        return x

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_a_version_whose_loading_would_run_code_is_refused_before_any_cluster_work(
    model, image_dir, tiny_shards, tmp_path
):  # `model`: MLflow points at the session's server, where the version is registered
    import mlflow

    marker = tmp_path / "the-payload-ran"
    with mlflow.start_run(run_name="payload"):
        info = mlflow.pytorch.log_model(
            _Payload(marker), name="model", serialization_format="pickle", pip_requirements=["torch"],
            registered_model_name="payload",
        )  # fmt: skip
    # As MLflow loads it by default, the payload runs (and returns an open file, not a model): the threat is real.
    with pytest.raises(AttributeError, match="has no attribute 'eval'"):
        mlflow.pytorch.load_model(info.model_uri)
    assert marker.exists()
    marker.unlink()

    version = f"models:/payload/{info.registered_model_version}"
    for job, args in (
        ("jobs/infer.py", ["--input", str(image_dir), "--output", str(tmp_path / "out")]),
        ("jobs/evaluate.py", ["--data", str(tiny_shards)]),
    ):
        refused = call_job(job, "--model", version, *args)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert f"error: {version} is saved in pickle format, whose loading runs code from the file" in refused.stderr
        assert "model.pth" in refused.stderr
    with pytest.raises(loading.ModelError, match="pickle format"):
        loading.resolve(version, mlflow.get_tracking_uri())
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_version_with_a_pickle_module_beside_its_program_is_refused_and_the_module_never_imported(
    model, image_dir, tiny_shards, tmp_path, monkeypatch
):  # `model`: MLflow points at the session's server, where the version is registered
    """model.pt2 passes a check that looks for it; MLflow's loader would still import the module that
    data/pickle_module_info.txt names (and put a code/ folder first on sys.path) before refusing pickle."""
    import mlflow

    ref, _ = model
    client = MlflowClient()
    files = Path(
        mlflow.artifacts.download_artifacts(f"models:/{REGISTERED_MODEL}/{ref.version}", dst_path=str(tmp_path / "v"))
    )
    marker = tmp_path / "the-module-was-imported"
    probe = tmp_path / "modules" / "alexnet_smuggled_probe.py"
    probe.parent.mkdir()
    probe.write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(probe.parent))  # importable here, as an installed package would be
    (files / "data" / "pickle_module_info.txt").write_text("alexnet_smuggled_probe")
    torch.save({"weights": torch.zeros(1)}, files / "data" / "model.pth")
    run_id = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    client.log_artifacts(run_id, str(files), "model")
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    client.create_registered_model("smuggled")
    version = f"models:/smuggled/{client.create_model_version('smuggled', source, run_id=run_id).version}"

    # As MLflow loads it, even with pickle deserialisation off, the module is imported: the threat is real.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(mlflow.exceptions.MlflowException, match="Deserializing model using pickle is disallowed"):
        mlflow.pytorch.load_model(version, dst_path=str(tmp_path))
    assert marker.exists()
    marker.unlink()
    del sys.modules["alexnet_smuggled_probe"]

    for job, args in (
        ("jobs/infer.py", ["--input", str(image_dir), "--output", str(tmp_path / "out")]),
        ("jobs/evaluate.py", ["--data", str(tiny_shards)]),
    ):
        refused = call_job(job, "--model", version, *args)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert (
            f"error: {version} holds data/model.pth, data/pickle_module_info.txt beside its torch.export program"
            in refused.stderr
        )
    assert not marker.exists() and "alexnet_smuggled_probe" not in sys.modules
    assert not (tmp_path / "out").exists()


def test_a_version_holding_more_than_a_program_and_its_metadata_is_refused(tmp_path):
    """Checked on the files themselves: links, a code/ folder, strays beside the program."""
    from mlflow.models import Model

    from pipeline.scoring import model_files

    def version(*extra: str) -> Path:
        root = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        (root / "data").mkdir(parents=True)
        (root / "data" / "model.pt2").write_bytes(b"PK")
        model = Model()
        model.add_flavor("pytorch", model_data="data", pytorch_version=str(torch.__version__))
        model.save(str(root / "MLmodel"))
        for rel in extra:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text("x")
        return root

    cases = {
        ("code/evil.py",): "carries code of its own (code/)",
        ("data/notes.txt",): "holds data/notes.txt beside its torch.export program",
        ("loader.py",): "holds files a version jobs/train.py registers does not (loader.py)",
    }
    for extra, message in cases.items():
        with pytest.raises(loading.ModelError, match=re.escape(message)):
            model_files.check(version(*extra), "models:/x/1")
    linked = version()
    (linked / "extra_files").mkdir()
    (linked / "extra_files" / "classes.json").symlink_to("/etc/hostname")
    with pytest.raises(loading.ModelError, match="extra_files/classes.json is not a regular file"):
        model_files.check(linked, "models:/x/1")
    with pytest.raises(
        loading.ModelError, match="is not a torch.export archive"
    ):  # b"PK" is no archive: refused, not read
        model_files.check(version(), "models:/x/1")


def _shape(actors: pool.Pool) -> tuple[int, int, float]:
    return actors.smallest, actors.largest, actors.gpus


def test_model_actors_are_a_number_a_range_or_auto_and_use_gpus_where_the_cluster_has_or_can_add_them():
    none, eight, addable = GpuCapacity(0.0), GpuCapacity(8.0), GpuCapacity(0.0, addable=4.0)
    assert pool.plan("3", "auto", none, 6.0) == pool.Pool(3, 3, 0.0, none.describe() + "; --gpus-per-replica decides")
    assert pool.plan("1:8", 0.0, eight, 6.0) == pool.Pool(1, 8, 0.0, "--gpus-per-replica")  # CPUs when told
    assert _shape(pool.plan("auto", "auto", none, 6.0)) == (1, 6, 0.0)  # 1 up to the CPUs (evaluation)
    assert _shape(pool.plan("auto", "auto", none, 6.0, whole=True)) == (6, 6, 0.0)  # inference: all from the start
    assert _shape(pool.plan("auto", "auto", none, 0.0, whole=True)) == (1, 1, 0.0)  # a head alone, nodes to come
    assert _shape(pool.plan("auto", "auto", eight, 64.0)) == (1, 8, 1.0)  # 1 up to the GPUs, one each
    assert _shape(pool.plan("auto", "auto", eight, 64.0, whole=True)) == (8, 8, 1.0)
    assert _shape(pool.plan("auto", 0.5, eight, 64.0, whole=True)) == (16, 16, 0.5)
    assert _shape(pool.plan("auto", "auto", addable, 0.0, whole=True)) == (1, 4, 1.0)  # GPU nodes to be added
    assert pool.plan("2", "auto", eight, 64.0).describe() == (
        "model replicas: 2, 1 GPU each (the cluster has 8 GPU(s); --gpus-per-replica decides)"
    )
    assert pool.plan("auto", "auto", eight, 64.0, whole=True).decoding(64.0) == (
        "decoding: CPU tasks on the CPUs the replicas leave (56 now): at ~740 images/s per core, ~41,440 images/s; "
        "add CPU nodes if the GPUs wait"
    )
    assert pool.plan("auto", "auto", none, 6.0).decoding(6.0).startswith("decoding: inside each replica")
    for bad in ("0", "x", "2:1", "a:b"):
        with pytest.raises(pool.PoolError, match="--replicas"):
            pool.parse_replicas(bad)


def test_a_file_that_cannot_be_read_says_why_and_never_blocks_or_reads_past_the_limit(tmp_path):
    """What becomes a file's error row (inference) or bad-file entry (preparation), never a crash of the job."""
    from pipeline.storage import UnreadableFile

    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8" + b"x" * 2000)
    os.mkfifo(tmp_path / "fifo.jpg")  # opening it for reading would block for ever
    (tmp_path / "nothing.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "zeros.jpg").symlink_to("/dev/zero")  # would never end
    (tmp_path / "folder.jpg").mkdir()
    cases = {
        "fifo.jpg": "not a regular file (a FIFO)",
        "nothing.jpg": "a link to nothing",
        "zeros.jpg": "not a regular file (a character device)",
        "folder.jpg": "not a regular file (a folder)",
        "vanished.jpg": "file not found: gone since the input was listed",
        "photo.jpg": "2,002 bytes, over the 0.000954 MiB limit for one file (--max-file-mb): not read",
    }
    for name, reason in cases.items():
        with pytest.raises(UnreadableFile, match=re.escape(reason)):
            locate(tmp_path / name).read_input(max_bytes=1000)
    assert len(locate(tmp_path / "photo.jpg").read_input()) == 2002
    # Listed with the files, so that reading them puts them in the output (a folder is walked into).
    files, unlisted = locate(tmp_path).walk()
    assert sorted(Path(f).name for f in files) == ["fifo.jpg", "nothing.jpg", "photo.jpg", "zeros.jpg"]
    assert unlisted == []


@pytest.mark.slow
def test_files_that_cannot_be_read_are_rows_with_their_reason(model, image_files, tmp_path):
    ref, _ = model
    root = tmp_path / "bucket"
    root.mkdir()
    (root / "good.jpg").write_bytes(image_files["a/wide.jpg"])
    (root / "large.jpg").write_bytes(image_files["a/wide.jpg"] + b"\0" * 300_000)
    os.mkfifo(root / "fifo.jpg")
    (root / "nothing.jpg").symlink_to(root / "gone.jpg")
    out = tmp_path / "out"
    proc = call_job(
        "jobs/infer.py", "--model", ref.version_uri, "--input", root, "--output", out, "--max-file-mb", "0.25"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {Path(r["path"]).name: r for r in inference.read_predictions(locate(out)).to_pylist()}
    assert sorted(rows) == ["fifo.jpg", "good.jpg", "large.jpg", "nothing.jpg"]
    assert rows["good.jpg"]["error"] is None and rows["good.jpg"]["top1_wnid"]
    assert rows["fifo.jpg"]["error"] == "not a regular file (a FIFO)"
    assert rows["nothing.jpg"]["error"] == "a link to nothing"
    assert "over the 0.25 MiB limit for one file" in rows["large.jpg"]["error"]
    assert "4 images scored" in proc.stdout
    assert "3 failed (1 a link to nothing, 1 not a regular file, 1 too large)" in proc.stdout


# ---- resumable and incremental ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """400 small JPEGs: enough Parquet files that a job can be stopped between two of them."""
    root = tmp_path_factory.mktemp("many")
    for i in range(400):
        (root / f"d{i % 4}").mkdir(exist_ok=True)
        (root / f"d{i % 4}" / f"{i:04d}.jpg").write_bytes(_encode(_photo(48, 40, 100 + i), "JPEG", quality=80))
    return root


def _committed(output: str) -> int:
    return inference.committed_rows(inference.checkpoint_of(locate(output)))


@pytest.mark.slow
@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_job_stopped_part_way_resumes_with_the_same_command_to_the_rows_of_an_uninterrupted_run(
    ray_cluster, trained, model, many_images, s3_server, tmp_path, store
):
    ref, _ = model
    if store == "s3":
        s3_server.create_dir("resume")
        for path in many_images.rglob("*.jpg"):
            with s3_server.open_output_stream(f"resume/in/{path.relative_to(many_images)}") as f:
                f.write(path.read_bytes())
        source, output, reference = "s3://resume/in", "s3://resume/preds", "s3://resume/uninterrupted"
    else:
        source, output, reference = str(many_images), str(tmp_path / "preds"), str(tmp_path / "uninterrupted")
    args = [
        "--model",
        ref.version_uri,
        "--input",
        source,
        "--replicas",
        "1",
        "--batch-size",
        "4",
        "--rows-per-file",
        "1",
    ]
    whole = call_job("jobs/infer.py", *args, "--output", reference)
    assert whole.returncode == 0, whole.stderr[-3000:]

    # The same job as a process of its own on the session's cluster, stopped (SIGTERM, as `ray job stop`
    # sends) once some of its Parquet files are committed.
    command = [sys.executable, "jobs/infer.py", *args, "--output", output, "--progress-interval", "0.5"]
    job = subprocess.Popen(command, env=job_env(ray_cluster, trained.tracking_uri), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parents[1])  # fmt: skip
    deadline = time.time() + 240
    while _committed(output) < 40 and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 130, stdout[-2000:] + stderr[-3000:]
    kept = _committed(output)
    assert f"stopped: the rows scored so far are kept in {output}; run the same command again" in stderr
    assert 0 < kept < 400, kept
    assert re.search(r"scored \d+ of 400 \(\d+%\), \d+ images/s", stdout), stdout[-2000:]  # progress lines
    assert not locate(output).join(outputs.SUCCESS_FILE).is_file()

    if store == "local":  # another version, or other preprocessing, never adds rows to this output
        other = f"models:/{REGISTERED_MODEL}/{trained.second.model_version}"
        refused = call_job("jobs/infer.py", *args[2:], "--model", other, "--output", output, "--ten-crop")
        assert refused.returncode == 2, refused.stdout[-2000:]
        assert f"was begun by another job ({kept} rows so far)" in refused.stderr
        assert f"model: {ref.version_uri} then, {other} now" in refused.stderr
        assert "--ten-crop: false then, true now" in refused.stderr and "--restart" in refused.stderr
        assert _committed(output) == kept

    resumed = call_job("jobs/infer.py", *args, "--output", output)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming: {kept} of 400 files were scored by an earlier run of this job" in resumed.stdout
    assert f"{400 - kept} images scored" in resumed.stdout and f"{kept} scored before the job was resumed" in (
        resumed.stdout
    )
    first, second = (inference.read_predictions(locate(o)).sort_by("path") for o in (reference, output))
    assert second.num_rows == 400 and len(set(second["path"].to_pylist())) == 400
    assert second.equals(first), "the same rows and predictions as a run that was never stopped"
    record = json.loads(locate(output).join(outputs.SUCCESS_FILE).read_text())
    assert (record["rows"], record["resumed"], record["model_version"]) == (400, kept, ref.version)
    assert inference.checkpoint_of(locate(output)).info().type == pafs.FileType.NotFound


@pytest.mark.slow
def test_restart_deletes_an_unfinished_output_and_scores_it_whole(model, image_dir, image_files, tmp_path):
    ref, loaded = model
    output = tmp_path / "preds"
    source, chosen = locate(image_dir), inference.InferenceOptions(batch_size=4)
    plan = inference.prepare_output(ref, source, locate(output), chosen)
    inference.list_input(source, plan)  # begun, then stopped before any row
    (output / "stray-from-the-job.parquet").write_bytes(b"half")  # what a stop can leave (not committed)
    refused = call_job("jobs/infer.py", "--model", ref.version_uri, "--input", image_dir, "--output", output,
                       "--max-file-mb", "1")  # fmt: skip
    assert refused.returncode == 2 and "--max-file-mb: 64 MiB then, 1 MiB now" in refused.stderr, refused.stderr
    again = call_job("jobs/infer.py", "--model", ref.version_uri, "--input", image_dir, "--output", output,
                     "--max-file-mb", "1", "--restart")  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "--restart: deleting the unfinished predictions" in again.stdout
    _check_rows(inference.read_predictions(locate(output)), str(image_dir), image_files, loaded, ref, False)


@pytest.mark.slow
def test_skip_scored_scores_only_the_files_no_previous_output_holds(model, image_files, tmp_path):
    ref, _ = model
    bucket, days = tmp_path / "bucket", tmp_path / "preds"
    good = [rel for rel in image_files if rel not in BROKEN and rel not in STRAYS]
    for rel in good[:5] + ["c/truncated.jpg"]:
        (bucket / rel).parent.mkdir(parents=True, exist_ok=True)
        (bucket / rel).write_bytes(image_files[rel])
    base = ["--model", ref.version_uri, "--input", bucket]
    first = call_job("jobs/infer.py", *base, "--output", days / "day1")
    assert first.returncode == 0, first.stderr[-3000:]
    for rel in good[5:]:  # the bucket grows
        (bucket / rel).parent.mkdir(parents=True, exist_ok=True)
        (bucket / rel).write_bytes(image_files[rel])

    second = call_job("jobs/infer.py", *base, "--output", days / "day2", "--skip-scored", days / "day1")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "skipping 5 files scored in previous outputs" in second.stdout
    rows = {r["path"]: r for r in inference.read_predictions(locate(days / "day2")).to_pylist()}
    # The new files, and the one that failed yesterday (a failure is tried again).
    assert sorted(rows) == sorted(str(bucket / rel) for rel in good[5:] + ["c/truncated.jpg"])
    assert {(r["model_uri"], r["model_version"]) for r in rows.values()} == {(ref.version_uri, ref.version)}
    record = json.loads((days / "day2" / outputs.SUCCESS_FILE).read_text())
    assert (record["images"], record["skipped"], record["rows"]) == (len(good) + 1, 5, len(good) - 4)

    # A prefix of daily outputs: every finished one under it, never the output being written there.
    third = call_job("jobs/infer.py", *base, "--output", days / "day3", "--skip-scored", days)
    assert third.returncode == 0, third.stderr[-3000:]
    assert [r["path"] for r in inference.read_predictions(locate(days / "day3")).to_pylist()] == [
        str(bucket / "c/truncated.jpg")
    ]
    missing = call_job("jobs/infer.py", *base, "--output", days / "day4", "--skip-scored", tmp_path / "bucket")
    assert missing.returncode == 2 and "no finished predictions there" in missing.stderr
