"""taiyi serve: OpenAI-shaped API, batching worker, limits and hostile input, shutdown, disconnects, short load.

Fast checks go through FastAPI's TestClient against the app factory; concurrency, disconnects, the upload cap
while reading and graceful shutdown run a real uvicorn on 127.0.0.1 (ephemeral port) in a thread. A *gated*
pipeline (a real tiny pipeline whose calls wait for an event and are recorded) makes the queue deterministic.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import select
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
httpx2 = pytest.importorskip("httpx2", reason="httpx2 (FastAPI's TestClient transport) is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from taiyi.serve import ServeConfig, create_app  # noqa: E402
from taiyi.serve.testing import running_server  # noqa: E402
from taiyi.serve.worker import Job, ShuttingDown, Worker  # noqa: E402

STEPS = 2
KEY = "sk-test-0123456789abcdef"
GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"


# --- helpers ---------------------------------------------------------------------------------------------
def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def decode(item: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def body(prompt: str = "小桥流水人家", **extra) -> dict:
    return {"prompt": prompt, "steps": STEPS, **extra}


JSON = {"Content-Type": "application/json"}


def as_json(payload: dict) -> bytes:
    """JSON as the wire carries it, escapes and all (httpx's ``json=`` cannot send a lone surrogate)."""
    return json.dumps(payload).encode("ascii")


def error_of(response) -> dict:
    payload = response.json()
    assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}, payload
    assert "\n" not in payload["error"]["message"]
    return payload["error"]


def metric(app, name: str, **labels) -> float:
    return app.state.taiyi.metrics.registry.get_sample_value(name, labels) or 0.0


def idle(app) -> bool:
    worker = app.state.taiyi.worker
    return worker.depth() == 0 and not worker.running


class Gated:
    """A real pipeline whose model calls wait for ``release`` and are recorded (prompts) when they start."""

    def __init__(self, pipe):
        self._pipe = pipe
        self.release = threading.Event()
        self.calls: list[list[str]] = []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def _hold(self, prompts: list[str]) -> None:
        self.calls.append(prompts)
        assert self.release.wait(30), "gate never released"

    def generate_many(self, prompts, **kwargs):
        self._hold(list(prompts))
        return self._pipe.generate_many(prompts, **kwargs)

    def edit(self, image, prompt, **kwargs):
        self._hold([prompt])
        return self._pipe.edit(image, prompt, **kwargs)

    def inpaint(self, image, mask, prompt, **kwargs):
        self._hold([prompt])
        return self._pipe.inpaint(image, mask, prompt, **kwargs)


@contextmanager
def serve_client(pipeline, **settings):
    app = create_app(ServeConfig(**settings), pipeline=pipeline)
    with TestClient(app) as client:
        client.app_ref = app
        yield client


@contextmanager
def live_server(app):
    with running_server(app) as live:
        yield live.url, live.port, live.server


def can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# --- the OpenAI-shaped API --------------------------------------------------------------------------------
def test_generation_answers_openai_shape_with_seeds_and_parameters_chunk(pipe_zh):
    with serve_client(pipe_zh) as client:
        response = client.post(GENERATIONS, json=body("小橋流水人家", n=2, seed=5), headers={"X-Request-ID": "req-42"})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "req-42"
    payload = response.json()
    assert isinstance(payload["created"], int) and abs(payload["created"] - time.time()) < 60
    assert [item["seed"] for item in payload["data"]] == [5, 6]
    for item in payload["data"]:
        assert item["revised_prompt"] == "小桥流水人家"  # Traditional → Simplified, as the model reads it
        image = decode(item)
        assert image.format == "PNG" and image.size == (64, 64)
        text = image.text["parameters"]
        assert text == item["parameters"]
        assert text.startswith("小橋流水人家\n") and f"Seed: {item['seed']}," in text and "Steps: 2," in text
    assert "CFG rescale" not in payload["data"][0]["parameters"]  # this model's default: plain CFG
    # Each image is the one its seed draws alone (rows are independent).
    alone = pipe_zh.generate_many(["小橋流水人家"], seeds=[6], steps=STEPS)
    diff = np.abs(np.asarray(decode(payload["data"][1]), np.int16) - np.asarray(alone.images[0], np.int16))
    assert diff.max() <= 2


def test_guidance_rescale_is_a_request_setting_recorded_in_the_image(pipe_zh):
    with serve_client(pipe_zh) as client:
        response = client.post(GENERATIONS, json=body("夜晚的江河", seed=3, guidance_rescale=0.7))
    assert response.status_code == 200, response.text
    item = response.json()["data"][0]
    assert "CFG rescale: 0.7," in item["parameters"]
    alone = pipe_zh.generate_many(["夜晚的江河"], seeds=[3], steps=STEPS, guidance_rescale=0.7)
    assert np.abs(np.asarray(decode(item), np.int16) - np.asarray(alone.images[0], np.int16)).max() <= 2


