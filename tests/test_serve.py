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
