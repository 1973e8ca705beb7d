"""The online endpoint: a Ray Serve deployment that scores one image per request, in dynamic batches,
with the registered version an alias names now.

    POST /predict   the image file's bytes as the body → 200 {"model", "version", "top5": [{"wnid",
                    "name", "prob"}, ...]}, naming the version that scored it; a body that is not an
                    image it can score → 4xx {"error": why}
    GET  /healthz   200 {"status": "ok", "model", "version", "following", "checked", "error"} once a
                    model is loaded (Serve routes no request to a replica before)

Each request goes the way a file goes in batch inference (the same code): the bytes (at most
--max-file-mb), source_views (short side to the model's image size, centre square, centre crop or
the paper's ten views), then a batch of up to --max-batch-size requests through the same Predictor
and top_k. Decoding and the forward pass run in threads, so the replica's event loop keeps taking
requests while a batch is scored.

Following an alias (models:/NAME@ALIAS): every --follow-interval seconds each replica reads the
version the alias names. When it moved, the replica downloads and checks the new version (the
verified, code-free load of batch inference: pipeline.scoring.loading.resolve) in a thread, while
the old model keeps answering; then it swaps a single reference. A request keeps the model it was
preprocessed for until its answer, so none fails and each names the version that scored it. A
version that fails to load leaves the old one serving; the replica logs why (and /healthz shows it),
and tries that version again after RETRY_FAILED_S. A replica that starts meanwhile (scaled up, or
replacing one that died) serves the version the endpoint started with, and says so.

The driver's side (jobs/serve.py): check_cluster (Serve already on the cluster is used only where
it listens as asked, with nothing at /), start (one proxy, on the head), application, stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from PIL import UnidentifiedImageError
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline.data.transforms import ImageTooLarge, UnsupportedImage, describe_undecodable, source_views
from pipeline.errors import InputError
from pipeline.redaction import redact, scrub, scrubbed_output
from pipeline.scoring import loading
from pipeline.scoring.pool import Pool
from pipeline.scoring.predictor import ModelRef, Predictor, top_k
from pipeline.storage import DEFAULT_MAX_FILE_BYTES

log = logging.getLogger("ray.serve")  # Serve's replica logger: the replica's log file, and the driver's output
RETRY_FAILED_S = 600.0  # a version that failed to load is tried again after this long (not every check)


@dataclass(frozen=True)
class EndpointOptions:
    ten_crop_views: bool = False  # the paper's ten views per image, softmax averaged
    max_bytes: int = DEFAULT_MAX_FILE_BYTES  # a larger body is refused (413): batch inference's limit for a file
    max_batch_size: int = 16  # requests scored in one forward pass
    batch_wait_s: float = 0.005  # how long a batch waits to fill before it is scored anyway
    follow_interval_s: float = 30.0  # seconds between reads of the alias's version (0: never)
    token_sha256: str | None = None  # SHA-256 of the bearer token /predict asks for; None: no token
    decode_threads: int = 1  # requests decoded at once per replica: its CPUs (bounds its memory too)


class Refused(Exception):
    """A request the endpoint will not score: its HTTP status and the reason it is told."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def request_views(data: bytes, ref: ModelRef, ten: bool) -> np.ndarray:
    """A request body → its test views, as batch inference makes them of a file; else Refused: 400
    an empty body or one that does not decode, 413 an image over the pixel or decoding limits, 415
    another format."""
    if not data:
        raise Refused(400, "empty body: send the image file's bytes as the body (curl --data-binary @photo.jpg)")
    try:
        return source_views(data, ref.image_size, ref.crop, ten)
    except ImageTooLarge as exc:
        raise Refused(413, str(exc)) from None
    except UnsupportedImage as exc:
        raise Refused(415, str(exc)) from None
    except UnidentifiedImageError:
        raise Refused(415, "not a JPEG, PNG or WebP image") from None
    except Exception as exc:  # noqa: BLE001 -- whatever the decoder says of these bytes is the caller's to hear
        raise Refused(400, describe_undecodable(exc, data)) from None


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, or Refused (413) as soon as it is known to be over `max_bytes`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise Refused(413, _too_large(int(declared), max_bytes))
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > max_bytes:
            raise Refused(413, _too_large(len(data), max_bytes, at_least=True))
    return bytes(data)


