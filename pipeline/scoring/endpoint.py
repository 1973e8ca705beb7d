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
and tries that version again after RETRY_FAILED_S.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import threading
import time
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
from pipeline.redaction import redact, scrub, scrubbed_output
from pipeline.scoring.pool import Pool
from pipeline.scoring.predictor import ModelRef, Predictor, top_k
from pipeline.storage import DEFAULT_MAX_FILE_BYTES

log = logging.getLogger("ray.serve")  # Serve's replica logger: the replica's log file, and the driver's output
RETRY_FAILED_S = 600.0  # a version that failed to load is tried again after this long (not every check)
TOKEN_ENV = "ALEXNET_SERVE_TOKEN"  # the bearer token POST /predict asks for, when set


@dataclass(frozen=True)
class EndpointOptions:
    ten_crop_views: bool = False  # the paper's ten views per image, softmax averaged
    max_bytes: int = DEFAULT_MAX_FILE_BYTES  # a larger body is refused (413): batch inference's limit for a file
    max_batch_size: int = 16  # requests scored in one forward pass
    batch_wait_s: float = 0.005  # how long a batch waits to fill before it is scored anyway
    follow_interval_s: float = 30.0  # seconds between reads of the alias's version (0: never)
    token_sha256: str | None = None  # SHA-256 of the bearer token /predict asks for; None: no token


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
    return spec.startswith("models:/") and "@" in spec


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

    def __init__(self, spec: str, tracking_uri: str, options: EndpointOptions) -> None:
        scrubbed_output()  # what the replica prints reaches Ray's log files and the driver
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per download fills the log
        self.spec, self.tracking_uri, self.options = spec, tracking_uri, options
        self.model = Model.load(self._resolve(spec))
        self.checked, self.error = _now(), None  # the last read of the alias, and what went wrong, if anything
        self._failed: dict[str, float] = {}  # version → when it failed to load
        self._score.set_max_batch_size(options.max_batch_size)
        self._score.set_batch_wait_timeout_s(options.batch_wait_s)
        self._stop = threading.Event()
        if self.following:
            threading.Thread(target=self._follow, name="follow-alias", daemon=True).start()
        device = self.model.predictor.device
        on = f"{device}" if device.type == "cuda" else f"cpu, {torch.get_num_threads()} torch threads"
        log.info("serving %s: version %s (%s)", spec, self.model.ref.version or "-", on)

    def __del__(self) -> None:
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
            views = await asyncio.to_thread(request_views, data, model.ref, self.options.ten_crop_views)
        except Refused as refused:
            return _error(refused.status, refused.reason)
        answer = await self._score((model, views))
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
        from pipeline.scoring import loading

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
        from pipeline.scoring import loading  # MLflow: only where a replica reads the registry

        return loading.resolve(spec, self.tracking_uri)

    def _note(self, message: str) -> None:
        self.error = message
        log.error(message)


def application(spec: str, tracking_uri: str, options: EndpointOptions, pool: Pool, cpus_per_replica: float):
    """The Serve application: the Classifier deployment sized as `pool` says (a fixed number of
    replicas, or autoscaling between its bounds on requests in flight: a full batch per replica)."""
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
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": pool.gpus},
        # Room for a full batch being scored and the next one filling.
        max_ongoing_requests=2 * options.max_batch_size,
    )
    return deployment.bind(spec, redact(tracking_uri), options)


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