def test_compatible_requests_share_one_call_and_equal_their_singles(pipe_zh):
    gated = Gated(pipe_zh)
    with serve_client(gated, max_batch=4, batch_wait=0) as client, ThreadPoolExecutor(6) as pool:
        app = client.app_ref
        requests = [
            ("甲", 1, None),  # computed first, alone: it holds the worker while the others queue
            ("乙", 2, None),
            ("丙", 3, None),
            ("丁", 4, None),
            ("戊", 5, "72x72"),  # another size: another key, must not block the next one
            ("己", 6, None),
        ]
        futures = []
        for i, (prompt, seed, size) in enumerate(requests):
            extra = {"size": size} if size else {}
            futures.append(pool.submit(client.post, GENERATIONS, json=body(prompt, seed=seed, **extra)))
            if i == 0:
                wait_until(lambda: gated.calls, what="first call")
            else:
                wait_until(lambda i=i: app.state.taiyi.worker.depth() == i, what=f"{i} queued")
        gated.release.set()
        responses = [f.result(timeout=60) for f in futures]
    assert [r.status_code for r in responses] == [200] * 6
    assert gated.calls == [["甲"], ["乙", "丙", "丁", "己"], ["戊"]]
    assert metric(app, "taiyi_batch_rows_bucket", kind="generate", le="1.0") == 2
    assert metric(app, "taiyi_batch_rows_count", kind="generate") == 3
    batched = decode(responses[2].json()["data"][0])
    alone = pipe_zh.generate_many(["丙"], seeds=[3], steps=STEPS).images[0]
    assert np.abs(np.asarray(batched, np.int16) - np.asarray(alone, np.int16)).max() <= 2
    assert decode(responses[4].json()["data"][0]).size == (72, 72)


def test_edit_without_mask_is_image_to_image(pipe_zh):
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with serve_client(pipe_zh) as client:
        response = client.post(
            EDITS,
            files={"image": ("photo.png", png_bytes(source), "image/png")},
            data={"prompt": "改成水彩画", "seed": "3", "steps": "4", "n": "2"},
        )
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["seed"] for d in data] == [3, 4]
    assert "Denoising strength: 0.6" in data[0]["parameters"]
    assert decode(data[0]).size == (64, 64)


def test_inpaint_masks_openai_alpha_taiyi_white_and_image_alpha_agree(pipe_zh):
    rng = np.random.default_rng(1)
    source = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    redraw = np.zeros((64, 64), bool)
    redraw[16:48, 8:40] = True
    openai_mask = np.zeros((64, 64, 4), np.uint8)
    openai_mask[..., 3] = np.where(redraw, 0, 255)  # transparent = edit (OpenAI)
    taiyi_mask = Image.fromarray(np.where(redraw, 255, 0).astype(np.uint8), "L")  # white = redraw (taiyi)
    with_alpha = source.convert("RGBA")
    with_alpha.putalpha(Image.fromarray(np.where(redraw, 0, 255).astype(np.uint8)))

    form = {"prompt": "一轮明月", "seed": "11", "steps": "3"}
    with serve_client(pipe_zh) as client:

        def inpaint(image: Image.Image, mask: Image.Image | None):
            files = {"image": ("a.png", png_bytes(image), "image/png")}
            if mask is not None:
                files["mask"] = ("m.png", png_bytes(mask), "image/png")
            response = client.post(EDITS, files=files, data=form)
            assert response.status_code == 200, response.text
            return response.json()["data"][0]

        by_alpha = inpaint(source, Image.fromarray(openai_mask, "RGBA"))
        by_white = inpaint(source, taiyi_mask)
        by_image_alpha = inpaint(with_alpha, None)
        mismatch = client.post(
            EDITS,
            files={
                "image": ("a.png", png_bytes(source), "image/png"),
                "mask": ("m.png", png_bytes(Image.new("L", (32, 32))), "image/png"),
            },
            data=form,
        )
        empty = client.post(
            EDITS,
            files={
                "image": ("a.png", png_bytes(source), "image/png"),
                "mask": ("m.png", png_bytes(Image.new("L", (64, 64))), "image/png"),
            },
            data=form,
        )
    out = np.asarray(decode(by_alpha).convert("RGB"))
    src = np.asarray(source)
    assert np.array_equal(out[~redraw], src[~redraw])  # everything outside the mask is the input's own
    assert not np.array_equal(out[redraw], src[redraw])
    assert "Denoising strength: 1," in by_alpha["parameters"]
    assert by_white["b64_json"] == by_alpha["b64_json"] == by_image_alpha["b64_json"]
    assert mismatch.status_code == 400 and error_of(mismatch)["code"] == "invalid_mask"
    assert empty.status_code == 400 and error_of(empty)["code"] == "invalid_mask"


