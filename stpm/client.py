"""A pipeline's way to stpm-serve: `Client(url, token).predict(image)`, with timeouts and retries.

The answer carries what `stpm.scoring.Prediction` does except the map, the mask and the image
(too large to send for every part): the peak and the mask's boxes come with details=True, the
overlay PNG from `.overlay`. A numpy array is sent as a PNG of the RGB image stpm would score
(stpm.scoring.to_rgb), so it is scored bit for bit as `STPM.predict(array)` scores it.

A 503 (queue full, deadline passed, model still warming) is retried after the server's
Retry-After (at most max_backoff seconds), as is a refused or dropped connection; anything else
the server refuses raises ServiceError, an StpmError carrying the status and the server's words.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from .errors import StpmError

RETRIED = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class ServiceError(StpmError):
    """The service refused a request: status is the HTTP status, the message the server's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Verdict:
    """The service's answer for one image (Prediction's fields, without the map and mask)."""

    path: str | None  # the name sent with the image
    score: float
    normalized_score: float
    is_anomalous: bool
    threshold: float
    image_term: float
    model: dict  # file, sha256, format_version, runtime, precision
    timings_ms: dict  # queue, decode, model, total
    peak: dict | None = None  # x, y, value (details=True)
    boxes: list[dict] | None = None  # x, y, w, h of each region above the threshold, largest first
    raw: dict = field(default_factory=dict, repr=False)  # the JSON as received

    @classmethod
    def from_json(cls, answer: dict) -> Verdict:
        return cls(
            path=answer.get("name"),
            score=answer["score"],
            normalized_score=answer["normalized_score"],
            is_anomalous=answer["verdict"] == "anomalous",
            threshold=answer["threshold"],
            image_term=answer.get("image_term", 0.0),
            model=answer.get("model", {}),
            timings_ms=answer.get("timings_ms", {}),
            peak=answer.get("peak"),
            boxes=answer.get("boxes"),
            raw=answer,
        )


SWAP_TIMEOUT = 300.0  # seconds: a swap loads, warms and probes the model before it answers


class Client:
    """url: where stpm-serve listens, e.g. http://127.0.0.1:8000; token: its bearer token (the
    admin token for the changes); model: the model's name where several are served. timeout: seconds per attempt; retries: further attempts after a 503 or a lost connection,
    waiting backoff, 2 x backoff, ... (or the server's Retry-After), at most max_backoff."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        verify: bool | str = True,
        model: str | None = None,
    ) -> None:
        self.prefix = "/v1" if model is None else f"/v1/models/{model}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout, verify=verify)
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff

    def predict(
        self,
        image: str | Path | bytes | np.ndarray,
        name: str | None = None,
        threshold: float | None = None,
        max_false_alarms: float | None = None,
        details: bool = False,
    ) -> Verdict:
        """The verdict on one image: a file, its encoded bytes or an (H, W[, C]) array."""
        query = _query(name, threshold, max_false_alarms)
        if details:
            query["details"] = "true"
        body, name = _body(image, name)
        response = self._post(f"{self.prefix}/predict", body, {**query, **_named(name)})
        return Verdict.from_json(response.json())

    def overlay(
        self,
        image: str | Path | bytes | np.ndarray,
        name: str | None = None,
        threshold: float | None = None,
        max_false_alarms: float | None = None,
    ) -> bytes:
        """The overlay PNG stpm-predict would write for this image."""
        body, name = _body(image, name)
        query = {**_query(name, threshold, max_false_alarms), **_named(name)}
        return self._post(f"{self.prefix}/overlay", body, query).content

    def model(self) -> dict:
        """What the service runs: identity, threshold and its rule, validation statistics."""
        return self._send("GET", "/v1/model" if self.prefix == "/v1" else self.prefix).json()

    def models(self) -> dict:
        """The models served, by name: identity, threshold, whether ready."""
        return self._send("GET", "/v1/models").json()

    def set_threshold(
        self,
        threshold: float | None = None,
        max_false_alarms: float | None = None,
        note: str | None = None,
    ) -> dict:
        """Judge by a new threshold from now on, kept across restarts (the admin token)."""
        wanted = {"threshold": threshold, "max_false_alarms": max_false_alarms, "note": note}
        wanted = {key: value for key, value in wanted.items() if value is not None}
        path = "/v1/threshold" if self.prefix == "/v1" else f"{self.prefix}/threshold"
        return self._send("PUT", path, json=wanted).json()

    def swap(self, model: str, path: str | None = None, file: str | Path | None = None) -> dict:
        """Serve a new model file under the name model, once it has loaded, warmed and passed its
        probe: path, a file on the server, or file, one here to upload (the admin token)."""
        if (path is None) == (file is None):
            raise StpmError("give path (on the server) or file (to upload), one of them")
        if path is not None:
            wanted = {"json": {"path": str(path)}}
        else:
            wanted = {"content": _body(file, None)[0]}
            wanted["headers"] = {"Content-Type": "application/octet-stream"}
        return self._send("PUT", f"/v1/models/{model}", timeout=SWAP_TIMEOUT, **wanted).json()

    def audit(self, last: int = 100) -> list[dict]:
        """The audit trail's last entries, oldest first."""
        return self._send("GET", "/v1/audit", params={"last": last}).json()

    def ready(self) -> bool:
        """Whether the model is loaded and warm (no retries)."""
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _post(self, path: str, body: bytes, query: dict) -> httpx.Response:
        headers = {"Content-Type": "application/octet-stream"}
        return self._send("POST", path, content=body, params=query, headers=headers)

    def _send(self, method: str, path: str, **request) -> httpx.Response:
        for attempt in range(self.retries + 1):
            wait = min(self.max_backoff, self.backoff * 2**attempt)
            try:
                response = self.http.request(method, path, **request)
            except RETRIED as error:
                if attempt == self.retries:
                    raise ServiceError(0, f"cannot reach {self.http.base_url}: {error}") from None
            except httpx.TimeoutException:
                raise ServiceError(0, f"no answer from {self.http.base_url} in time") from None
            else:
                if response.status_code < 400:
                    return response
                if response.status_code != 503 or attempt == self.retries:
                    raise _error(response)
                wait = min(self.max_backoff, _retry_after(response, wait))
            time.sleep(wait)
        raise AssertionError("unreachable")


def _query(name, threshold, max_false_alarms) -> dict:
    query = {}
    if threshold is not None:
        query["threshold"] = repr(float(threshold))
    if max_false_alarms is not None:
        query["max_false_alarms"] = repr(float(max_false_alarms))
    return query


def _named(name: str | None) -> dict:
    return {"name": name} if name is not None else {}


def _body(image, name: str | None) -> tuple[bytes, str | None]:
    """The bytes to send and the part's name (a file's name unless one is given)."""
    if isinstance(image, str | Path):
        path = Path(image)
        try:
            return path.read_bytes(), name if name is not None else path.name
        except OSError as error:
            raise StpmError(f"cannot read {path}: {error.strerror or error}") from None
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image), name
    from . import scoring, visualize

    return visualize.encode_png(scoring.to_rgb(np.asarray(image))), name


def _retry_after(response: httpx.Response, default: float) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", default)))
    except ValueError:  # an HTTP date: not sent by stpm-serve
        return default


def _error(response: httpx.Response) -> ServiceError:
    """The server's own words: a problem's detail, or the body's first line."""
    try:
        detail = response.json().get("detail") or response.reason_phrase
    except (ValueError, AttributeError):
        detail = response.text.strip().splitlines()[0] if response.text.strip() else ""
    return ServiceError(response.status_code, f"{response.status_code}: {detail}")
