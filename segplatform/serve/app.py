"""The Serve application: one deployment, ``SegmentationService``, with a FastAPI ingress.

Routes (README "Serving"):

- ``POST /v1/segment?format=png|json|overlay[&flip=true|false][&scales=0.75,1,1.25]``: the body
  is the image (``image/png``, ``image/jpeg``, ``image/webp``, ``image/tiff``, or
  ``application/octet-stream`` / no type: detected) or ``multipart/form-data`` with the image in
  field ``file``. Answers an indexed PNG mask, JSON (areas + COCO RLE) or an overlay PNG.
- ``GET /v1/model``: name, version, alias, architecture, classes, palette, metrics, recipe,
  limits. ``GET /v1/health``: 200 with the version served. ``GET /``: a page to try it.
- Errors: ``{"error": {"code", "message"}}`` with 4xx for client errors (``inputs.ClientError``),
  401 without the bearer key when one is set, 503 + ``Retry-After`` when the replica is full.

Request path in a replica: bearer key and query options first; then the body, received in its
own bounded stage (at most ``max_uploads`` bodies at once, each read with its size cap and
within ``body_timeout_s``: 408 ``body_timeout`` beyond), so that clients sending slowly hold no
model slot; then admission (at most ``max_inflight`` requests past their body; the next one gets
a JSON 503 at once). Decoding, inference and encoding run in worker threads, so the event loop
keeps answering health checks and overload 503s while the model works. Inference runs in one
thread per replica (torch uses the replica's CPUs inside it), through ``@serve.batch`` when
batching is on. A client that hangs up cancels its request (Serve cancels the handler, or,
during the upload, the body's reader sees the disconnect first): a request waiting for its body,
a slot or a batch leaves it at once and frees what it held (recorded as status 499, counted in
``/v1/health``'s ``disconnected``).

Hot reload: ``reconfigure(user_config)`` loads the model a changed config names (``serve
deploy`` with a new ``user_config``); for ``models:/NAME@ALIAS`` a watcher thread resolves the
alias every ``reload_interval_s`` and, when it moved, loads the new version beside the old one
and swaps them: requests in flight finish on the model they started with, none fails. When the
registry does not answer or the new version cannot be loaded, the old version keeps serving,
``/v1/model`` says why under ``reload_error`` (cleared once a check succeeds), the counter
``segplatform_serve_reload_failures`` counts it, and the watcher tries again every interval.

Metrics (``ray.util.metrics``, exported with Ray's metrics to Prometheus and the dashboard, with
the ``ray_`` prefix): ``segplatform_serve_requests`` (counter; route, status, format, model),
``segplatform_serve_latency_s`` (histogram; route, status), ``segplatform_serve_batch_size``
(histogram), ``segplatform_serve_inflight`` (gauge), ``segplatform_serve_reload_failures``
(counter; model). Serve's own ``ray_serve_*`` metrics come
with every deployment.

Serve facts relied on (Ray 2.60, checked here): ``HTTPException``-like answers keep their status;
an unhandled exception is a 500 and the replica stays up; Serve has no body-size limit of its
own; overflow of ``max_queued_requests`` is Serve's own plain-text 503.

This module does not use ``from __future__ import annotations``: FastAPI reads the route
methods' annotations (``request: Request``) at run time through Serve's ingress wrapper, and
string annotations would turn ``request`` into a query parameter.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from segplatform.serve.inputs import (
    ClientError,
    Upload,
    check_content_length,
    check_declared_type,
    decode_image,
    media_type,
    parse_multipart,
    read_capped,
)
from segplatform.serve.model import TRIM_PIXELS, release_memory
from segplatform.serve.settings import ServeSettings

logger = logging.getLogger("segplatform.serve")

DEPLOYMENT_NAME = "SegmentationService"
# Bounds of the recipe options a client may ask for.
MAX_SCALES = 3
SCALE_RANGE = (0.5, 2.0)
STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "image_not_accepted",
    503: "overloaded",
}

app = FastAPI(
    title="segplatform segmentation endpoint", docs_url=None, redoc_url=None, openapi_url=None
)


def error_response(error: ClientError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    code = STATUS_CODES.get(error.status_code, "http_error")
    return error_response(ClientError(error.status_code, code, str(error.detail)))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return error_response(ClientError(400, "bad_request", str(error.errors())[:500]))


@app.exception_handler(Exception)
async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s", request.url.path)
    body = {"error": {"code": "internal", "message": "internal error; see the replica's log"}}
    return JSONResponse(body, status_code=500)


def parse_bool(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ClientError(400, "bad_parameter", f"{name}={text!r}: expected true or false")


def parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ClientError(
            400, "bad_parameter", f"scales={text!r}: expected numbers separated by commas"
        ) from None
    low, high = SCALE_RANGE
    if not 1 <= len(scales) <= MAX_SCALES or not all(low <= s <= high for s in scales):
        raise ClientError(
            400,
            "bad_parameter",
            f"scales={text!r}: give 1 to {MAX_SCALES} factors between {low} and {high}",
        )
    return scales


class _Metrics:
    """The endpoint's Ray metrics (created in the replica process)."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.requests = metrics.Counter(
            "segplatform_serve_requests",
            description="Requests answered by the segmentation endpoint, by route and status.",
            tag_keys=("route", "status", "format", "model"),
        )
        self.latency = metrics.Histogram(
            "segplatform_serve_latency_s",
            description="Time from request arrival in the replica to the response (seconds).",
            boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            tag_keys=("route", "status"),
        )
        self.batch_size = metrics.Histogram(
            "segplatform_serve_batch_size",
            description="Images per model call.",
            boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 32],
        )
        self.inflight = metrics.Gauge(
            "segplatform_serve_inflight",
            description="Requests admitted by the replica and not yet answered.",
        )
        self.reload_failures = metrics.Counter(
            "segplatform_serve_reload_failures",
            description="Alias checks or loads of a new version that failed (the old one serves).",
            tag_keys=("model",),
        )

    def record(self, route: str, status: int, fmt: str, model: str, seconds: float) -> None:
        with contextlib.suppress(Exception):  # metrics never fail a request
            tags = {"route": route, "status": str(status)}
            self.requests.inc(1, tags={**tags, "format": fmt, "model": model})
            self.latency.observe(seconds, tags=tags)


