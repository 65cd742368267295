"""MedGemma behind a vLLM (or any OpenAI-compatible) server: ``POST {server_url}/chat/completions``.

``server_url`` is the API base, e.g. ``http://127.0.0.1:8000/v1`` for
``vllm serve google/medgemma-4b-it --revision <commit>``. Images travel as PNG data URLs;
decoding is greedy (temperature 0). A batch is sent as concurrent requests, which vLLM
batches on the server. Only the standard library is used (urllib), so a vLLM worker needs
neither torch nor an HTTP client package.

Structured output: a request with ``json_schema`` is sent with ``response_format``
``{"type": "json_schema", ...}`` (vLLM >= 0.12 removed ``guided_json``). A server that
refuses it with HTTP 400 naming ``response_format`` is an older one: the request is sent
again without it, a warning is logged, and later requests leave it out.

Follow-ups reuse the study's image work through vLLM's own caches (V1 prefix caching keys
blocks on the image too; recent versions also keep encoder outputs): a request whose first
image is its study's whole image (``prefix_metadata``) sends exactly the same PNG bytes
every time and gives that image a stable id, the content item's ``uuid`` (vLLM's
chat-completions form of ``multi_modal_uuids``), derived from the pixels
(``sha256-<hex>``), so the same id never names two different images. Its other images (an
anchor's crop, the same pixels each time the anchor is asked about) get their
pixel-derived ids too: vLLM keys its encoder cache and prefix blocks on them, so a second
question on the same anchor neither encodes the crop again nor recomputes the prefix that
ends with it, while the server's caches hold them. A server that refuses
``uuid`` with HTTP 400 gets the request again without it and later requests leave it out.

Special tokens: ``skip_special_tokens`` is turned off so that the MedGemma 1.5 thinking-trace
markers ``<unused94>``/``<unused95>`` reach the parser; trailing Gemma control tokens are
removed from the text.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

from workers.engines.base import (
    EngineError,
    EngineInfo,
    EngineRequest,
    TransientEngineError,
    image_digest,
    shares_prefix,
)

logger = logging.getLogger(__name__)

TRANSIENT_HTTP_STATUSES = frozenset({429, 502, 503, 504})
_TRAILING_CONTROL_TOKENS = ("<end_of_turn>", "<eos>", "<pad>")
_SCHEMA_NAME = re.compile(r"[^A-Za-z0-9_-]+")


class _HttpClientError(EngineError):
    """A non-transient HTTP error answer; ``body`` is the start of what the server said."""

    def __init__(self, message: str, status: int, body: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class VllmEngine:
    """Greedy chat completions from an OpenAI-compatible server that serves MedGemma.

    server_url: API base URL including ``/v1``.
    model: the served model name (``vllm serve``'s model argument or --served-model-name).
    revision: the revision the server was started with (recorded in ``info``; not checked).
    timeout: seconds allowed for one request (connection and the whole generation).
    max_concurrency: the most requests of a batch in flight at once.
    """

    def __init__(
        self,
        server_url: str,
        model: str,
        revision: str = "",
        timeout: float = 300.0,
        max_concurrency: int = 32,
    ) -> None:
        if not server_url.startswith(("http://", "https://")):
            raise ValueError(f"server_url must be an http(s) URL, got {server_url!r}")
        if timeout <= 0 or max_concurrency < 1:
            raise ValueError("timeout must be > 0 and max_concurrency >= 1")
        self.server_url = server_url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.max_concurrency = max_concurrency
        self.info = EngineInfo(name="vllm", model_id=model, revision=revision)
        self._response_format_supported = True  # until the server refuses it once
        self._uuid_supported = True  # until the server refuses it once
        self._check_server()

    def generate(self, requests: list[EngineRequest]) -> list[str]:
        """Greedy-decode one text per request, in order; requests of a batch run concurrently."""
        if not requests:
            return []
        payloads = [self._payload(request) for request in requests]
        if len(payloads) == 1:
            return [self._complete(payloads[0])]
        workers = min(len(payloads), self.max_concurrency)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vllm") as pool:
            futures = [pool.submit(self._complete, payload) for payload in payloads]
            # The first failure in request order is raised once every request has finished.
            return [future.result() for future in futures]

    def _check_server(self) -> None:
        """GET /models: the server answers and serves ``model``, else an EngineError saying how."""
        how = (
            f"start it with `vllm serve {self.model} --revision <commit> --port <port>` "
            "(or set engine.server_url to where it listens, including /v1)"
        )
        try:
            body = self._request("GET", "/models", None, timeout=min(self.timeout, 10.0))
        except TransientEngineError as exc:
            raise EngineError(
                f"vLLM server at {self.server_url} is not reachable ({exc}): {how}"
            ) from exc
        served = [str(entry.get("id")) for entry in body.get("data", []) if isinstance(entry, dict)]
        if served and self.model not in served:
            raise EngineError(
                f"vLLM server at {self.server_url} serves {', '.join(served)}, not {self.model!r}: "
                "set engine.model to the served model name"
            )

    def _payload(self, request: EngineRequest) -> dict[str, Any]:
        """The chat-completions body of one request (system message first when given)."""
        if not request.images:
            raise ValueError("EngineRequest.images: at least one image is required")
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": png_data_url(image)}}
            for image in request.images
        ]
        if shares_prefix(request) and self._uuid_supported:
            for item, image in zip(content, request.images, strict=True):
                item["uuid"] = image_uuid(image)  # the crop too: asked about again, it hits
        content.append({"type": "text", "text": request.prompt})
        messages: list[dict[str, Any]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.append({"role": "user", "content": content})
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": 0,
            "max_tokens": request.max_new_tokens,
            "skip_special_tokens": False,  # vLLM extra parameter: keep <unused94>/<unused95>
        }
        if request.json_schema is not None and self._response_format_supported:
            payload["response_format"] = response_format(request.json_schema)
        return payload

    def _complete(self, payload: Mapping[str, Any]) -> str:
        """POST one chat completion and return the message text; a server too old for
        ``response_format`` or image ``uuid`` gets the request again without it."""
        try:
            body = self._post(payload)
        except _HttpClientError as exc:
            if not ("response_format" in payload and _refuses_response_format(exc)):
                raise
            if self._response_format_supported:
                self._response_format_supported = False
                logger.warning(
                    "vLLM server at %s refused response_format (HTTP %d): an older server; "
                    "answers are no longer constrained to their JSON schema (upgrade to "
                    "vLLM >= 0.12 for structured output)",
                    self.server_url,
                    exc.status,
                )
            plain = {key: value for key, value in payload.items() if key != "response_format"}
            body = self._post(plain)
        try:
            text = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise EngineError(
                f"vLLM server at {self.server_url} answered without choices[0].message.content"
            ) from exc
        return strip_trailing_control_tokens(str(text or ""))

    def _post(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """POST one chat completion; a server that refuses image ``uuid`` gets it without."""
        try:
            return self._request("POST", "/chat/completions", payload, timeout=self.timeout)
        except _HttpClientError as exc:
            if not (exc.status == 400 and "uuid" in exc.body and _has_uuid(payload)):
                raise
            if self._uuid_supported:
                self._uuid_supported = False
                logger.warning(
                    "vLLM server at %s refused image uuid (HTTP %d): an older server; "
                    "follow-ups still share its prefix cache by sending the same image bytes",
                    self.server_url,
                    exc.status,
                )
            return self._request(
                "POST", "/chat/completions", _without_uuid(payload), timeout=self.timeout
            )

    def _request(
        self, method: str, path: str, payload: Mapping[str, Any] | None, timeout: float
    ) -> dict[str, Any]:
        """One JSON request; 429/502/503/504, timeouts and refused connections are transient."""
        url = f"{self.server_url}{path}"
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            body = _error_body(exc)
            detail = f": {body[:200]}" if body else ""
            message = f"{method} {url} answered HTTP {exc.code}{detail}"
            if exc.code in TRANSIENT_HTTP_STATUSES:
                raise TransientEngineError(message) from exc
            raise _HttpClientError(message, exc.code, body) from exc
        except TimeoutError as exc:
            raise TransientEngineError(f"{method} {url} timed out after {timeout:g} s") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise TransientEngineError(f"{method} {url} timed out after {timeout:g} s") from exc
            raise TransientEngineError(f"{method} {url} failed: {exc.reason}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise TransientEngineError(f"{method} {url} failed: {exc!r}") from exc
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise EngineError(f"{method} {url} answered with a body that is not JSON") from exc
        if not isinstance(body, dict):
            raise EngineError(f"{method} {url} answered with JSON that is not an object")
        return body


def png_data_url(image: npt.NDArray[np.uint8]) -> str:
    """A ``data:image/png;base64,...`` URL of a uint8 (H, W, 3) RGB array."""
    from PIL import Image

    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise TypeError("EngineRequest.images must hold uint8 numpy arrays")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"EngineRequest.images must have shape (S, S, 3), got {image.shape}")
    buffer = io.BytesIO()
    # Level 1: a radiograph PNG is sent once; size matters less than encoding time.
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_uuid(image: npt.NDArray[np.uint8]) -> str:
    """The stable multimodal id of an image: ``sha256-`` and the digest of its pixels."""
    return f"sha256-{image_digest(image)}"


def _has_uuid(payload: Mapping[str, Any]) -> bool:
    return any(
        isinstance(item, dict) and "uuid" in item
        for message in payload.get("messages", [])
        if isinstance(message.get("content"), list)
        for item in message["content"]
    )


def _without_uuid(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The payload with every content item's ``uuid`` removed."""
    messages = []
    for message in payload.get("messages", []):
        content = message.get("content")
        if isinstance(content, list):
            content = [
                {key: value for key, value in item.items() if key != "uuid"}
                if isinstance(item, dict)
                else item
                for item in content
            ]
        messages.append({**message, "content": content})
    return {**payload, "messages": messages}


def strip_trailing_control_tokens(text: str) -> str:
    """Remove Gemma end-of-turn / eos / pad tokens that trail the answer."""
    stripped = text.rstrip()
    while stripped.endswith(_TRAILING_CONTROL_TOKENS):
        for token in _TRAILING_CONTROL_TOKENS:
            stripped = stripped.removesuffix(token).rstrip()
    return stripped if stripped != text.rstrip() else text


def response_format(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAI/vLLM ``response_format`` that constrains an answer to ``schema``; the
    schema's "title" (letters, digits, "_" and "-" kept) names it, else "answer"."""
    plain = _plain(schema)
    if not isinstance(plain, dict):
        raise TypeError("EngineRequest.json_schema must be a mapping (a JSON schema object)")
    title = plain.get("title")
    name = _SCHEMA_NAME.sub("_", title).strip("_")[:64] if isinstance(title, str) else ""
    return {"type": "json_schema", "json_schema": {"name": name or "answer", "schema": plain}}


def _plain(value: Any) -> Any:
    """Mappings and sequences (read-only views included) as JSON-ready dicts and lists."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _refuses_response_format(error: _HttpClientError) -> bool:
    """An HTTP 400 whose body names response_format: a server without structured output."""
    return error.status == 400 and "response_format" in error.body


def _error_body(error: urllib.error.HTTPError) -> str:
    """The start of an error answer's body (what the server said), or ''."""
    try:
        return error.read(4000).decode("utf-8", "replace").strip()
    except OSError:
        return ""