# --- hostile input ------------------------------------------------------------------------------------
def test_hostile_requests_get_the_right_4xx_and_the_server_keeps_serving(pipe_zh, caplog):
    auth = {"Authorization": f"Bearer {KEY}"}
    png = png_bytes(Image.new("RGB", (64, 64), "white"))
    serve_logger = logging.getLogger("taiyi.serve")
    serve_logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="taiyi.serve")
    try:
        with serve_client(pipe_zh, api_key=KEY, max_upload_bytes=2**20) as client:
            app = client.app_ref
            cases = {
                "malformed JSON": (
                    client.post(
                        GENERATIONS, content=b'{"prompt": "x",', headers={**auth, "Content-Type": "application/json"}
                    ),
                    400,
                    "invalid_json",
                ),
                "n=10000": (client.post(GENERATIONS, json=body(n=10000), headers=auth), 400, "invalid_value"),
                "lone surrogate": (  # JSON's "\ud800": a str that no tokenizer (nor UTF-8) takes
                    client.post(GENERATIONS, content=as_json(body(prompt="山\ud800")), headers={**auth, **JSON}),
                    400,
                    "invalid_value",
                ),
                "size": (client.post(GENERATIONS, json=body(size="100000x100000"), headers=auth), 400, "invalid_size"),
                "steps=10**9": (client.post(GENERATIONS, json=body(steps=10**9), headers=auth), 400, "invalid_value"),
                "guidance_end=0": (
                    client.post(GENERATIONS, json=body(guidance_end=0), headers=auth),
                    400,
                    "invalid_value",
                ),
                "guidance_rescale=2": (
                    client.post(GENERATIONS, json=body(guidance_rescale=2), headers=auth),
                    400,
                    "invalid_value",
                ),
                "unknown field": (
                    client.post(GENERATIONS, json=body(negative="x"), headers=auth),
                    400,
                    "unknown_parameter",
                ),
                "url format": (
                    client.post(GENERATIONS, json=body(response_format="url"), headers=auth),
                    400,
                    "unsupported_response_format",
                ),
                "JSON list": (client.post(GENERATIONS, json=["x"], headers=auth), 400, "invalid_request"),
                "50 MB upload": (
                    client.post(
                        EDITS,
                        files={"image": ("big.png", b"\0" * (50 * 2**20), "image/png")},
                        data={"prompt": "x"},
                        headers=auth,
                    ),
                    413,
                    "payload_too_large",
                ),
                "non-image upload": (
                    client.post(
                        EDITS,
                        files={"image": ("x.png", b"#!/bin/sh\necho hi\n", "image/png")},
                        data={"prompt": "x"},
                        headers=auth,
                    ),
                    415,
                    "unsupported_media_type",
                ),
                "GIF upload": (
                    client.post(
                        EDITS,
                        files={"image": ("x.gif", _gif(), "image/gif")},
                        data={"prompt": "x"},
                        headers=auth,
                    ),
                    415,
                    "unsupported_media_type",
                ),
                "wrong key": (
                    client.post(GENERATIONS, json=body(), headers={"Authorization": "Bearer sk-wrong-key-999"}),
                    401,
                    "invalid_api_key",
                ),
                "missing key": (client.post(GENERATIONS, json=body()), 401, "missing_api_key"),
                "missing key, big upload": (
                    client.post(EDITS, files={"image": ("a.png", png, "image/png")}, data={"prompt": "x"}),
                    401,
                    "missing_api_key",
                ),
                "metrics without key": (client.get("/metrics"), 401, "missing_api_key"),
            }
            for name, (response, status, code) in cases.items():
                assert response.status_code == status, (name, response.text)
                error = error_of(response)
                assert error["code"] == code, (name, error)
                assert error["type"] == "invalid_request_error"
                if status == 401:
                    assert response.headers["www-authenticate"] == "Bearer"
            assert error_of(cases["n=10000"][0])["param"] == "n"
            assert error_of(cases["steps=10**9"][0])["param"] == "steps"
            assert error_of(cases["guidance_end=0"][0])["param"] == "guidance_end"
            assert error_of(cases["guidance_rescale=2"][0])["param"] == "guidance_rescale"
            ok = client.post(GENERATIONS, json=body(seed=1), headers=auth)
            assert ok.status_code == 200 and ok.json()["data"][0]["seed"] == 1
            assert client.get("/healthz").status_code == 200  # open to probes without the key
            assert metric(app, "taiyi_errors_total", code="invalid_size") == 1
            assert metric(app, "taiyi_errors_total", code="payload_too_large") == 1
            assert metric(app, "taiyi_errors_total", code="invalid_api_key") == 1
    finally:
        serve_logger.removeHandler(caplog.handler)
    assert KEY not in caplog.text and "sk-wrong-key-999" not in caplog.text
    assert "POST /v1/images/generations 401" in caplog.text


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="GIF")
    return buffer.getvalue()


