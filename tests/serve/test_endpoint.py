"""The Serve endpoint on one local Ray cluster: formats, every accepted image mode, the bad-input
corpus (statuses, no 5xx, replica memory), overload 503s, clients that hang up, the API key,
batching equal to unbatched, metrics and the web page in headless Chromium.

The session's in-process Ray cluster and one Serve instance for the module, two applications on
it (one replica each, a tiny U-Net): ``main`` at ``/`` (the corpus limits of ``corpus.py``,
dynamic batching on, so every answer below also checks that batched inference gives
``segment_image``'s labels), ``guarded`` at ``/guarded`` (admits one request at a time,
bearer key, no batching: the default on CPU) and ``trickle`` at ``/trickle`` (2 model slots,
6 upload slots, bodies due within 3 s) for senders that never finish.
"""

from __future__ import annotations

import io
import json
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from segplatform.serve.settings import api_key_digest
from tests.platform_support import wait_for
from tests.serve.conftest import CLASSES, PALETTE, free_port, replica_pids
from tests.serve.corpus import (
    BODY_LIMIT,
    MIN_SIDE,
    PIXEL_LIMIT,
    bad_input_corpus,
    encode,
    good_images,
    noise_rgb,
)

pytestmark = pytest.mark.slow
API_KEY = "test-key-" + uuid.uuid4().hex


@dataclass
class Endpoint:
    base: str  # http://127.0.0.1:PORT
    apps: dict[str, str]  # role -> application name
    package: str

    def url(self, role: str, path: str) -> str:
        prefix = "" if role == "main" else f"/{role}"
        return f"{self.base}{prefix}{path}"


@pytest.fixture(scope="module")
def endpoint(ray_cluster: None, tiny_package: str) -> Iterator[Endpoint]:
    from ray import serve
    from ray.serve.api import RunTarget

    from segplatform.serve.app import build_app

    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    suffix = uuid.uuid4().hex[:8]
    common = {
        "model": tiny_package,
        "num_cpus": 0.5,
        "max_body_bytes": BODY_LIMIT,
        "max_pixels": PIXEL_LIMIT,
        "min_side": MIN_SIDE,
        "torch_threads": 1,
    }
    settings = {
        "main": {
            **common,
            "batching": True,
            "max_batch_size": 8,
            "batch_wait_timeout_s": 0.05,
            "max_inflight": 16,
        },
        "guarded": {
            **common,
            "max_inflight": 1,
            "ongoing_headroom": 16,
            "api_key_sha256": api_key_digest(API_KEY),
        },
        "trickle": {**common, "max_inflight": 2, "max_uploads": 6, "body_timeout_s": 3.0},
    }
    apps = {role: f"{role}-{suffix}" for role in settings}
    try:
        serve.run_many(
            [
                RunTarget(
                    build_app(settings[role]),
                    name=apps[role],
                    route_prefix="/" if role == "main" else f"/{role}",
                )
                for role in settings
            ]
        )
        yield Endpoint(f"http://127.0.0.1:{port}", apps, tiny_package)
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_package: str):
    """``segment_image`` with the served package, for comparison."""
    from segplatform.evaluate import segment_image
    from segplatform.package import load_package

    model, meta = load_package(tiny_package)
    return lambda image: segment_image(model, meta, image)[0]


def post(
    url: str, body, content_type: str | None, key: str | None = None, **params: str
) -> requests.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return requests.post(url, data=body, headers=headers, params=params, timeout=120)


def decoded(image_bytes: bytes, in_channels: int = 3) -> np.ndarray:
    """The array the endpoint segments for ``image_bytes`` (L stays L, others RGB)."""
    with Image.open(io.BytesIO(image_bytes)) as image:
        mode = "L" if image.mode in ("L", "LA", "1") else "RGB"
        return np.asarray(image.convert(mode))