def _formats() -> tuple[str, ...]:
    from segplatform.serve.render import FORMATS

    return FORMATS


def _min_side(model_min_side: int, recipe: Any) -> int:
    """Smallest image side for ``recipe``: down-scaling must not take it below the model's."""
    if recipe.mode == "slide":
        return 1
    return max(1, int(np.ceil(model_min_side / min(recipe.scales))))


def _replica_cpus() -> float:
    """CPUs Ray gave this replica (1 outside Ray)."""
    with contextlib.suppress(Exception):
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            return max(1.0, float(cpus))
    return float(os.environ.get("OMP_NUM_THREADS", 1) or 1)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(app)
class SegmentationService:
    """One replica of the segmentation endpoint (see the module docstring)."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        self._settings: ServeSettings | None = None
        self._served: Any = None  # segplatform.serve.model.ServedModel
        self._inflight = 0
        self._uploading = 0
        self._disconnected = 0  # requests whose client hung up before the answer
        self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix="segplatform-infer")
        self._io_pool = ThreadPoolExecutor(2, thread_name_prefix="segplatform-io")
        self._reload_lock = threading.Lock()
        self._watch_stop: threading.Event | None = None
        self._metrics = _Metrics()
        self._reload_error: dict[str, Any] | None = None  # the alias watch's last failure
        self._key_digest: str | None = None
        if settings is not None:
            self.reconfigure(settings)

    # ------------------------------------------------------------------------------ config
    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply new settings; load the model they name when it differs from the one served."""
        import torch

        from segplatform.serve.model import load_served_model

        settings = ServeSettings.from_dict(dict(config))
        previous = self._settings
        digest = settings.api_key_sha256
        if settings.api_key_env:
            from segplatform.serve.settings import api_key_digest

            key = os.environ.get(settings.api_key_env, "")
            if not key:
                raise RuntimeError(
                    f"api_key_env: environment variable {settings.api_key_env} is not set "
                    "in the replica"
                )
            digest = api_key_digest(key)
        threads = settings.torch_threads or max(1, int(_replica_cpus()))
        torch.set_num_threads(threads)
        model_keys = ("model", "tracking_uri", "device", "min_side")
        if previous is None or any(
            getattr(previous, k) != getattr(settings, k) for k in model_keys
        ):
            with self._reload_lock:
                served = load_served_model(
                    settings.model,
                    device=settings.device,
                    tracking_uri=settings.tracking_uri,
                    min_side=settings.min_side,
                )
                self._served = served
            logger.info(
                "serving %s (%s, min side %d)", served.source, served.device, served.min_side
            )
        self._key_digest = digest
        self._settings = settings
        self._batched.set_max_batch_size(settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self._restart_watcher(settings)

    def _restart_watcher(self, settings: ServeSettings) -> None:
        if self._watch_stop is not None:
            self._watch_stop.set()
            self._watch_stop = None
        ref = self._served.ref
        if not ref.follows_alias or settings.reload_interval_s <= 0:
            return
        stop = threading.Event()
        self._watch_stop = stop
        thread = threading.Thread(
            target=self._watch_alias,
            args=(settings, stop),
            name="segplatform-alias-watch",
            daemon=True,
        )
        thread.start()

    def _watch_alias(self, settings: ServeSettings, stop: threading.Event) -> None:
        """Follow ``models:/NAME@ALIAS``: load and swap in the version the alias moves to."""
        from segplatform.serve.model import load_served_model, resolve_alias

        while not stop.wait(settings.reload_interval_s):
            version = None
            try:
                served = self._served
                version = resolve_alias(served.ref, settings.tracking_uri)
                if version == served.version:
                    self._reload_error = None
                    continue
                with self._reload_lock:
                    if stop.is_set():
                        return
                    new = load_served_model(
                        settings.model,
                        device=settings.device,
                        tracking_uri=settings.tracking_uri,
                        version=version,
                        min_side=settings.min_side,
                    )
                    self._served = new
                logger.info(
                    "alias %s@%s moved: now serving version %s (was %s)",
                    served.ref.name,
                    served.ref.alias,
                    version,
                    served.version,
                )
                self._reload_error = None
            except Exception as error:  # registry down, version unloadable: keep serving, retry
                text = f"{type(error).__name__}: {error}"[:2000]
                failing = str(version) if version is not None else None
                previous = self._reload_error
                if previous is None or (previous["message"], previous["version"]) != (
                    text,
                    failing,
                ):
                    logger.warning(
                        "alias watch of %s failed (version %s keeps serving; retrying every "
                        "%g s): %s",
                        settings.model,
                        self._served.version,
                        settings.reload_interval_s,
                        text,
                    )
                    self._reload_error = {
                        "message": text,
                        "version": failing,  # the version the alias names (None: not resolved)
                        "since": time.time(),
                        "serving": self._served.version,
                    }
                with contextlib.suppress(Exception):
                    self._metrics.reload_failures.inc(1, tags={"model": self._served.ref.name})

    def check_health(self) -> None:
        """Serve's health check: a replica without a model is unhealthy."""
        if self._served is None:
            raise RuntimeError("no model loaded")

    def __del__(self) -> None:
        if self._watch_stop is not None:
            self._watch_stop.set()

    # ------------------------------------------------------------------------------ checks
    def _authorize(self, request: Request) -> None:
        digest = self._key_digest
        if digest is None:
            return
        from segplatform.serve.settings import api_key_digest

        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            api_key_digest(key.strip()), digest
        ):
            raise ClientError(
                401,
                "unauthorized",
                "this endpoint needs an API key: send 'Authorization: Bearer KEY'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def _recipe(self, request: Request) -> Any:
        from segplatform.serve.model import recipe_for

        settings = self._settings
        overrides: dict[str, Any] = {}
        params = request.query_params
        if "flip" in params:
            if not settings.allow_flip:
                raise ClientError(400, "bad_parameter", "this endpoint does not take flip=")
            overrides["flip"] = parse_bool("flip", params["flip"])
        if "scales" in params:
            if not settings.allow_scales:
                raise ClientError(400, "bad_parameter", "this endpoint does not take scales=")
            overrides["scales"] = parse_scales(params["scales"])
        if not overrides:
            return self._served.recipe
        return recipe_for(self._served.meta, **overrides)

    def _admit(self) -> None:
        settings = self._settings
        if self._inflight >= settings.max_inflight:
            raise self._overloaded(f"is busy ({self._inflight} requests in progress)")
        self._inflight += 1
        self._metrics.inflight.set(self._inflight)

    def _overloaded(self, state: str) -> ClientError:
        """The JSON 503 of a full stage: ``the replica STATE; retry after N s``, Retry-After."""
        retry = self._settings.retry_after_s
        return ClientError(
            503,
            "overloaded",
            f"the replica {state}; retry after {retry} s",
            headers={"Retry-After": str(retry)},
        )

    def _release(self) -> None:
        self._inflight -= 1
        with contextlib.suppress(Exception):
            self._metrics.inflight.set(self._inflight)

    async def _receive(self, request: Request) -> Upload:
        """The request's body, in the upload stage (module docstring): 503 when
        ``max_uploads`` bodies are being received, 408 when it takes over ``body_timeout_s``."""
        settings = self._settings
        if self._uploading >= settings.max_uploads:
            raise self._overloaded(f"is receiving {self._uploading} request bodies")
        self._uploading += 1
        try:
            return await asyncio.wait_for(self._read_upload(request), settings.body_timeout_s)
        except TimeoutError:
            raise ClientError(
                408,
                "body_timeout",
                f"the request body did not arrive within {settings.body_timeout_s:g} s",
            ) from None
        finally:
            self._uploading -= 1

    async def _read_upload(self, request: Request) -> Upload:
        settings = self._settings
        check_content_length(request.headers.get("content-length"), settings.max_body_bytes)
        declared = media_type(request.headers.get("content-type"))
        if declared == "multipart/form-data":
            body = await read_capped(request.stream(), settings.max_body_bytes)
            upload = await parse_multipart(body, request.headers["content-type"])
            check_declared_type(upload.declared_type)
            return upload
        check_declared_type(declared)
        body = await read_capped(request.stream(), settings.max_body_bytes)
        return Upload(body, declared)

    # ------------------------------------------------------------------------------ inference
    def _batching(self) -> bool:
        setting = self._settings.batching
        return self._served.device.startswith("cuda") if setting is None else setting

    async def _infer(self, served: Any, image: np.ndarray, recipe: Any) -> np.ndarray:
        if self._batching():
            return await self._batched((served, image, recipe))
        from segplatform.serve.model import segment_batch

        loop = asyncio.get_running_loop()
        labels = await loop.run_in_executor(
            self._infer_pool, partial(segment_batch, served, [image], [recipe])
        )
        self._metrics.batch_size.observe(1)
        return labels[0]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, items: list[tuple[Any, np.ndarray, Any]]) -> list[np.ndarray]:
        from segplatform.serve.model import segment_batch

        loop = asyncio.get_running_loop()
        results: list[np.ndarray | None] = [None] * len(items)
        by_model: dict[int, list[int]] = {}
        for index, (served, _, _) in enumerate(items):
            by_model.setdefault(id(served), []).append(index)
        for indices in by_model.values():
            served = items[indices[0]][0]
            labels = await loop.run_in_executor(
                self._infer_pool,
                partial(
                    segment_batch,
                    served,
                    [items[i][1] for i in indices],
                    [items[i][2] for i in indices],
                ),
            )
            for index, label in zip(indices, labels):
                results[index] = label
        with contextlib.suppress(Exception):
            self._metrics.batch_size.observe(len(items))
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------------------ routes
    @app.post("/v1/segment")
    async def segment(self, request: Request) -> Response:
        from segplatform.serve import render

        began = time.perf_counter()
        status, fmt, model_id = 500, "-", "-"
        try:
            self._authorize(request)
            fmt = request.query_params.get("format", "png")
            if fmt not in render.FORMATS:
                bad, fmt = fmt, "-"
                raise ClientError(
                    400,
                    "bad_parameter",
                    f"format={bad[:40]!r}: expected one of {', '.join(render.FORMATS)}",
                )
            recipe = self._recipe(request)
            upload = await self._receive(request)
            self._admit()
            try:
                served = self._served
                model_id = f"{served.ref.name}:{served.version}"
                loop = asyncio.get_running_loop()
                settings = self._settings
                image = await loop.run_in_executor(
                    self._io_pool,
                    partial(
                        decode_image,
                        upload.data,
                        max_pixels=settings.max_pixels,
                        min_side=_min_side(served.min_side, recipe),
                        in_channels=served.meta.in_channels,
                    ),
                )
                del upload
                labels = await self._infer(served, image, recipe)
                if fmt == "png":
                    body = await loop.run_in_executor(
                        self._io_pool, render.mask_png, served, labels
                    )
                    response: Response = Response(body, media_type="image/png")
                elif fmt == "overlay":
                    body = await loop.run_in_executor(
                        self._io_pool, render.overlay_png, served, image, labels
                    )
                    response = Response(body, media_type="image/png")
                else:
                    data = await loop.run_in_executor(
                        self._io_pool, render.areas_json, served, labels
                    )
                    response = JSONResponse(data)
                response.headers["X-Model-Version"] = str(served.version)
                if image.shape[0] * image.shape[1] > TRIM_PIXELS:
                    del image, labels
                    await loop.run_in_executor(self._io_pool, release_memory)
            finally:
                self._release()
            status = 200
            return response
        except ClientError as error:
            status = error.status
            return error_response(error)
        except ClientDisconnect:
            # The client hung up while its body was being read and the replica saw it first
            # (its ASGI receive said ``http.disconnect`` before Serve cancelled the handler):
            # nobody is left to answer; the upload stage is already released.
            status = 499
            self._disconnected += 1
            return Response(status_code=499)
        except asyncio.CancelledError:
            # The client hung up (Serve cancels the handler): whatever stage the request was
            # in, its body, slot or batch place is already released above; counted as 499.
            status = 499
            self._disconnected += 1
            raise
        finally:
            self._metrics.record("/v1/segment", status, fmt, model_id, time.perf_counter() - began)

    @app.get("/v1/model")
    async def model_info(self, request: Request) -> JSONResponse:
        began = time.perf_counter()
        try:
            self._authorize(request)
        except ClientError as error:
            self._metrics.record("/v1/model", error.status, "-", "-", 0.0)
            return error_response(error)
        settings = self._settings
        served = self._served
        info = served.describe()
        info["query_options"] = {
            "format": list(_formats()),
            "flip": settings.allow_flip,
            "scales": (
                {"max_count": MAX_SCALES, "range": list(SCALE_RANGE)}
                if settings.allow_scales
                else None
            ),
        }
        info["limits"] = {
            "max_body_bytes": settings.max_body_bytes,
            "body_timeout_s": settings.body_timeout_s,
            "max_uploads_per_replica": settings.max_uploads,
            "max_pixels": settings.max_pixels,
            "min_side": served.min_side,
            "max_inflight_per_replica": settings.max_inflight,
        }
        info["batching"] = self._batching()
        info["follows_alias"] = served.ref.follows_alias and settings.reload_interval_s > 0
        info["reload_error"] = self._reload_error
        self._metrics.record("/v1/model", 200, "-", "-", time.perf_counter() - began)
        return JSONResponse(info)

    @app.get("/v1/health")
    async def health(self) -> JSONResponse:
        served = self._served
        return JSONResponse(
            {
                "status": "ok",
                "model": {"name": served.ref.name, "version": served.version},
                "inflight": self._inflight,
                "uploading": self._uploading,
                "disconnected": self._disconnected,
            }
        )

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        from segplatform.serve.page import PAGE

        return HTMLResponse(PAGE)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for ``settings`` ``args`` (``serve run``/``serve deploy`` builder)."""
    settings = ServeSettings.from_dict(dict(args or {}))
    return SegmentationService.options(**settings.deployment_options()).bind()


def settings_json(settings: ServeSettings) -> str:
    """The settings as JSON, the key digest left out (for logs)."""
    data = settings.to_dict()
    if data.get("api_key_sha256"):
        data["api_key_sha256"] = "***"
    return json.dumps(data, sort_keys=True)