def _too_large(size: int, max_bytes: int, at_least: bool = False) -> str:
    return (
        f"{'at least ' if at_least else ''}{size:,} bytes, over the {max_bytes / 2**20:g} MiB limit for one image "
        "(the server's --max-file-mb)"
    )


def is_alias(spec: str) -> bool:
    """Whether `spec` names a registered model by alias (models:/NAME@ALIAS), the one kind that moves."""
    match = loading.MODEL_URI.match(spec)
    return bool(match and match["alias"])


def token_digest(token: str) -> str:
    """What a replica keeps of the bearer token: its SHA-256, never the token (deployment arguments
    are stored by Serve's controller and shown by its API)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Model:
    """One loaded version: what requests preprocessed for it are scored with."""

    ref: ModelRef
    predictor: Predictor

    @classmethod
    def load(cls, ref: ModelRef) -> Model:
        return cls(ref, Predictor(ref, keep=lambda probs, batch: probs))

    def answers(self, views: list[np.ndarray]) -> list[dict[str, Any] | Refused]:
        """Each request's top five, or the model's error (probabilities that are not finite)."""
        probs = self.predictor({"image": np.stack(views)})
        top_p, top_i, finite = top_k(probs)
        name, version = self.ref.name or self.ref.uri, self.ref.version
        out: list[dict[str, Any] | Refused] = []
        for p, i, ok in zip(top_p, top_i, finite, strict=True):
            if not ok:
                out.append(Refused(500, f"version {version} of {name} gives probabilities that are not finite"))
                continue
            top5 = [
                {"wnid": self.ref.wnids[k], "name": self.ref.names[k], "prob": float(q)}
                for k, q in zip(i, p, strict=True)
            ]
            out.append({"model": name, "version": version, "top5": top5})
        return out


def score(items: list[tuple[Model, np.ndarray]]) -> list[dict[str, Any] | Refused]:
    """A batch of (model, views) requests: one forward pass per model among them (two only while an
    alias's new version takes over), each answer from the model its request was preprocessed for."""
    answers: list[dict[str, Any] | Refused] = [{}] * len(items)
    groups: dict[int, list[int]] = {}
    for at, (model, _) in enumerate(items):
        groups.setdefault(id(model), []).append(at)
    for ats in groups.values():
        model = items[ats[0]][0]
        for at, answer in zip(ats, model.answers([items[at][1] for at in ats]), strict=True):
            answers[at] = answer
    return answers


@serve.deployment(name="Classifier", health_check_period_s=10)
class Classifier:
    """A replica: the model the spec names now, a thread following the alias, the two routes."""

    def __init__(self, spec: str, tracking_uri: str, options: EndpointOptions, fallback: str | None = None) -> None:
        scrubbed_output()  # what the replica prints reaches Ray's log files and the driver
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per download fills the log
        self.spec, self.tracking_uri, self.options = spec, tracking_uri, options
        self.checked, self.error = _now(), None  # the last read of the alias, and what went wrong, if anything
        self._failed: dict[str, float] = {}  # version → when it failed to load
        self.model = self._first_model(fallback)
        self._score.set_max_batch_size(options.max_batch_size)
        self._score.set_batch_wait_timeout_s(options.batch_wait_s)
        self._decoding = ThreadPoolExecutor(options.decode_threads, thread_name_prefix="decode")
        self._stop = threading.Event()
        if self.following:
            threading.Thread(target=self._follow, name="follow-alias", daemon=True).start()
        device = self.model.predictor.device
        on = f"{device}" if device.type == "cuda" else f"cpu, {torch.get_num_threads()} torch threads"
        log.info("serving %s: version %s (%s)", spec, self.model.ref.version or "-", on)

    def _first_model(self, fallback: str | None) -> Model:
        """What the spec names now; for a replica that starts while the alias names a version that does
        not load (scaled up, or replacing one that died), the version the endpoint started with."""
        try:
            return Model.load(self._resolve(self.spec))
        except Exception as exc:
            if not fallback or not self.following:
                raise
            reason = scrub(str(exc))
        model = Model.load(self._resolve(fallback))
        self._note(f"{self.spec} failed to load, serving {fallback} (the version the endpoint started with) until "
                   f"the alias moves: {reason}")  # fmt: skip
        with contextlib.suppress(Exception):  # tried again after RETRY_FAILED_S, not at every read
            self._failed[loading.alias_version(self.spec, self.tracking_uri)] = time.monotonic()
        return model

    def __del__(self) -> None:
        if hasattr(self, "_stop"):  # not when __init__ failed before it
            self._stop.set()

    @property
    def following(self) -> bool:
        return is_alias(self.spec) and self.options.follow_interval_s > 0

    async def __call__(self, request: Request) -> Response:
        route = (request.method, request.url.path.rstrip("/") or "/")
        if route == ("POST", "/predict"):
            return await self._predict(request)
        if route == ("GET", "/healthz"):
            return JSONResponse(self.health())
        if route[1] in ("/predict", "/healthz"):
            allowed = "POST" if route[1] == "/predict" else "GET"
            return _error(405, f"{route[1]} answers {allowed} only", {"Allow": allowed})
        return _error(404, f"no route {route[1]}: POST /predict (an image as the body) or GET /healthz")

    def health(self) -> dict[str, Any]:
        ref = self.model.ref
        return {
            "status": "ok",
            "model": ref.name or ref.uri,
            "version": ref.version,
            "following": self.spec if self.following else None,
            "checked": self.checked,
            "error": self.error,
        }

    async def _predict(self, request: Request) -> Response:
        if not self._authorized(request):
            return _error(
                401, "a bearer token is required: Authorization: Bearer TOKEN", {"WWW-Authenticate": "Bearer"}
            )
        model = self.model  # the version this request is preprocessed for and scored with, whatever moves meanwhile
        try:
            data = await read_body(request, self.options.max_bytes)
            views = await asyncio.get_running_loop().run_in_executor(
                self._decoding, request_views, data, model.ref, self.options.ten_crop_views
            )
        except Refused as refused:
            return _error(refused.status, refused.reason)
        try:
            answer = await self._score((model, views))
        except Exception as exc:
            log.exception("scoring failed")
            return _error(500, f"scoring failed: {type(exc).__name__}: {scrub(str(exc))}")
        if isinstance(answer, Refused):
            return _error(answer.status, answer.reason)
        return JSONResponse(answer)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)  # set from the options in __init__
    async def _score(self, items: list[tuple[Model, np.ndarray]]) -> list[dict[str, Any] | Refused]:
        return await asyncio.to_thread(score, items)

    def _authorized(self, request: Request) -> bool:
        if self.options.token_sha256 is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token_digest(token.strip()), self.options.token_sha256
        )

    # ---- following the alias, in a thread of its own ----
    def _follow(self) -> None:
        while not self._stop.wait(self.options.follow_interval_s):
            try:
                self.follow_once()
            except Exception as exc:  # noqa: BLE001 -- nothing the registry does may stop the replica serving
                self._note(f"following {self.spec} failed: {scrub(str(exc))}")

    def follow_once(self) -> None:
        """Read the version the alias names; when it is another, load it and swap, or keep the old one."""
        current = self.model.ref.version
        try:
            version = loading.alias_version(self.spec, self.tracking_uri)
        except Exception as exc:  # noqa: BLE001 -- an unreachable registry: keep serving what is loaded
            self._note(f"cannot read {self.spec} from {redact(self.tracking_uri)} ({scrub(str(exc))}); "
                       f"still serving version {current}")  # fmt: skip
            return
        self.checked = _now()
        if version == current:
            self.error = None
            return
        if time.monotonic() - self._failed.get(version, -RETRY_FAILED_S) < RETRY_FAILED_S:
            return  # it failed a moment ago; the error stays in /healthz
        log.info("%s moved to version %s (serving %s): loading it", self.spec, version, current)
        pinned = f"models:/{self.model.ref.name}/{version}"
        try:
            model = Model.load(self._resolve(pinned))
        except Exception as exc:  # noqa: BLE001 -- a version that does not load must not take the old one down
            self._failed[version] = time.monotonic()
            self._note(f"version {version} ({self.spec}) failed to load, still serving version {current}: "
                       f"{scrub(str(exc))}")  # fmt: skip
            return
        self.model, self.error = model, None
        self._failed.pop(version, None)
        log.info("now serving version %s of %s (was %s)", version, model.ref.name, current)

    def _resolve(self, spec: str) -> ModelRef:
        return loading.resolve(spec, self.tracking_uri)

    def _note(self, message: str) -> None:
        self.error = message
        log.error(message)


