"""The vLLM engine against a fake OpenAI-compatible server: requests, batching, errors,
the JSON schema as response_format. Needs no torch (the worker talks HTTP to vLLM)."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from PIL import Image

from workers.dialogue.prompts import FOLLOWUP_SCHEMAS
from workers.engines.base import (
    Engine,
    EngineError,
    EngineRequest,
    TransientEngineError,
    prefix_metadata,
)
from workers.engines.factory import make_engine
from workers.engines.vllm import VllmEngine

MODEL_SIDE = 896  # what workers.imaging hands the engine


def radiograph(seed: int) -> np.ndarray:
    """A random uint8 (896, 896, 3) image."""
    return np.random.default_rng(seed).integers(0, 256, (MODEL_SIDE, MODEL_SIDE, 3), np.uint8)


@dataclass
class FakeServerState:
    """What the fake OpenAI-compatible server answers, and what it was asked."""

    served: list[str] = field(default_factory=lambda: ["google/medgemma-4b-it"])
    status: int = 200
    delay_s: float = 0.0
    received: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    refuse_response_format: bool = False  # answer 400 to response_format, as old vLLM does
    refuse_uuid: bool = False  # answer 400 to an image content item's uuid
    together: threading.Barrier | None = None  # answer only once this many are in flight


def _handler(state: FakeServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": m} for m in state.served]})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.received.append(body)
            time.sleep(state.delay_s)
            in_flight_together = True
            if state.together is not None:
                try:
                    state.together.wait(timeout=30)
                except threading.BrokenBarrierError:
                    in_flight_together = False
            if self.path != "/v1/chat/completions":
                self._send(404, {"error": "not found"})
            elif not in_flight_together:
                self._send(500, {"error": {"message": "requests arrived one after another"}})
            elif state.status != 200:
                self._send(state.status, {"error": {"message": "busy"}})
            elif state.refuse_response_format and "response_format" in body:
                message = "1 validation error: body.response_format: Extra inputs are not permitted"
                self._send(400, {"object": "error", "message": message, "code": 400})
            elif state.refuse_uuid and "uuid" in json.dumps(body["messages"][-1]["content"][0]):
                message = "body.messages.1.content.0.uuid: Extra inputs are not permitted"
                self._send(400, {"object": "error", "message": message, "code": 400})
            else:
                prompt = body["messages"][-1]["content"][-1]["text"]
                text = f"Final Answer: echo {prompt}<end_of_turn>"
                self._send(200, {"choices": [{"index": 0, "message": {"content": text}}]})

    return Handler


@pytest.fixture
def fake_vllm() -> Iterator[tuple[str, FakeServerState]]:
    state = FakeServerState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    finally:
        server.shutdown()
        server.server_close()


def test_vllm_sends_the_image_as_a_data_url_with_temperature_zero(
    fake_vllm: tuple[str, FakeServerState],
) -> None:
    url, state = fake_vllm
    engine = VllmEngine(url, "google/medgemma-4b-it", revision="abc")
    assert isinstance(engine, Engine)
    assert (engine.info.name, engine.info.model_id, engine.info.revision) == (
        "vllm",
        "google/medgemma-4b-it",
        "abc",
    )
    image = radiograph(3)
    request = EngineRequest(
        images=(image,), prompt="List findings.", system="Be brief.", max_new_tokens=77
    )
    assert engine.generate([request]) == ["Final Answer: echo List findings."]

    (body,) = state.received
    assert body["model"] == "google/medgemma-4b-it"
    assert body["temperature"] == 0
    assert body["max_tokens"] == 77
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    user = body["messages"][1]
    assert user["role"] == "user"
    image_part, text_part = user["content"]
    assert text_part == {"type": "text", "text": "List findings."}
    assert image_part["type"] == "image_url"
    data_url = image_part["image_url"]["url"]
    assert data_url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    assert np.array_equal(np.asarray(decoded.convert("RGB")), image)  # PNG is lossless


def test_vllm_batch_runs_concurrently_and_keeps_order(
    fake_vllm: tuple[str, FakeServerState],
) -> None:
    url, state = fake_vllm
    engine = VllmEngine(url, "google/medgemma-4b-it")
    # the server answers only once all four are in flight together (no timing asserted)
    state.together = threading.Barrier(4)
    requests = [EngineRequest(images=(radiograph(0),), prompt=f"q{i}") for i in range(4)]
    texts = engine.generate(requests)
    assert texts == [f"Final Answer: echo q{i}" for i in range(4)]


def test_vllm_server_down_is_a_startup_error_that_says_how_to_start_it() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(EngineError) as caught:
        VllmEngine(url, "google/medgemma-4b-it", timeout=2)
    assert type(caught.value) is EngineError
    assert f"vLLM server at {url} is not reachable" in str(caught.value)
    assert "vllm serve google/medgemma-4b-it" in str(caught.value)


def test_vllm_server_without_the_model_is_a_startup_error(
    fake_vllm: tuple[str, FakeServerState],
) -> None:
    url, state = fake_vllm
    state.served = ["some/other-model"]
    with pytest.raises(EngineError, match="serves some/other-model"):
        VllmEngine(url, "google/medgemma-4b-it")


@pytest.mark.parametrize("status", [503, 429])
def test_vllm_busy_server_is_transient(fake_vllm: tuple[str, FakeServerState], status: int) -> None:
    url, state = fake_vllm
    engine = VllmEngine(url, "google/medgemma-4b-it")
    state.status = status
    with pytest.raises(TransientEngineError, match=f"HTTP {status}"):
        engine.generate([EngineRequest(images=(radiograph(0),), prompt="?")])


def test_vllm_client_error_is_not_transient(fake_vllm: tuple[str, FakeServerState]) -> None:
    url, state = fake_vllm
    engine = VllmEngine(url, "google/medgemma-4b-it")
    state.status = 400
    with pytest.raises(EngineError) as caught:
        engine.generate([EngineRequest(images=(radiograph(0),), prompt="?")])
    assert not isinstance(caught.value, TransientEngineError)


def test_vllm_timeout_is_transient(fake_vllm: tuple[str, FakeServerState]) -> None:
    url, state = fake_vllm
    engine = VllmEngine(url, "google/medgemma-4b-it", timeout=0.2)
    state.delay_s = 1.0
    with pytest.raises(TransientEngineError, match="timed out"):
        engine.generate([EngineRequest(images=(radiograph(0),), prompt="?")])


def test_vllm_sends_the_json_schema_as_response_format(
    fake_vllm: tuple[str, FakeServerState],
) -> None:
    url, state = fake_vllm
    engine = VllmEngine(url, "google/medgemma-4b-it")
    schema = FOLLOWUP_SCHEMAS["describe"]
    engine.generate([EngineRequest(images=(radiograph(0),), prompt="d", json_schema=schema)])
    engine.generate([EngineRequest(images=(radiograph(0),), prompt="plain")])
    with_schema, without = state.received
    assert with_schema["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "followup_describe", "schema": json.loads(json.dumps(schema))},
    }
    assert "guided_json" not in with_schema
    assert "response_format" not in without


def test_vllm_old_server_refusing_response_format_gets_the_request_without_it(
    fake_vllm: tuple[str, FakeServerState], caplog: pytest.LogCaptureFixture
) -> None:
    url, state = fake_vllm
    state.refuse_response_format = True
    engine = VllmEngine(url, "google/medgemma-4b-it")
    schema = FOLLOWUP_SCHEMAS["relation"]
    request = EngineRequest(images=(radiograph(0),), prompt="r", json_schema=schema)
    with caplog.at_level("WARNING", logger="workers.engines.vllm"):
        assert engine.generate([request]) == ["Final Answer: echo r"]
    refused, retried = state.received
    assert "response_format" in refused and "response_format" not in retried
    assert {k: v for k, v in refused.items() if k != "response_format"} == retried
    assert "refused response_format" in caplog.text and url in caplog.text
    # later requests leave it out at once
    assert engine.generate([request]) == ["Final Answer: echo r"]
    assert len(state.received) == 3 and "response_format" not in state.received[2]


def test_vllm_other_client_errors_are_not_retried_without_the_schema(
    fake_vllm: tuple[str, FakeServerState],
) -> None:
    url, state = fake_vllm
    engine = VllmEngine(url, "google/medgemma-4b-it")
    state.status = 400
    request = EngineRequest(
        images=(radiograph(0),), prompt="r", json_schema=FOLLOWUP_SCHEMAS["relation"]
    )
    with pytest.raises(EngineError, match="HTTP 400"):
        engine.generate([request])
    assert len(state.received) == 1


def test_factory_refuses_unknown_engines_and_a_vllm_engine_without_url() -> None:
    # the factory imports an engine module only when chosen: no torch for these
    with pytest.raises(EngineError, match="not one of"):
        make_engine("gpt")
    with pytest.raises(EngineError, match="server_url"):
        make_engine("vllm", server_url="")


def test_vllm_names_a_study_image_by_its_pixels_so_follow_ups_share_the_server_cache(
    fake_vllm: tuple[str, FakeServerState],
) -> None:
    url, state = fake_vllm
    engine = VllmEngine(url, "google/medgemma-4b-it")
    whole, crop = radiograph(3), radiograph(4)
    study = prefix_metadata("1.2.3")
    engine.generate([EngineRequest(images=(whole,), prompt="Read.", metadata=study)])
    engine.generate([EngineRequest(images=(whole, crop), prompt="Describe.", metadata=study)])
    engine.generate([EngineRequest(images=(radiograph(5), crop), prompt="x", metadata=study)])
    engine.generate([EngineRequest(images=(whole,), prompt="No study.")])
    engine.generate([EngineRequest(images=(whole, crop.copy()), prompt="Q2", metadata=study)])
    engine.generate([EngineRequest(images=(whole, radiograph(6)), prompt="Q", metadata=study)])
    parts = [body["messages"][-1]["content"] for body in state.received]
    # the same image: the same bytes and the same id, for the pre-read and the follow-up
    assert parts[0][0] == parts[1][0] and parts[0][0]["uuid"].startswith("sha256-")
    assert parts[2][0]["uuid"] != parts[0][0]["uuid"]  # another image never shares the id
    assert "uuid" not in parts[3][0]  # a request that names no study sends none
    # a second question on the same anchor: its crop's bytes and id again (encoder cache)
    assert parts[4][1] == parts[1][1] and parts[1][1]["uuid"].startswith("sha256-")
    assert parts[5][1]["uuid"] != parts[1][1]["uuid"]  # another anchor's crop: another id


def test_vllm_server_refusing_uuid_gets_the_request_without_it(
    fake_vllm: tuple[str, FakeServerState], caplog: pytest.LogCaptureFixture
) -> None:
    url, state = fake_vllm
    state.refuse_uuid = True
    engine = VllmEngine(url, "google/medgemma-4b-it")
    request = EngineRequest(images=(radiograph(3),), prompt="Read.", metadata=prefix_metadata("1"))
    assert engine.generate([request]) == ["Final Answer: echo Read."]
    assert engine.generate([request]) == ["Final Answer: echo Read."]
    refused, retried, later = (body["messages"][-1]["content"][0] for body in state.received)
    assert "uuid" in refused and "uuid" not in retried and "uuid" not in later
    assert "refused image uuid" in caplog.text