def test_formats_match_segment_image(endpoint: Endpoint, reference) -> None:
    from pycocotools import mask as coco_mask

    rgb = noise_rgb(45, 70, seed=11)
    body = encode(Image.fromarray(rgb), "PNG")
    expected = reference(rgb)
    url = endpoint.url("main", "/v1/segment")

    mask = post(url, body, "image/png", format="png")
    assert mask.status_code == 200 and mask.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(mask.content)) as image:
        assert image.mode == "P" and image.size == (70, 45)
        assert image.getpalette()[: 3 * len(PALETTE)] == [c for rgb_ in PALETTE for c in rgb_]
        np.testing.assert_array_equal(np.asarray(image), expected)

    areas = post(url, body, "image/png", format="json")
    assert areas.status_code == 200
    data = areas.json()
    assert (data["width"], data["height"]) == (70, 45)
    assert data["model"]["architecture"] == "unet"
    assert [c["name"] for c in data["classes"]] == list(CLASSES)
    counts = np.bincount(expected.reshape(-1), minlength=len(CLASSES))
    assert [c["pixels"] for c in data["classes"]] == counts.tolist()
    for entry in data["masks"]:
        rle = {"size": entry["rle"]["size"], "counts": entry["rle"]["counts"].encode()}
        np.testing.assert_array_equal(coco_mask.decode(rle), expected == entry["id"])

    blended = post(url, body, "image/png", format="overlay")
    assert blended.status_code == 200
    with Image.open(io.BytesIO(blended.content)) as image:
        # 70 x 45 is enlarged 8 times (to at least 512 wide), each pixel a sharp 8 x 8 square,
        # above a legend drawn at its fixed size.
        assert image.mode == "RGB" and image.width == 560 and image.height > 360  # + legend
        picture = np.asarray(image)[:360]
    assert (picture.reshape(45, 8, 70, 8, 3) == picture[::8, ::8][:, None, :, None]).all()
    legend_band = image.height - 360
    large = post(url, encode(Image.fromarray(noise_rgb(600, 700, seed=3)), "PNG"), "image/png",
                 format="overlay")  # fmt: skip
    with Image.open(io.BytesIO(large.content)) as image:
        assert image.width == 700 and image.height > 600  # not enlarged: 512 wide or more
        assert legend_band > 14  # the legend's text is at least 14 px high

    multipart = requests.post(
        url, files={"file": ("scan.png", body, "image/png")}, params={"format": "png"}, timeout=60
    )
    assert multipart.status_code == 200 and multipart.content == mask.content


def test_every_accepted_mode_and_format(endpoint: Endpoint, reference) -> None:
    url = endpoint.url("main", "/v1/segment")
    for name, (body, content_type) in good_images().items():
        response = post(url, body, content_type, format="png")
        assert response.status_code == 200, (name, response.text)
        with Image.open(io.BytesIO(response.content)) as mask:
            labels = np.asarray(mask)
        assert labels.shape == (40, 56), name
        if name in ("rgb_png", "grey_png", "tiff", "webp", "octet_stream_png"):
            np.testing.assert_array_equal(labels, reference(decoded(body)), err_msg=name)


def test_recipe_options_from_the_query(endpoint: Endpoint) -> None:
    from segplatform.evaluate import recipe_for, segment_image
    from segplatform.package import load_package

    model, meta = load_package(endpoint.package)
    rgb = noise_rgb(48, 48, seed=4)
    body = encode(Image.fromarray(rgb), "PNG")
    url = endpoint.url("main", "/v1/segment")
    response = post(url, body, "image/png", flip="true", scales="0.75,1")
    assert response.status_code == 200
    expected = segment_image(model, meta, rgb, recipe=recipe_for(meta, flip=True, scales=(0.75, 1)))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(response.content))), expected[0])