def application(spec: str, ref: ModelRef, tracking_uri: str, options: EndpointOptions, pool: Pool, cpus: float):
    """The Serve application: the Classifier deployment sized as `pool` says (a fixed number of
    replicas, or autoscaling between its bounds on requests in flight: a full batch per replica),
    `cpus` each; `ref` is the version the driver checked, a new replica's fallback."""
    if pool.smallest == pool.largest:
        scaling: dict[str, Any] = {"num_replicas": pool.smallest}
    else:
        scaling = {
            "autoscaling_config": {
                "min_replicas": pool.smallest,
                "initial_replicas": pool.smallest,
                "max_replicas": pool.largest,
                "target_ongoing_requests": options.max_batch_size,
            }
        }
    deployment = Classifier.options(
        **scaling,
        ray_actor_options={"num_cpus": cpus, "num_gpus": pool.gpus},
        # Room for a full batch being scored and the next one filling.
        max_ongoing_requests=2 * options.max_batch_size,
    )
    options = dataclasses.replace(options, decode_threads=max(1, round(cpus)))
    return deployment.bind(spec, redact(tracking_uri), options, ref.version_uri if is_alias(spec) else None)


# ---- the driver's side: Serve on the cluster, started and stopped ----
APP = "alexnet"  # the Serve application's name; it answers at /