def test_edit_form_fields_in_another_encoding_get_400_not_mojibake(pipe_zh):
    # curl -F "prompt=<prompt.txt" sends the file's bytes as they are; Starlette would read them as latin-1.
    png = png_bytes(Image.new("RGB", (64, 64), "white"))
    prompt = "改成水彩画"
    cases = [
        ("prompt", {"prompt": prompt.encode("gb18030")}),
        ("prompt", {"prompt": prompt.encode("utf-16")}),  # with a BOM, as Windows Notepad saves it
        ("negative_prompt", {"prompt": prompt, "negative_prompt": "模糊".encode("gb18030")}),
        ("model", {"prompt": prompt, "model": "太乙".encode("gb18030")}),
    ]
    with serve_client(pipe_zh) as client:

        def edit(form: dict):
            files = {"image": ("photo.png", png, "image/png")}
            return client.post(EDITS, files=files, data={"steps": str(STEPS), "seed": "1", **form})

        refused = [edit(form) for _, form in cases]
        latin = edit({"prompt": "crème brûlée 水彩"})  # UTF-8 whose characters latin-1 also has: accepted
    for (param, _), response in zip(cases, refused, strict=True):
        assert response.status_code == 400, (param, response.text)
        error = error_of(response)
        assert (error["param"], error["code"]) == (param, "invalid_value")
        assert error["message"].startswith(f"{param} is not valid text: character "), error
        assert error["message"].endswith(" is not Unicode (bytes in an encoding other than UTF-8?); give it in UTF-8")
    assert latin.status_code == 200, latin.text
    assert "crème brûlée" in latin.json()["data"][0]["revised_prompt"]


def test_upload_cap_is_enforced_while_reading(pipe_zh):
    app = create_app(ServeConfig(max_upload_bytes=2**20), pipeline=pipe_zh)
    with live_server(app) as (url, port, _):
        # A declared 50 MB body is refused from its headers: not one body byte is read.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                b"POST /v1/images/edits HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 52428800\r\n\r\n"
            )
            assert s.recv(65536).startswith(b"HTTP/1.1 413")
        # A chunked body (no length) is counted as it arrives and refused once past the cap.
        sent, response = _send_chunked_until_answered(port, total=50 * 2**20)
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        assert sent < 25 * 2**20, f"the server let {sent} bytes in before answering"
        assert httpx2.post(url + GENERATIONS, json=body(seed=2), timeout=30).status_code == 200


def _drain(s: socket.socket) -> bytes:
    """What the peer sent before closing (a loaded machine can fail our send before we read its answer)."""
    s.setblocking(True)
    s.settimeout(5)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except OSError:
        pass
    return data