def _high_water_mb(pid: int) -> float:
    """The process's peak resident set so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def _send_corpus(url: str, cases: list) -> list[str]:
    failures = []
    for case in cases:
        body = case.body() if callable(case.body) else case.body
        response = post(url, body, case.content_type, **case.query)
        if response.status_code != case.status:
            failures.append(f"{case.name}: {response.status_code} {response.text[:200]}")
            continue
        assert response.status_code < 500
        if case.status != 200:
            error = response.json()["error"]
            assert error["code"] == case.code, case.name
            assert error["message"], case.name
    return failures


def test_bad_input_corpus(endpoint: Endpoint) -> None:
    url = endpoint.url("main", "/v1/segment")
    for body, content_type in good_images().values():  # every decoder loaded once
        for fmt in ("png", "json", "overlay"):
            assert post(url, body, content_type, format=fmt).status_code == 200
    (pid,) = replica_pids(endpoint.apps["main"])
    replica = psutil.Process(pid)
    cases = bad_input_corpus()
    assert len(cases) >= 20
    # The refused requests first: the peak resident set shows that none of them was decoded or
    # buffered whole (a decompression bomb decoded would take gigabytes).
    refused = [case for case in cases if case.status != 200]
    peak_before = _high_water_mb(pid)
    rss_before = replica.memory_info().rss / 2**20
    failures = _send_corpus(url, refused)
    assert not failures, "\n".join(failures)
    peak_rise = _high_water_mb(pid) - max(peak_before, rss_before)
    assert peak_rise < 128, f"replica peak RSS rose by {peak_rise:.0f} MB over refused requests"
    # Then the whole corpus, the accepted edge cases (a 4-megapixel image) too.
    assert not _send_corpus(url, cases)
    # A replay: what the first pass left in the allocator's pools is reused, so growth here by as
    # much as the 4-megapixel image as float32 (45 MB) is a leak.
    rss_warm = replica.memory_info().rss / 2**20
    assert not _send_corpus(url, cases)
    rss_after = replica.memory_info().rss / 2**20
    print(f"replica RSS {rss_before:.0f} MB -> {rss_warm:.0f} MB -> {rss_after:.0f} MB")
    assert rss_after - rss_warm < 45, f"replica RSS grew by {rss_after - rss_warm:.0f} MB on replay"
    assert replica_pids(endpoint.apps["main"]) == [pid], "the replica was replaced"
    health = requests.get(endpoint.url("main", "/v1/health"), timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_errors_outside_segment_are_json(endpoint: Endpoint) -> None:
    missing = requests.get(endpoint.base + "/no/such/path", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong_method = requests.get(endpoint.url("main", "/v1/segment"), timeout=10)
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


def test_overload_answers_fast_json_503_and_accepted_requests_succeed(
    endpoint: Endpoint,
) -> None:
    url = endpoint.url("guarded", "/v1/segment")
    body = encode(Image.fromarray(noise_rgb(700, 700, seed=2)), "PNG")

    def one(_: int) -> requests.Response:
        return post(url, body, "image/png", key=API_KEY, format="png")

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    statuses = [response.status_code for response in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    for response in results:
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "overloaded"
            assert int(response.headers["Retry-After"]) >= 1
        else:
            with Image.open(io.BytesIO(response.content)) as mask:
                assert mask.size == (700, 700)
    print(f"overload: {statuses.count(200)} accepted, {statuses.count(503)} refused")


def _raw_post(
    host: str, port: int, path: str, body: bytes, length: int, key: str = ""
) -> socket.socket:
    """A connection that announces a PNG body of ``length`` bytes and sends ``body``."""
    sock = socket.create_connection((host, port), timeout=60)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/png\r\n{auth}"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def _trickle(host: str, port: int, path: str, key: str = "") -> socket.socket:
    """A connection that announces a 200 kB PNG body and sends 64 bytes of it, then nothing."""
    return _raw_post(host, port, path, b"\x89PNG\r\n\x1a\n" + b"\0" * 56, 200_000, key)


def _answer(sock: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of the response on ``sock`` (read until the server closes)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():  # one chunk: "<size>\r\n<data>\r\n0..."
        body = body.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
    return status, json.loads(body)


def test_slow_senders_hold_no_model_slot(endpoint: Endpoint) -> None:
    """2 x max_inflight clients that announce a body and never send it are received in the
    upload stage: meanwhile normal requests are answered 200, and each slow sender gets a JSON
    408 once its body is overdue."""
    host, port = endpoint.base.removeprefix("http://").split(":")
    health = endpoint.url("trickle", "/v1/health")
    slow = [_trickle(host, int(port), "/trickle/v1/segment") for _ in range(4)]
    wait_for(
        lambda: requests.get(health, timeout=10).json()["uploading"] == 4,
        60,
        "the slow bodies did not reach the replica's upload stage",
    )
    body = encode(Image.fromarray(noise_rgb(40, 40, seed=5)), "PNG")
    for _ in range(3):
        response = post(endpoint.url("trickle", "/v1/segment"), body, "image/png")
        assert response.status_code == 200, response.text
    assert requests.get(health, timeout=10).json()["uploading"] == 4  # still held meanwhile
    for sock in slow:
        status, answer = _answer(sock)
        assert status == 408 and answer["error"]["code"] == "body_timeout", answer
    assert requests.get(health, timeout=10).json()["uploading"] == 0


def test_a_client_that_hangs_up_frees_what_its_request_held(endpoint: Endpoint) -> None:
    """On the one-slot replica, a client hangs up while its body is being received, another
    while its inference runs: each request is dropped (``disconnected`` counts it) and frees
    its upload or model slot, and the next request is admitted and answered 200."""
    host, port = endpoint.base.removeprefix("http://").split(":")
    path = "/guarded/v1/segment"

    def health() -> dict:
        return requests.get(endpoint.url("guarded", "/v1/health"), timeout=10).json()

    before = health()["disconnected"]
    receiving = _trickle(host, int(port), path, API_KEY)
    wait_for(lambda: health()["uploading"] == 1, 60, "the body did not reach the upload stage")
    receiving.close()
    wait_for(lambda: health()["disconnected"] == before + 1, 60, "the hang-up was not seen")
    assert health()["uploading"] == 0

    # A large smooth image (a small PNG, seconds of inference on one thread).
    rows, cols = np.indices((1900, 1900))
    pixels = np.stack([rows % 256, cols % 256, (rows + cols) % 256], axis=-1).astype(np.uint8)
    body = encode(Image.fromarray(pixels), "PNG")
    running = _raw_post(host, int(port), path, body, len(body), API_KEY)
    wait_for(lambda: health()["inflight"] == 1, 60, "the request was not admitted", 0.02)
    running.close()
    wait_for(lambda: health()["disconnected"] == before + 2, 60, "the hang-up was not seen")
    assert health()["inflight"] == 0
    small = encode(Image.fromarray(noise_rgb(40, 40, seed=9)), "PNG")
    response = post(endpoint.url("guarded", "/v1/segment"), small, "image/png", key=API_KEY)
    assert response.status_code == 200, response.text


def test_api_key(endpoint: Endpoint) -> None:
    url = endpoint.url("guarded", "/v1/segment")
    body = encode(Image.fromarray(noise_rgb(32, 32)), "PNG")
    missing = post(url, body, "image/png")
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "unauthorized"
    wrong = requests.post(
        url, data=body, headers={"Content-Type": "image/png", "Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401
    good = requests.post(
        url,
        data=body,
        headers={"Content-Type": "image/png", "Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert good.status_code == 200
    assert requests.get(endpoint.url("guarded", "/v1/model"), timeout=10).status_code == 401
    assert requests.get(endpoint.url("guarded", "/v1/health"), timeout=10).status_code == 200
    info = requests.get(
        endpoint.url("guarded", "/v1/model"),
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=10,
    )
    assert info.status_code == 200 and API_KEY not in info.text
    assert api_key_digest(API_KEY) not in info.text


def test_batching_gives_the_unbatched_labels(endpoint: Endpoint, reference) -> None:
    url = endpoint.url("main", "/v1/segment")
    images = [noise_rgb(40, 48, seed=s) for s in range(6)] + [noise_rgb(33, 51, seed=9)]
    bodies = [encode(Image.fromarray(image), "PNG") for image in images]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: post(url, body, "image/png"), bodies))
    for image, response in zip(images, responses):
        assert response.status_code == 200
        labels = np.asarray(Image.open(io.BytesIO(response.content)))
        np.testing.assert_array_equal(labels, reference(image))
    info = requests.get(endpoint.url("main", "/v1/model"), timeout=10).json()
    assert info["batching"] is True
    unbatched = requests.get(
        endpoint.url("guarded", "/v1/model"),
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=10,
    ).json()
    assert unbatched["batching"] is False  # the default on CPU


def test_model_and_health(endpoint: Endpoint) -> None:
    info = requests.get(endpoint.url("main", "/v1/model"), timeout=10).json()
    assert info["name"] == Path(endpoint.package).name and info["version"] is None
    assert info["architecture"] == "unet" and info["classes"] == list(CLASSES)
    assert info["metrics"] == {"val_miou": 0.5}
    assert info["recipe"]["mode"] == "whole"
    assert info["limits"]["max_pixels"] == PIXEL_LIMIT and info["limits"]["min_side"] == MIN_SIDE
    health = requests.get(endpoint.url("main", "/v1/health"), timeout=10).json()
    assert health["status"] == "ok"


def test_metrics_reach_rays_prometheus_endpoint(endpoint: Endpoint) -> None:
    import ray

    node = ray._private.worker.global_worker.node
    url = f"http://127.0.0.1:{node.metrics_export_port}/metrics"
    body = encode(Image.fromarray(noise_rgb(32, 32)), "PNG")
    post(endpoint.url("main", "/v1/segment"), body, "image/png")

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()

    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        text = scrape()
        wanted = ("ray_segplatform_serve_requests", "ray_segplatform_serve_latency_s")
        if all(name in text for name in wanted) and "ray_serve_num_http_requests" in text:
            break
        time.sleep(2)
    assert 'status="200"' in text and "ray_segplatform_serve_requests" in text
    assert "ray_segplatform_serve_batch_size" in text
    assert "ray_serve_num_http_requests" in text  # Serve's own


def test_web_page_in_headless_chromium(endpoint: Endpoint, artifacts_dir: Path, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("Debian's chromium is not installed (scripts/system-deps.sh installs it)")
    image_path = tmp_path / "scan.png"
    Image.fromarray(noise_rgb(120, 160, seed=8)).save(image_path)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(chromium),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            failed: list[str] = []  # every request the page makes must succeed
            page.on(
                "response",
                lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None,
            )
            page.on("requestfailed", lambda r: failed.append(f"failed {r.url}"))
            page.goto(endpoint.url("main", "/"))
            page.wait_for_selector("#legend li", timeout=30_000)
            page.set_input_files("#file", str(image_path))
            page.wait_for_function(
                "document.getElementById('overlay').naturalWidth > 0", timeout=60_000
            )
            page.wait_for_selector("#areas tbody tr", timeout=30_000)
            legend = page.locator("#legend li").all_inner_texts()
            assert legend == list(CLASSES)
            assert page.eval_on_selector("#overlay", "img => img.naturalWidth") == 640
            assert page.locator("#error").inner_text() == ""
            assert failed == []
            shot = artifacts_dir / "serve-page.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
    print(json.dumps({"legend": legend}))


def _register(tracking_uri: str, package: str | Path, buffer: Path, name: str) -> str:
    """Log ``package`` as a run's ``model`` and register it as a version of ``name`` holding
    the alias ``champion``; the version number."""
    from segplatform.tracking import RunTracker

    tracker = RunTracker(tracking_uri, "watched", f"v-{buffer.name}", buffer_dir=buffer)
    tracker.log_artifacts(package, "model")
    tracker.register_model("model", name, alias="champion", promote="always")
    assert tracker.finish(timeout=60)
    (registration,) = tracker.registrations
    return registration.version


def _serves_cleanly(info_url: str, segment_url: str, version: str, why: str) -> None:
    """Wait until ``/v1/model`` names ``version``; then it has no reload error and a segment
    request is answered by that version."""
    recovered = wait_for(
        lambda: (lambda info: info if info["version"] == version else None)(
            requests.get(info_url, timeout=10).json()
        ),
        90,
        why,
    )
    assert recovered["reload_error"] is None
    body = encode(Image.fromarray(noise_rgb(40, 40)), "PNG")
    answer = post(segment_url, body, "image/png")
    assert answer.status_code == 200 and answer.headers["X-Model-Version"] == version


def test_alias_watch_keeps_serving_through_a_version_that_cannot_load(
    endpoint: Endpoint, tiny_package: str, tmp_path: Path
) -> None:
    """The alias moves to a version whose weights are broken: version 1 keeps answering,
    ``/v1/model`` says which version failed and why, the failure counter rises; once the alias
    moves to a good version the watcher (which kept retrying) serves it and the error clears."""
    import shutil

    from ray import serve

    from segplatform.serve.app import build_app

    tracking = f"sqlite:///{tmp_path / 'registry.db'}"
    name = "watched-" + uuid.uuid4().hex[:6]
    assert _register(tracking, tiny_package, tmp_path / "b1", name) == "1"
    app = f"watched-{uuid.uuid4().hex[:8]}"
    settings = {
        "model": f"models:/{name}@champion",
        "tracking_uri": tracking,
        "num_cpus": 0.5,
        "reload_interval_s": 0.5,
        "torch_threads": 1,
    }
    serve.run(build_app(settings), name=app, route_prefix="/watched")
    try:
        info_url = endpoint.base + "/watched/v1/model"
        segment_url = endpoint.base + "/watched/v1/segment"
        body = encode(Image.fromarray(noise_rgb(40, 40)), "PNG")
        first = requests.get(info_url, timeout=10).json()
        assert (first["version"], first["reload_error"]) == ("1", None)

        broken = tmp_path / "broken" / "model"
        shutil.copytree(tiny_package, broken)
        (broken / "model.safetensors").write_bytes(b"these are not weights")
        assert _register(tracking, broken, tmp_path / "b2", name) == "2"
        failed = wait_for(
            lambda: requests.get(info_url, timeout=10).json()["reload_error"],
            60,
            "the failed load of version 2 does not show in /v1/model",
        )
        assert failed["version"] == "2" and failed["serving"] == "1" and failed["message"]
        answer = post(segment_url, body, "image/png")
        assert answer.status_code == 200 and answer.headers["X-Model-Version"] == "1"
        assert requests.get(info_url, timeout=10).json()["version"] == "1"

        import ray

        node = ray._private.worker.global_worker.node
        metrics_url = f"http://127.0.0.1:{node.metrics_export_port}/metrics"

        def failures() -> bool:
            with urllib.request.urlopen(metrics_url, timeout=5) as response:
                text = response.read().decode()
            return any(
                line.startswith("ray_segplatform_serve_reload_failures")
                and f'model="{name}"' in line
                and float(line.rsplit(" ", 1)[1]) > 0
                for line in text.splitlines()
            )

        wait_for(failures, 60, "no reload failure in the metrics")

        assert _register(tracking, tiny_package, tmp_path / "b3", name) == "3"
        _serves_cleanly(info_url, segment_url, "3", "the watcher did not move on to version 3")
    finally:
        serve.delete(app)


def test_alias_watch_keeps_serving_while_the_registry_is_down(
    endpoint: Endpoint, tiny_package: str, tmp_path: Path
) -> None:
    """The registry's MLflow server is killed (SIGKILL): version 1 keeps answering and
    ``/v1/model`` says the check failed (no version resolved) and why; the server comes back on
    its port with the alias moved to version 2, and the watcher, which kept retrying, serves
    version 2 and clears the error."""
    import os
    import signal

    from ray import serve

    from segplatform.serve.app import build_app
    from segplatform.services.mlflow_server import MLflowServer

    server = MLflowServer(tmp_path / "mlflow")
    server.start(timeout=120)
    port = server.port
    app = f"registry-{uuid.uuid4().hex[:8]}"
    name = "registry-down-" + uuid.uuid4().hex[:6]
    try:
        assert _register(server.tracking_uri, tiny_package, tmp_path / "b1", name) == "1"
        settings = {
            "model": f"models:/{name}@champion",
            "tracking_uri": server.tracking_uri,
            "num_cpus": 0.5,
            "reload_interval_s": 0.5,
            "torch_threads": 1,
        }
        serve.run(build_app(settings), name=app, route_prefix="/registry")
        info_url = endpoint.base + "/registry/v1/model"
        segment_url = endpoint.base + "/registry/v1/segment"
        body = encode(Image.fromarray(noise_rgb(40, 40)), "PNG")
        assert requests.get(info_url, timeout=10).json()["reload_error"] is None

        assert server.pid is not None
        os.killpg(server.pid, signal.SIGKILL)
        server.stop(timeout=5)
        failed = wait_for(
            lambda: requests.get(info_url, timeout=10).json()["reload_error"],
            60,
            "the registry outage does not show in /v1/model",
        )
        assert failed["version"] is None and failed["serving"] == "1" and failed["message"]
        answer = post(segment_url, body, "image/png")
        assert answer.status_code == 200 and answer.headers["X-Model-Version"] == "1"

        server.start(timeout=120)
        assert server.port == port
        assert _register(server.tracking_uri, tiny_package, tmp_path / "b2", name) == "2"
        _serves_cleanly(
            info_url,
            segment_url,
            "2",
            "the watcher did not follow the alias to version 2 after the registry came back",
        )
    finally:
        serve.delete(app)
        server.stop()
