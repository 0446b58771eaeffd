"""What turnflow's clients of OpenAI-compatible HTTP servers share: URLs, the API key, timeouts, errors, closing.

The model server (:class:`turnflow.nodes.llm.ChatClient`), the speech bridges (``HttpStt``, ``HttpTts``) and the
image description bridge (``HttpDescriber``) are each one :class:`OpenAiHttp`; each says which of turnflow's own
errors a failed request raises (``BackendError``, ``SpeechError``, ``ImageError``).
"""

from __future__ import annotations

import functools
import ssl
from typing import Any, Self
from urllib.parse import urlsplit

import httpx


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS settings every client of an `https://` server shares: httpx's defaults (certifi's CAs, or
    `SSL_CERT_FILE`/`SSL_CERT_DIR`), made once per process. httpx makes a new context for every client otherwise
    (~20 ms each: it parses the CA bundle again)."""
    return httpx.create_ssl_context()


@functools.cache
def plain_only_context() -> ssl.SSLContext:
    """The TLS settings of a client that only speaks plain `http://` (a loopback server): certificates required
    but no CA trusted, so TLS through it can never succeed; made in ~1 ms instead of loading a CA bundle."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def tls_for(url: str) -> ssl.SSLContext:
    """The TLS settings for a client of `url`: verified against the trusted CAs for `https://`, else none."""
    return tls_context() if urlsplit(url).scheme == "https" else plain_only_context()


def api_base(url: str) -> str:
    """The OpenAI API base (`.../v1`) of a server URL given with or without `/v1`."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def server_root(url: str) -> str:
    """The server's root URL (where llama-server serves `/props` and `/health`)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def endpoint_url(url: str, endpoint_path: str) -> str:
    """``url`` itself when it names an endpoint; the OpenAI path (``/v1/...``) appended to a bare server or /v1 URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"speech server URL must be http(s)://host[:port][/path], got {url!r}")
    path = parts.path.rstrip("/")
    if path in ("", "/v1"):
        return url.rstrip("/").removesuffix("/v1") + endpoint_path
    return url


def why(exc: httpx.HTTPError) -> str:
    """What a failed request ran into, in words."""
    if isinstance(exc, httpx.ConnectError):
        if "SSL" in str(exc) or "CERTIFICATE" in str(exc):  # it answered, but TLS failed
            return f"TLS failed ({exc}; a certificate from a private CA needs SSL_CERT_FILE naming that CA)"
        return "connection refused (is it running?)"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "it closed the connection mid-reply (did it crash or get stopped?)"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


class OpenAiHttp:
    """One OpenAI-compatible server's connection pool: the API key as a bearer token, timeouts, errors.

    Subclasses set their URLs (with :func:`api_base`, :func:`server_root`, :func:`endpoint_url`) and turn a
    failed request into their own error (:meth:`_error`, and :meth:`_unreachable` for a transport failure).
    """

    def __init__(
        self, url: str, *, api_key: str | None, timeout: float, connect_timeout: float | None = None
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Timeout(timeout, connect=connect_timeout) if connect_timeout is not None else timeout
        self._settings: dict[str, Any] = {"headers": headers, "timeout": limits, "verify": tls_for(url)}
        self._http = httpx.Client(**self._settings)

    def _keep_no_connections(self) -> None:
        """From now on, close every connection after its response (before any request is in flight)."""
        self._http.close()
        self._http = httpx.Client(**self._settings, limits=httpx.Limits(max_keepalive_connections=0))

    def close(self) -> None:
        """Close the HTTP connections."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _error(self, message: str) -> Exception:
        """The error a failed request raises, saying `message`."""
        return RuntimeError(message)

    def _unreachable(self, url: str, exc: httpx.HTTPError) -> Exception:
        """The error raised when a request to `url` got no answer."""
        return self._error(f"request to {url} failed: {type(exc).__name__}: {exc}")

    def _request(self, method: str, url: str, **request: Any) -> httpx.Response:
        """The server's answer, whatever its status; no answer at all raises :meth:`_unreachable`."""
        try:
            return self._http.request(method, url, **request)
        except httpx.HTTPError as exc:
            raise self._unreachable(url, exc) from None  # the message says what httpx ran into

    def _post(self, url: str, **request: Any) -> httpx.Response:
        """POST to `url`; no answer, or an HTTP error status, raises the subclass's error."""
        response = self._request("POST", url, **request)
        if response.status_code >= 400:
            raise self._error(f"{url} answered HTTP {response.status_code}: {response.text[:300]!r}")
        return response
