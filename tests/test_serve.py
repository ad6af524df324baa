"""The HTTP service, in process: every endpoint, every refusal, micro-batching, schema fuzzing."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import struct
import time
import zlib

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from test_predict import make_dataset, make_run
from transferlab.serve import create_app, sniff_image

LOGGER = "transferlab.serve"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("serve") / "data")


@pytest.fixture(scope="module")
def run_dir(data):
    return make_run(data.parent / "run", data)


@pytest.fixture(scope="module")
def app(run_dir):
    # A low body limit so the oversized-body test stays small; everything else at defaults.
    return create_app(run_dir, max_body_bytes=256 * 1024, max_images=8)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:  # runs the lifespan: runtime built before the first request
        yield c


@pytest.fixture(scope="module")
def jpeg(data):
    return next((data / "test" / "red").glob("*.jpg")).read_bytes()


def png_bomb(w: int = 20000, h: int = 20000) -> bytes:
    """A valid PNG header claiming w×h 1-bit pixels with a few hundred bytes of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + (w + 7) // 8) * 8)  # 8 rows; the header is the trap
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _files(*blobs, field="file"):
    return [(field, (f"img{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]


# -- happy paths ------------------------------------------------------------------------------


def test_health_and_model(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert r.json()["engine"] in ("openvino", "onnxruntime", "torch")
    m = client.get("/model").json()
    assert m["classes"] == ["blue", "red"]
    assert m["backbone"]["spec"] == "mobilenetv2_035"
    assert m["preprocess"]["input_size"] == [64, 64] and m["preprocess"]["resize_size"] == [73, 73]
    assert "accuracy" in m["metrics"]["test"]
    assert m["limits"]["max_body_bytes"] == 256 * 1024
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/predict", "/health", "/model"}
    assert client.get("/docs").status_code == 200


def test_single_multiple_and_top_k(client, app, jpeg, data):
    blue = next((data / "test" / "blue").glob("*.jpg")).read_bytes()
    r = client.post("/predict", files=_files(jpeg))
    assert r.status_code == 200
    (pred,) = r.json()["predictions"]
    assert pred["label"] == "red" and 0.5 < pred["probability"] <= 1
    assert [t["label"] for t in pred["top_k"]] == ["red"]

    r = client.post("/predict?top_k=2", files=_files(jpeg, blue, jpeg))
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == ["red", "blue", "red"]
    for p in preds:
        assert len(p["top_k"]) == 2
        assert sum(t["probability"] for t in p["top_k"]) == pytest.approx(1, abs=1e-5)
        assert p["top_k"][0]["probability"] >= p["top_k"][1]["probability"]
    # Same pixels as the engine sees: the server answer equals the batch engine's.
    engine = app.state.engine
    expected = engine.predict_images([jpeg])[0]
    assert preds[0]["probability"] == pytest.approx(float(expected.max()), abs=1e-5)
    # top_k larger than the number of classes is clamped, not an error.
    assert (
        len(client.post("/predict?top_k=50", files=_files(jpeg)).json()["predictions"][0]["top_k"])
        == 2
    )


def test_base64_json_and_threshold(client, jpeg):
    b64 = base64.b64encode(jpeg).decode()
    r = client.post("/predict", json={"images": [b64, "data:image/jpeg;base64," + b64]})
    assert r.status_code == 200
    a, b = r.json()["predictions"]
    assert a == b and a["label"] == "red"
    r = client.post("/predict?threshold=1.0", json={"images": [b64]})
    assert r.json()["predictions"][0]["label"] == "unknown"


def test_a_raw_image_body_is_one_image(client, jpeg):
    """``curl --data-binary @x.jpg -H 'Content-Type: image/jpeg'``: the body is the image, and is
    sniffed like an upload (a text body sent as image/png is still refused)."""
    r = client.post("/predict", content=jpeg, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    multipart = client.post("/predict", files=_files(jpeg)).json()
    assert r.json() == multipart
    r = client.post("/predict", content=b"hello", headers={"content-type": "image/png"})
    assert r.status_code == 415 and r.json()["error"] == "not an image"


def test_docs_work_offline(client):
    """/docs loads Swagger UI from this server, not a CDN: every script and stylesheet it names
    is served here."""
    import re

    html = client.get("/docs").text
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", html)
    assert assets and not [a for a in assets if a.startswith(("http:", "https:", "//"))]
    for asset in assets:
        if asset.endswith((".js", ".css")):
            assert client.get(asset).status_code == 200, asset


def test_concurrent_requests_are_micro_batched(run_dir, jpeg):
    app = create_app(run_dir, batch_wait_ms=200, max_batch=32)

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            rs = await asyncio.gather(*(c.post("/predict", files=_files(jpeg)) for _ in range(8)))
            return rs, (await c.get("/health")).json()

    responses, health = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    assert health["images"] == 8 and health["batches"] < 8  # several requests per batch


# -- refusals ---------------------------------------------------------------------------------


def _cut(b: bytes) -> bytes:
    return b[: len(b) // 2]


CASES = {
    # name: (request kwargs builder, status, error)
    "truncated jpeg": (lambda j: {"files": _files(_cut(j))}, 422, "corrupt image"),
    "zero bytes": (lambda j: {"files": _files(b"")}, 422, "empty file"),
    "text named .jpg": (
        lambda j: {"files": _files(b"hello, I am not a picture")},
        415,
        "not an image",
    ),
    "png bomb 20000x20000": (lambda j: {"files": _files(png_bomb())}, 413, "image too large"),
    "over the pixel limit": (
        lambda j: {"files": _files(png_bomb(7000, 7000))},
        413,
        "image too large",
    ),
    "damaged png header": (lambda j: {"files": _files(png_bomb()[:20])}, 422, "corrupt image"),
    "wrong field name": (lambda j: {"files": _files(j, field="image")}, 422, "missing file"),
    "form without file": (
        lambda j: {"data": {"x": "1"}, "files": _files(j, field="y")},
        422,
        "missing file",
    ),
    "oversized body": (
        lambda j: {"files": _files(b"\xff\xd8\xff" + bytes(300 * 1024))},
        413,
        "body too large",
    ),
    "too many images": (lambda j: {"files": _files(*[j] * 9)}, 413, "too many images"),
    "bad base64": (lambda j: {"json": {"images": ["%%%not base64%%%"]}}, 422, "invalid base64"),
    "json without images": (lambda j: {"json": {"pictures": []}}, 422, "missing images"),
    "empty image list": (lambda j: {"json": {"images": []}}, 422, "missing images"),
    "invalid json": (
        lambda j: {"content": b"{nope", "headers": {"content-type": "application/json"}},
        422,
        "invalid JSON",
    ),
    "plain text body": (
        lambda j: {"content": b"hi", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported content type",
    ),
    "bad top_k": (lambda j: {"files": _files(j), "params": {"top_k": 0}}, 422, "invalid request"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_4xx_json_error_and_one_log_line(client, jpeg, caplog, name):
    build, status, error = CASES[name]
    with caplog.at_level(logging.INFO, logger=LOGGER):
        r = client.post("/predict", **build(jpeg))
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == error and body["detail"]
    lines = [rec for rec in caplog.records if rec.name == LOGGER]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    message = lines[0].getMessage()
    assert f"-> {status}" in message and "\n" not in message
    assert "Traceback" not in caplog.text and not any(rec.exc_info for rec in caplog.records)
    assert client.get("/health").status_code == 200  # still serving


def test_body_limit_is_enforced_while_streaming(client, caplog):
    def chunks():  # no Content-Length: the limit must be applied as bytes arrive
        for _ in range(40):
            yield b"\xff" * 16384

    with caplog.at_level(logging.INFO, logger=LOGGER):
        r = client.post(
            "/predict",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
    assert r.status_code == 413 and r.json()["error"] == "body too large"
    assert len([rec for rec in caplog.records if rec.name == LOGGER]) == 1


def test_unknown_route_and_method_are_json(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"] == "not found"
    r = client.get("/predict")
    assert r.status_code == 405 and r.json()["error"] == "method not allowed"


def test_timeout_and_internal_errors_keep_the_server_up(run_dir, jpeg, caplog):
    app = create_app(run_dir, timeout_s=0.3)
    with TestClient(app) as c:
        batcher = app.state.batcher
        real = batcher.infer

        def slow(images):
            time.sleep(1.0)
            return real(images)

        def broken(images):
            raise RuntimeError("simulated runtime failure")

        with caplog.at_level(logging.INFO, logger=LOGGER):
            batcher.infer = slow
            r = c.post("/predict", files=_files(jpeg))
            assert r.status_code == 504 and r.json()["error"] == "timeout"
            time.sleep(0.8)  # the one inference thread finishes the abandoned batch
            batcher.infer = broken
            r = c.post("/predict", files=_files(jpeg))
            assert r.status_code == 500 and "simulated" in r.json()["detail"]
            batcher.infer = real
            assert c.post("/predict", files=_files(jpeg)).status_code == 200
        lines = [rec.getMessage() for rec in caplog.records if rec.name == LOGGER]
        assert len(lines) == 2 and "-> 504" in lines[0] and "-> 500" in lines[1]
        assert "Traceback" not in caplog.text
        assert c.get("/health").json()["status"] == "ok"


def test_sniffing_uses_bytes_not_names():
    assert sniff_image(b"\xff\xd8\xff\xe0rest") == "JPEG"
    assert sniff_image(png_bomb()[:16]) == "PNG"
    assert sniff_image(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WebP"
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="BMP")
    assert sniff_image(buf.getvalue()) == "BMP"
    assert sniff_image(b"<html>") is None and sniff_image(b"") is None


# -- schema fuzzing ---------------------------------------------------------------------------


def test_openapi_schema_fuzzing(app):
    """Schemathesis against the app's own OpenAPI schema, in process, bounded examples.

    ``positive_data_acceptance`` is left out: schema-valid random bytes in ``file`` are not an
    image, and refusing them (415) is the point of content sniffing.
    """
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    strategy = schema.as_strategy(generation_mode=GenerationMode.POSITIVE) | schema.as_strategy(
        generation_mode=GenerationMode.NEGATIVE
    )
    seen: set[int] = set()

    @given(case=strategy)
    @settings(
        max_examples=20,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
        seen.add(response.status_code)
        assert response.status_code < 500

    run()
    assert seen  # examples really ran


def test_cli_serve_binds_localhost_and_warns_for_all_interfaces(run_dir, monkeypatch, caplog):
    import typer
    import uvicorn
    from typer.testing import CliRunner

    from transferlab.cli_ship import register

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    app = typer.Typer()
    register(app)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        r = CliRunner().invoke(app, ["serve", str(run_dir), "--port", "8123"])
        assert r.exit_code == 0, r.output
        assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 8123
        assert not [rec for rec in caplog.records if "exposes" in rec.getMessage()]
        r = CliRunner().invoke(app, ["serve", str(run_dir), "--host", "0.0.0.0"])
        assert r.exit_code == 0, r.output
    assert calls[-1]["host"] == "0.0.0.0"
    assert any("exposes" in rec.getMessage() for rec in caplog.records)


# -- hardening (issue 11): limits that hold under abuse, nothing internal in responses ----------


def test_head_wherever_get_exists(client):
    for path in ("/health", "/model", "/openapi.json"):
        r = client.head(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith("application/json")
    assert client.head("/predict").status_code == 405


def test_deeply_nested_json_is_a_422_not_a_500(client):
    body = b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "invalid JSON"


def test_errors_show_no_object_reprs_or_server_paths(client, run_dir):
    r = client.post("/predict", files=_files(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64))
    assert r.status_code == 422
    assert " object at 0x" not in r.text
    assert str(run_dir) not in client.get("/model").text


def test_public_spec_drops_server_folders():
    from transferlab.serve.app import _public_spec

    assert _public_spec("local-dir:/srv/weights/mobilenetv2_100") == "local-dir:mobilenetv2_100"
    assert _public_spec("hf-hub:timm/resnet50.a1_in1k") == "hf-hub:timm/resnet50.a1_in1k"
    assert _public_spec("mobilenetv2_035") == "mobilenetv2_035"


def test_scrub_removes_paths_and_reprs():
    from transferlab.serve.guards import scrub

    text = "cannot identify image file <_io.BytesIO object at 0x7f3a2b> in /home/u/runs/x/a.jpg"
    assert scrub(text) == "cannot identify image file the upload in a.jpg"
    assert scrub({"d": ["multipart/form-data"]}) == {"d": ["multipart/form-data"]}


def _guard(max_in_flight: int, body_timeout_s: float = 5.0):
    from transferlab.serve.guards import GuardMiddleware

    seen = []

    async def inner(scope, receive, send):
        seen.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return GuardMiddleware(inner, max_body=1000, max_in_flight=max_in_flight,
                           body_timeout_s=body_timeout_s), seen  # fmt: skip


async def _call(guard, body: bytes, *, slow_s: float = 0.0, hold: asyncio.Event | None = None):
    scope = {"type": "http", "method": "POST", "path": "/predict",
             "headers": [(b"content-length", str(len(body)).encode())]}  # fmt: skip
    sent = []

    async def receive():
        if slow_s:
            await asyncio.sleep(slow_s)
        if hold is not None:
            await hold.wait()
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    await guard(scope, receive, send)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_bytes_in_flight_cap_refuses_with_503_before_reading():
    async def scenario():
        guard, seen = _guard(max_in_flight=1500)
        hold = asyncio.Event()
        first = asyncio.create_task(_call(guard, b"x" * 900, hold=hold))
        await asyncio.sleep(0.05)
        second = await _call(guard, b"y" * 900)  # 900 + 900 > 1500: refused unread
        hold.set()
        return await first, second, seen, guard.in_flight

    first, second, seen, left = asyncio.run(scenario())
    assert (first, second) == (200, 503)
    assert seen == [b"x" * 900] and left == 0


def test_slow_body_times_out_with_408():
    guard, seen = _guard(max_in_flight=10_000, body_timeout_s=0.1)
    assert asyncio.run(_call(guard, b"z" * 10, slow_s=1.0)) == 408
    assert seen == [] and guard.in_flight == 0


def test_rate_limit_filter_bounds_a_log_storm():
    from transferlab.serve.limits import RateLimitFilter

    f = RateLimitFilter(burst=5, window_s=60)
    rec = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "accept failed", (), None)
    passed = sum(f.filter(rec) for _ in range(10_000))
    assert passed == 5
    f.window_s = 0  # next window: the first record says how many were dropped
    assert f.filter(rec) and "9995 similar" in rec.getMessage()


@pytest.fixture()
def guarded_server():
    """A trivial app behind GuardedH11 (cap 2 connections, 0.3 s for a request head)."""
    import socket
    import threading

    import uvicorn

    from transferlab.serve.limits import guarded_protocol

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                            http=guarded_protocol(2, 0.3), lifespan="off")  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(5)


def _recv_all(sock, timeout: float = 2.0) -> bytes:
    sock.settimeout(timeout)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except TimeoutError:
        pass
    return got


def test_slow_request_head_is_cut_off(guarded_server):
    import socket

    with socket.create_connection(("127.0.0.1", guarded_server)) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
        t0 = time.perf_counter()
        assert _recv_all(slow) == b""  # closed by the server, not by our timeout
        assert time.perf_counter() - t0 < 1.5
    with socket.create_connection(("127.0.0.1", guarded_server)) as ok:
        ok.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _recv_all(ok).startswith(b"HTTP/1.1 200")


def test_connections_over_the_cap_get_503(guarded_server):
    import socket

    held = [socket.create_connection(("127.0.0.1", guarded_server)) for _ in range(2)]
    try:
        time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", guarded_server)) as extra:
            assert _recv_all(extra).startswith(b"HTTP/1.1 503")
    finally:
        for s in held:
            s.close()


def test_tune_process_makes_room_for_the_connection_cap():
    import resource

    from transferlab.serve.limits import tune_process

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1000:
        pytest.skip(f"hard open-files limit {hard} is below the test's need")
    assert tune_process(500) == 500
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 500 + 256