class EndpointError(InputError):
    """Serve on the joined cluster cannot take this endpoint; the message says what runs and what to do."""


def check_cluster(http: dict[str, Any]) -> None:
    """Serve already running on the cluster is used only where it listens as asked (its HTTP options
    cannot change while it runs) and no application of it answers at / already."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return
    config = client.http_config
    differ = [f"{k} {getattr(config, k)} (asked: {v})" for k, v in http.items() if getattr(config, k) != v]
    if differ:
        raise EndpointError(
            f"Ray Serve already runs on this cluster with {', '.join(differ)}, and its HTTP options cannot change "
            "while it runs: ask for those, or stop its applications and run `serve shutdown` first"
        )
    for name, app in client.get_serve_details().get("applications", {}).items():
        if app.get("route_prefix") == "/":
            raise EndpointError(
                f"the Serve application {name!r} already answers at / on this cluster (a cluster serves one "
                f"endpoint): stop the job that runs it, or `serve delete {name}`"
            )


def start(http: dict[str, Any]) -> None:
    """Serve's proxy: one, on the head (where `ray job submit` runs the driver and `ray attach -p`
    reaches), even when the head holds no replica (Serve's default puts proxies beside replicas)."""
    serve.start(proxy_location="HeadOnly", http_options=http)


def stop(timeout: float) -> bool:
    """Delete the application, then Serve itself when it holds no other; False if the cluster did
    not confirm within `timeout` (one that is going away does not answer)."""

    def delete() -> None:
        # Asked without waiting: the controller deletes it even if this process is killed next
        # (`ray job stop` kills a job RAY_JOB_STOP_WAIT_TIME_S after its SIGTERM; Ray's default is 3 s).
        serve.delete(APP, _blocking=False)
        while APP in serve.status().applications:
            time.sleep(0.2)
        if not serve.status().applications:
            serve.shutdown()

    worker = threading.Thread(target=delete, daemon=True)
    worker.start()
    worker.join(timeout)
    return not worker.is_alive()


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