def _send_chunked_until_answered(port: int, total: int) -> tuple[int, bytes]:
    head = (
        b"POST /v1/images/edits HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    payload = b"\0" * 65536
    chunk = b"%x\r\n" % len(payload) + payload + b"\r\n"
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    part = (
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
    )
    s.sendall(head + b"%x\r\n" % len(part) + part + b"\r\n")  # a well-formed file part that never ends
    s.setblocking(False)
    pending, sent, response = b"", 0, b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and b"\r\n\r\n" not in response:
            want_write = sent < total
            readable, writable, _ = select.select([s], [s] if want_write else [], [], 0.5)
            if readable:
                try:
                    data = s.recv(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                response += data
            elif writable:
                if not pending:
                    pending = chunk
                try:
                    n = s.send(pending)
                except (BrokenPipeError, ConnectionResetError):  # the server answered and closed meanwhile
                    response += _drain(s)
                    break
                pending = pending[n:]
                sent += n
        return sent, response
    finally:
        s.close()


# --- queueing: 429, timeouts, disconnects, shutdown --------------------------------------------------------
def test_full_queue_answers_429_with_retry_after(pipe_zh):
    gated = Gated(pipe_zh)
    with serve_client(gated, queue_size=2) as client, ThreadPoolExecutor(3) as pool:
        app = client.app_ref
        futures = [pool.submit(client.post, GENERATIONS, json=body("甲", seed=1))]
        wait_until(lambda: gated.calls, what="first call")
        futures += [
            pool.submit(client.post, GENERATIONS, json=body(p, seed=s, size="72x72"))
            for p, s in (("乙", 2), ("丙", 3))
        ]
        wait_until(lambda: app.state.taiyi.worker.depth() == 2, what="queue full")
        rejected = client.post(GENERATIONS, json=body("丁", seed=4))
        gated.release.set()
        statuses = [f.result(timeout=60).status_code for f in futures]
    assert rejected.status_code == 429 and error_of(rejected)["code"] == "queue_full"
    assert error_of(rejected)["type"] == "rate_limit_error"
    assert int(rejected.headers["retry-after"]) >= 1
    assert statuses == [200, 200, 200]


def test_timeout_answers_504_and_never_computes_the_queued_request(pipe_zh):
    gated = Gated(pipe_zh)
    with serve_client(gated, timeout=1.0) as client, ThreadPoolExecutor(2) as pool:
        app = client.app_ref
        running = pool.submit(client.post, GENERATIONS, json=body("甲", seed=1, steps=20))
        wait_until(lambda: gated.calls, what="first call")
        queued = pool.submit(client.post, GENERATIONS, json=body("乙", seed=2, size="72x72"))
        responses = [running.result(timeout=30), queued.result(timeout=30)]
        gated.release.set()  # the abandoned running batch now stops at its first step
        wait_until(lambda: idle(app), what="worker idle")
        assert metric(app, "taiyi_dropped_requests_total", reason="aborted") == 1
        assert client.post(GENERATIONS, json=body("丙", seed=3)).status_code == 200
    assert [r.status_code for r in responses] == [504, 504]
    assert all(error_of(r)["code"] == "timeout" for r in responses)
    assert gated.calls == [["甲"], ["丙"]]  # 乙 was dropped before computing
    assert metric(app, "taiyi_dropped_requests_total", reason="abandoned") == 1


def test_client_that_disconnects_before_its_turn_is_dropped(pipe_zh):
    gated = Gated(pipe_zh)
    app = create_app(ServeConfig(), pipeline=gated)
    with live_server(app) as (url, port, _), ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx2.post, url + GENERATIONS, json=body("甲", seed=1), timeout=60)
        wait_until(lambda: gated.calls, what="first call")
        payload = json.dumps(body("乙", seed=2), ensure_ascii=False).encode()
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(payload)
            + payload
        )
        wait_until(lambda: app.state.taiyi.worker.depth() == 1, what="second request queued")
        raw.close()
        wait_until(lambda: metric(app, "taiyi_errors_total", code="client_disconnected") == 1, what="disconnect seen")
        gated.release.set()
        assert first.result(timeout=60).status_code == 200
        wait_until(lambda: idle(app), what="worker idle")
    assert gated.calls == [["甲"]]
    assert metric(app, "taiyi_dropped_requests_total", reason="abandoned") == 1


def test_graceful_shutdown_finishes_running_work_and_rejects_queued_work(pipe_zh):
    gated = Gated(pipe_zh)
    app = create_app(ServeConfig(shutdown_grace=0), pipeline=gated)
    with live_server(app) as (url, port, server), ThreadPoolExecutor(3) as pool:
        post = lambda prompt, seed: httpx2.post(url + GENERATIONS, json=body(prompt, seed=seed), timeout=60)  # noqa: E731
        running = pool.submit(post, "甲", 1)
        wait_until(lambda: gated.calls, what="first call")
        queued = [pool.submit(post, "乙", 2), pool.submit(post, "丙", 3)]
        wait_until(lambda: app.state.taiyi.worker.depth() == 2, what="two queued")
        server.should_exit = True  # what SIGTERM does
        wait_until(lambda: app.state.taiyi.worker.closing, what="shutdown started")
        wait_until(lambda: not can_connect(port), what="listening socket closed")
        gated.release.set()
        finished = running.result(timeout=60)
        rejected = [f.result(timeout=60) for f in queued]
    assert finished.status_code == 200 and finished.json()["data"][0]["seed"] == 1
    for response in rejected:
        assert response.status_code == 503 and error_of(response)["code"] == "shutting_down"
    assert gated.calls == [["甲"]]
    assert metric(app, "taiyi_dropped_requests_total", reason="shutdown") == 2


# --- the worker alone (no model) ----------------------------------------------------------------------------
def _recording_worker(**kwargs):
    gate, batches = threading.Event(), []

    def execute(jobs, should_abort):
        batches.append([job.payload for job in jobs])
        assert gate.wait(10)
        if any(job.payload == "bad" for job in jobs):
            raise ValueError("bad row")
        return [f"done {job.payload}" for job in jobs]

    return Worker(execute, **kwargs), gate, batches


