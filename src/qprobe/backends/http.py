"""JSON over HTTP for the OpenAI-compatible backend: bounded retries, no secrets kept.

Plain `urllib`: no SDK dependency. Retries with exponential backoff and full jitter on 408/429/5xx,
timeouts and connection errors, honouring `Retry-After`; other 4xx statuses raise one
`APIStatusError` naming the URL and status. The API key is read from an environment variable at
request time and never stored on the object, logged, or put into errors. Redirects are refused
(they could carry the Authorization header elsewhere); loopback URLs bypass any proxy.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.client import HTTPException as _HTTPException
from typing import Any

from qprobe.errors import QProbeError

log = logging.getLogger("qprobe.backends.openai.http")  # under the backend's logger


class APIStatusError(QProbeError):
    """The server answered with an HTTP status we do not retry (e.g. 401, 404)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def normalize_base_url(url: str) -> str:
    """`http://host:port` -> `http://host:port/v1`; a URL with a path is kept as given."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise QProbeError(f"openai backend: base URL must be http(s)://host[:port][/path], got {url!r}")
    if parts.username or parts.password:
        raise QProbeError("openai backend: put credentials in the API key environment variable, "
                          "not in the base URL")
    if parts.query or parts.fragment:
        raise QProbeError(f"openai backend: base URL must not have a query or fragment: {url!r}")
    path = parts.path.rstrip("/")
    if path == "":
        path = "/v1"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def is_loopback(url: str) -> bool:
    """True for localhost / 127.0.0.0/8 / ::1 URLs (these bypass any HTTP proxy settings)."""
    return is_loopback_host(urllib.parse.urlsplit(url).hostname or "")


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), else None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are refused: following one could carry the Authorization header elsewhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        return None


def _retryable_status(status: int) -> bool:
    return status in (408, 429) or status >= 500


class HttpClient:
    """JSON over HTTP with bounded retries. Thread-safe; holds no secrets."""

    def __init__(self, base_url: str, api_key_env: str, timeout: float, max_retries: int,
                 backoff: float, max_backoff: float) -> None:
        self.base_url = normalize_base_url(base_url)
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        handlers: list[Any] = [_NoRedirect()]
        if is_loopback(self.base_url):
            handlers.append(urllib.request.ProxyHandler({}))  # never send loopback via a proxy
        self._opener = urllib.request.build_opener(*handlers)
        self._rng = random.Random()
        self._rng_lock = threading.Lock()
        self._sleep = time.sleep  # tests record the waits here instead of sleeping

    def __repr__(self) -> str:
        return f"HttpClient({self.base_url!r}, api_key_env={self.api_key_env!r})"

    def _key(self) -> str:
        return os.environ.get(self.api_key_env, "").strip()

    def _redact(self, text: str) -> str:
        key = self._key()
        return text.replace(key, "***") if key else text

    def _wait(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        with self._rng_lock:
            return self._rng.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                fatal: Callable[[int, str], bool] | None = None) -> Any:
        """`method` base_url + `path` with a JSON body; returns the decoded JSON answer.

        fatal(status, detail): True for an error the caller knows is not transient (raised at
        once as `APIStatusError`, like a 4xx, instead of retried)."""
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        attempts = self.max_retries + 1
        reason = ""
        for attempt in range(attempts):
            headers = {"Accept": "application/json", "User-Agent": "qprobe"}
            if data is not None:
                headers["Content-Type"] = "application/json"
            key = self._key()
            if key:
                headers["Authorization"] = f"Bearer {key}"
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            retry_after = None
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                return self._decode(raw, method, url)
            except urllib.error.HTTPError as e:
                detail = self._error_detail(e)
                if not _retryable_status(e.code) or (fatal is not None and fatal(e.code, detail)):
                    hint = " (redirects are not followed; give the final URL)" if 300 <= e.code < 400 else ""
                    raise APIStatusError(
                        self._redact(f"{method} {url} -> HTTP {e.code}{hint}: {detail}"), e.code
                    ) from None
                retry_after = parse_retry_after(e.headers.get("Retry-After") if e.headers else None)
                reason = f"HTTP {e.code}: {detail}"
            except (TimeoutError, OSError) as e:  # URLError, connection reset, socket timeout
                inner = getattr(e, "reason", e)
                reason = f"{type(inner).__name__}: {inner}" if str(inner) else type(inner).__name__
                if isinstance(inner, TimeoutError) or isinstance(e, TimeoutError):
                    reason = f"no answer within {self.timeout:g} s"
            except _HTTPException as e:  # e.g. RemoteDisconnected, IncompleteRead
                reason = f"{type(e).__name__}: {e}"
            if attempt + 1 < attempts:
                delay = self._wait(attempt, retry_after)
                log.warning("%s %s: %s; retry %d/%d in %.2f s", method, url,
                            self._redact(reason), attempt + 1, self.max_retries, delay)
                self._sleep(delay)
        raise QProbeError(self._redact(f"{method} {url} failed after {attempts} attempt(s): {reason}"))

    def _decode(self, raw: bytes, method: str, url: str) -> Any:
        try:
            out = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise QProbeError(f"{method} {url}: the server's answer is not JSON "
                              f"({raw[:80]!r})") from None
        if isinstance(out, dict) and out.get("error") and "choices" not in out and "data" not in out:
            raise QProbeError(self._redact(f"{method} {url}: server error: {str(out['error'])[:300]}"))
        return out

    def _error_detail(self, e: urllib.error.HTTPError) -> str:
        try:
            raw = e.read(2000).decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - the status alone is still informative
            raw = ""
        try:
            obj = json.loads(raw)
            if isinstance(obj, dict):
                err = obj.get("error", obj.get("detail", obj))
                if isinstance(err, dict):
                    err = err.get("message", err)
                raw = str(err)
        except json.JSONDecodeError:
            pass
        return " ".join(raw.split())[:300] or (e.reason or "")