def test_worker_batches_by_key_in_arrival_order_within_max_batch():
    worker, gate, batches = _recording_worker(max_batch=4, queue_size=10)
    jobs = [Job("g", "a", key=1)]
    worker.submit(jobs[0])
    wait_until(lambda: batches)
    for payload, key, rows in (("b", 1, 1), ("c", 2, 1), ("d", 1, 1), ("e", 1, 3), ("f", 1, 2)):
        jobs.append(worker.submit(Job("g", payload, rows=rows, key=key)))
    gate.set()
    assert [job.future.result(10) for job in jobs] == [f"done {p}" for p in "abcdef"]
    worker.close()
    assert worker.join(10)
    assert batches == [["a"], ["b", "d", "f"], ["c"], ["e"]]


def test_worker_shutdown_drains_within_grace_then_rejects():
    for grace, expected in ((30.0, ["done b", "done c"]), (0.0, [ShuttingDown, ShuttingDown])):
        worker, gate, batches = _recording_worker(max_batch=1, queue_size=10)
        first = worker.submit(Job("g", "a", key=1))
        wait_until(lambda batches=batches: batches)
        queued = [worker.submit(Job("g", p, key=1)) for p in "bc"]
        worker.close(grace)
        with pytest.raises(ShuttingDown):
            worker.submit(Job("g", "late", key=1))
        gate.set()
        assert first.future.result(10) == "done a"
        outcomes = []
        for job in queued:
            exc = job.future.exception(10)
            outcomes.append(type(exc) if exc else job.future.result())
        assert outcomes == expected
        assert worker.join(10)


def test_worker_retries_a_failed_batch_one_by_one_and_skips_abandoned_jobs():
    worker, gate, batches = _recording_worker(max_batch=8, queue_size=10)
    first = worker.submit(Job("g", "a", key=1))
    wait_until(lambda: batches)
    good, bad, gone = (worker.submit(Job("g", p, key=1)) for p in ("ok", "bad", "gone"))
    assert gone.abandon()
    gate.set()
    assert first.future.result(10) == "done a"
    assert good.future.result(10) == "done ok"
    assert isinstance(bad.future.exception(10), ValueError)
    worker.close()
    assert worker.join(10)
    assert batches == [["a"], ["ok", "bad"], ["ok"], ["bad"]]


# --- CLIP ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from taiyi.clip import load_clip
    from taiyi.testing import make_tiny_clip_image_tower, make_tiny_taiyi_clip_text

    root = tmp_path_factory.mktemp("clip")
    return load_clip(make_tiny_taiyi_clip_text(root / "text"), image_tower=make_tiny_clip_image_tower(root / "image"))


def test_clip_endpoints_score_classify_and_search(pipe_zh, tiny_clip, tmp_path):
    clip_index = pytest.importorskip("taiyi.clip_index")
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    for image, name in zip(images, ("a.png", "b.png", "sub/c.png"), strict=True):
        image.save(photos / name)
    clip_index.build_index(tiny_clip, photos, tmp_path / "index", model_name="tiny-clip")
    index = clip_index.load_index(tmp_path / "index")
    encoded = [base64.b64encode(png_bytes(im)).decode() for im in images[:2]]
    texts = ["一只猫", "海边的日落", "小桥流水"]

    app = create_app(ServeConfig(clip_model="tiny-clip"), pipeline=pipe_zh, clip=tiny_clip, clip_index=index)
    with TestClient(app) as client:
        score = client.post("/v1/clip/score", json={"images": encoded, "texts": texts})
        classify = client.post(
            "/v1/clip/classify", json={"images": ["data:image/png;base64," + encoded[0]], "labels": ["猫", "狗"]}
        )
        search = client.post("/v1/clip/search", json={"query": "一只猫", "k": 2})
        bad = client.post("/v1/clip/score", json={"images": ["not base64!"], "texts": ["猫"]})
        not_text = [
            client.post(
                "/v1/clip/score", content=as_json({"images": encoded, "texts": ["猫", "\udcff"]}), headers=JSON
            ),
            client.post(
                "/v1/clip/classify", content=as_json({"images": encoded, "labels": ["猫", "\ud800"]}), headers=JSON
            ),
            client.post("/v1/clip/search", content=as_json({"query": "\ud800"}), headers=JSON),
        ]
        no_query = [client.post("/v1/clip/search", json=b) for b in ({"k": 2}, {"text": "一只猫"})]
        no_query_k = client.post("/v1/clip/search", json={"query": "一只猫", "k": "many"})
        assert client.get("/healthz").json()["clip_index"] is True
    assert score.status_code == 200, score.text
    expected = tiny_clip.similarity(images[:2], texts).numpy()
    np.testing.assert_allclose(np.array(score.json()["scores"]), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(score.json()["cosine"]), expected / tiny_clip.scale(), rtol=1e-4, atol=1e-4)
    assert classify.status_code == 200, classify.text
    row = classify.json()["data"][0]
    assert abs(sum(row["probs"]) - 1) < 1e-5 and row["label"] == ["猫", "狗"][int(np.argmax(row["probs"]))]
    assert search.status_code == 200, search.text
    hits = search.json()["data"]
    assert [h["rank"] for h in hits] == [1, 2] and hits[0]["score"] >= hits[1]["score"]
    assert {h["path"] for h in hits} <= {"a.png", "b.png", "sub/c.png"}
    thumb = Image.open(io.BytesIO(base64.b64decode(hits[0]["thumbnail"].split(",", 1)[1])))
    assert thumb.format == "JPEG"
    assert bad.status_code == 400 and error_of(bad)["code"] == "invalid_image"
    assert [(r.status_code, error_of(r)["param"]) for r in not_text] == [(400, "texts[1]"), (400, "labels[1]"),
                                                                         (400, "query")]  # fmt: skip
    assert all("is not valid text: character 1" in error_of(r)["message"] for r in not_text)
    # a field named "query" is the body's field, not the URL's query string
    assert [(r.status_code, error_of(r)["message"], error_of(r)["param"]) for r in no_query] == [
        (400, "query is required", "query")
    ] * 2
    assert (no_query_k.status_code, error_of(no_query_k)["param"]) == (400, "k")


def test_clip_classify_refuses_labels_the_cli_refuses(pipe_zh, tiny_clip):
    from taiyi.evaluation import check_labels

    image = base64.b64encode(png_bytes(Image.new("RGB", (40, 48), "white"))).decode()
    app = create_app(ServeConfig(clip_model="tiny-clip"), pipeline=pipe_zh, clip=tiny_clip)
    with TestClient(app) as client:
        one = client.post("/v1/clip/classify", json={"images": [image], "labels": ["猫"]})
        twice = client.post("/v1/clip/classify", json={"images": [image], "labels": ["猫", "狗", "猫"]})
        none = client.post("/v1/clip/classify", json={"images": [image], "labels": []})
    for response, labels in ((one, ["猫"]), (twice, ["猫", "狗", "猫"])):
        assert response.status_code == 400, response.text
        with pytest.raises(ValueError) as cli:
            check_labels(labels)
        assert error_of(response) == {
            "message": str(cli.value),
            "type": "invalid_request_error",
            "param": "labels",
            "code": "invalid_value",
        }
    assert error_of(one)["message"] == "1 label given; zero-shot classification needs at least two"
    assert none.status_code == 400
    assert error_of(none)["message"] == "0 labels given; zero-shot classification needs at least two"


def test_clip_endpoints_without_clip_say_how_to_enable_it(pipe_zh):
    with serve_client(pipe_zh) as client:
        response = client.post("/v1/clip/score", json={"images": ["x"], "texts": ["猫"]})
        search = client.post("/v1/clip/search", json={"query": "猫"})
    assert response.status_code == 404 and error_of(response)["code"] == "clip_not_configured"
    assert "--clip-model" in error_of(response)["message"]
    assert search.status_code == 404


# --- page, schema, metrics, CORS, request ids ------------------------------------------------------------------
def test_page_schema_health_models_and_metrics(pipe_zh):
    with serve_client(pipe_zh) as client:
        page = client.get("/")
        script = client.get("/static/app.js")
        schema = client.get("/openapi.json").json()
        models = client.get("/v1/models").json()
        health = client.get("/healthz").json()
        client.post(GENERATIONS, json=body(size="60x60"))
        client.post(GENERATIONS, json=body(seed=9))
        missing = client.get("/static/../../etc/passwd")
        metrics = client.get("/metrics")
    assert page.status_code == 200 and '<html lang="zh-CN">' in page.text and "提示词" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.split("<body>")[0].replace('href="/', "")  # nothing from another host
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/clip/score", "/v1/clip/classify", "/healthz"} <= set(
        schema["paths"]
    )
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert models["data"][0]["id"] == health["model"] == "tiny-zh"
    assert health["status"] == "ok" and health["limits"]["max_n"] == 10
    assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"
    text = metrics.text
    for needle in (
        "taiyi_queue_depth 0.0",
        'taiyi_batch_rows_bucket{kind="generate",le="1.0"} 1.0',
        'taiyi_request_duration_seconds_bucket{le="0.01",route="/v1/images/generations"}',
        'taiyi_errors_total{code="invalid_size"} 1.0',
        'taiyi_requests_total{route="other",status="404"} 1.0',
    ):
        assert needle in text, needle


def test_cors_is_off_by_default_and_on_for_named_origins(pipe_zh):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with serve_client(pipe_zh) as client:
        off = client.options(GENERATIONS, headers=preflight)
        plain = client.get("/healthz", headers={"Origin": "https://app.example"})
    with serve_client(pipe_zh, cors_origins=("https://app.example",), api_key=KEY) as client:
        on = client.options(GENERATIONS, headers=preflight)
        other = client.options(GENERATIONS, headers={**preflight, "Origin": "https://evil.example"})
        denied = client.post(GENERATIONS, json=body(), headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in off.headers and "access-control-allow-origin" not in plain.headers
    assert on.status_code == 200 and on.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in other.headers
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "https://app.example"


def test_request_ids_are_echoed_or_made(pipe_zh):
    with serve_client(pipe_zh) as client:
        given = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
        unsafe = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
        none = client.get("/healthz")
    assert given.headers["x-request-id"] == "abc-123"
    assert len(unsafe.headers["x-request-id"]) == 32 and unsafe.headers["x-request-id"] != none.headers["x-request-id"]


# --- short load over real HTTP ------------------------------------------------------------------------------
def test_short_load_loses_and_duplicates_nothing(pipe_zh):
    clients, per_client = 8, 20
    app = create_app(ServeConfig(max_batch=8, queue_size=16), pipeline=pipe_zh)
    with live_server(app) as (url, _, _):

        def run_client(c: int) -> list[tuple[int, str, str | None]]:
            out = []
            with httpx2.Client(base_url=url, timeout=60) as http:
                for k in range(per_client):
                    i = c * per_client + k
                    prompt, request_id = f"小桥流水人家 {i}", f"load-{i}"
                    r = http.post(GENERATIONS, json=body(prompt, seed=1000 + i), headers={"X-Request-ID": request_id})
                    if r.status_code != 200 or r.headers["x-request-id"] != request_id:
                        out.append((i, "", f"{r.status_code} {r.text[:100]}"))
                        continue
                    item = r.json()["data"][0]
                    image = decode(item)
                    text = image.text["parameters"]
                    ok = item["seed"] == 1000 + i and text.startswith(prompt + "\n") and f"Seed: {1000 + i}," in text
                    out.append(
                        (i, hashlib.sha256(image.tobytes()).hexdigest(), None if ok else f"mismatch {text[:80]}")
                    )
            return out

        with ThreadPoolExecutor(clients) as pool:
            results = [row for rows in pool.map(run_client, range(clients)) for row in rows]
    errors = [r for r in results if r[2]]
    assert not errors, errors[:3]
    assert sorted(r[0] for r in results) == list(range(clients * per_client))  # none lost, none twice
    assert len({r[1] for r in results}) == clients * per_client  # no image handed to two requests
    assert metric(app, "taiyi_images_total") == clients * per_client


# --- the command --------------------------------------------------------------------------------------------
def test_serve_command_refuses_bad_options_with_one_line(capsys, tmp_path):
    from taiyi.serve_cli import main

    assert main(["--model", str(tmp_path), "--max-batch", "0"]) == 2
    assert main(["--model", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert main(["--max-steps", "lots"]) == 2
    assert main(["--model", str(tmp_path), "--backend", "gpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("taiyi: error: ") for line in lines), lines
    assert "--max-batch" in lines[0] and "does not exist" in lines[1] and "--backend" in lines[3]


def test_serve_command_can_be_registered_with_typer():
    import typer
    from typer.testing import CliRunner

    from taiyi.serve_cli import serve

    app = typer.Typer()
    app.command()(serve)
    app.command("other")(lambda: None)  # with two commands typer keeps the name: `serve`
    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0 and "--max-batch" in result.output and "--api-key" in result.output


def test_serve_process_serves_and_stops_cleanly_on_sigterm(tiny_zh):
    import signal

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "taiyi.serve",
            "--model",
            str(tiny_zh),
            "--port",
            "0",
            "--api-key",
            KEY,
            "--no-safety-checker",
            "--log-level",
            "warning",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "listening on" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "server exited early"
        url = line.split("listening on ", 1)[1].strip().rstrip("/")
        assert url.startswith("http://127.0.0.1:")
        response = httpx2.post(
            url + GENERATIONS, json=body(seed=3), headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        )
        assert response.status_code == 200 and response.json()["data"][0]["seed"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its clean shutdown
        assert KEY not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_core_import_does_not_load_the_web_stack():
    code = (
        "import sys, taiyi, taiyi.pipeline, taiyi.serve, taiyi.serve.config, taiyi.serve_cli; "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
