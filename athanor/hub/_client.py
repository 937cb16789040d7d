"""The one place athanor talks to the Hub: huggingface_hub's HfApi and HTTP helpers, imported when first used.

Endpoint and token are read at call time: ``HF_ENDPOINT`` (default https://huggingface.co) and ``HF_TOKEN`` (else
the token huggingface_hub stored at login). Every call goes through ``hub_errors``, which turns the client's
exceptions into athanor's one-line errors (``raise ... from exc``).

Retries are athanor's choice here, not the client's. ``HfApi.list_models`` retries a refused connection and a 429
five times with backoff (23 s before an unreachable endpoint is reported, minutes when the Hub asks to wait for its
rate-limit window), which is wrong for an interactive search. So the listing goes through huggingface_hub's
``http_backoff`` with retries only for 5xx answers, and its items are read by huggingface_hub's own ``ModelInfo``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

from athanor import __version__
from athanor.errors import (
    AthanorError,
    HubAccessDenied,
    HubError,
    HubRateLimited,
    HubUnreachable,
    NotFoundError,
    printable,
)

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT = 15.0  # seconds for one request
_CHUNK = 1 << 16
_RETRY_STATUS = (500, 502, 503, 504)
_RATELIMIT = re.compile(r";\s*t\s*=\s*(\d+)")


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token() -> str | None:
    """HF_TOKEN when set; None lets huggingface_hub use the token stored by ``hf auth login``."""
    return os.environ.get("HF_TOKEN") or None


def api() -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token(), library_name="athanor", library_version=__version__)


def list_models(params: dict[str, Any], limit: int) -> list[Any]:
    """``GET /api/models`` as HfApi.list_models sends it, following Link pages until `limit` items."""
    from huggingface_hub.hf_api import ModelInfo
    from huggingface_hub.utils import (
        build_hf_headers,
        hf_raise_for_status,
        http_backoff,
    )

    headers = build_hf_headers(token=token(), library_name="athanor", library_version=__version__)
    url: str | None = f"{endpoint()}/api/models"
    query: dict[str, Any] | None = {**params, "limit": limit}
    items: list[Any] = []
    with hub_errors():
        while url is not None and len(items) < limit:
            response = http_backoff("GET", url, params=query, headers=headers, timeout=TIMEOUT, max_retries=2,
                                    base_wait_time=0.5, max_wait_time=2, retry_on_exceptions=(),
                                    retry_on_status_codes=_RETRY_STATUS)
            hf_raise_for_status(response)
            for item in response.json():
                item.setdefault("siblings", None)
                items.append(ModelInfo(**item))
            url = response.links.get("next", {}).get("url")
            query = None  # the next link carries the query
    return items[:limit]


def model_info(repo: str, revision: str | None = None) -> Any:
    """A repo's ModelInfo with file sizes (``?blobs=true``); NotFoundError when there is no such repo."""
    with hub_errors(repo):
        return api().model_info(repo, revision=revision, files_metadata=True, timeout=TIMEOUT)


def read_head(repo: str, path: str, revision: str, size: int) -> bytes:
    """The first `size` bytes of a file in the repo (fewer when the file is shorter), without touching the HF
    cache: a Range request whose answer is streamed and cut at `size` bytes, so that a server which ignores Range
    (200 with the whole file) costs no more than one that honours it. The connection is closed, not drained."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = f"{endpoint()}/{repo}/resolve/{quote(revision, safe='')}/{quote(path)}"
    headers = build_hf_headers(token=token(), library_name="athanor", library_version=__version__)
    headers["Range"] = f"bytes=0-{size - 1}"
    with hub_errors(repo), _streamed(get_session(), url, headers) as response:
        hf_raise_for_status(response)
        return _first_bytes(response, size)


def _streamed(session: Any, url: str, headers: dict[str, str]) -> Any:
    """A GET whose body is read as it arrives; closing it closes the connection. httpx-style clients
    (huggingface_hub 1.x and 2.x) have ``stream``; requests (0.x) streams with ``stream=True``."""
    if hasattr(session, "stream"):
        return session.stream("GET", url, headers=headers, timeout=TIMEOUT)
    return session.get(url, headers=headers, timeout=TIMEOUT, stream=True)


def _first_bytes(response: Any, size: int) -> bytes:
    chunks = response.iter_bytes() if hasattr(response, "iter_bytes") else response.iter_content(_CHUNK)
    data = bytearray()
    for chunk in chunks:
        data += chunk[:size - len(data)]
        if len(data) >= size:
            break
    return bytes(data)


@contextmanager
def hub_errors(repo: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's and its HTTP library's exceptions into athanor's errors, one line each."""
    try:
        yield
    except AthanorError:
        raise
    except Exception as exc:
        translated = translate(exc, repo)
        if translated is None:
            raise
        raise translated from exc


def translate(exc: BaseException, repo: str | None = None) -> AthanorError | None:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    where = endpoint()
    if isinstance(exc, OfflineModeIsEnabled):
        return HubUnreachable(f"cannot reach the Hub ({where}): offline mode is on (HF_HUB_OFFLINE)")
    if isinstance(exc, HfHubHTTPError):
        return _http_error(exc, repo, where)
    if _is_network_error(exc):
        reason = printable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return HubUnreachable(f"cannot reach the Hub ({where}): {reason}; check the network, or HF_ENDPOINT")
    return None


def _http_error(exc: Any, repo: str | None, where: str) -> AthanorError:
    response = exc.response
    status = response.status_code if response is not None else None
    headers = response.headers if response is not None else {}
    code = headers.get("X-Error-Code")
    message = headers.get("X-Error-Message") or ""
    subject = repo or "the request"
    if status == 429:
        wait = _retry_after(headers)
        when = f"try again in {wait} s" if wait else "try again shortly"
        return HubRateLimited(f"the Hub at {where} is rate-limiting requests (429): {when}"
                              + ("" if token() else ", or set HF_TOKEN for a higher limit"))
    if code == "GatedRepo":
        if status == 401 or not token():
            return HubAccessDenied(f"{subject} is gated: accept its terms at {where}/{subject}, then set HF_TOKEN "
                                   "to a token of that account")
        return HubAccessDenied(f"{subject} is gated and the token in use has no access to it ({status}): request "
                               f"access at {where}/{subject}")
    if status == 401 and "Invalid credentials" in message:
        return HubAccessDenied(f"the Hub at {where} refused the token (401 invalid credentials): check HF_TOKEN")
    if code == "RepoNotFound" or (status in (401, 404) and repo and code not in ("RevisionNotFound",
                                                                                  "EntryNotFound")):
        hint = "" if token() else " (a private repo needs HF_TOKEN)"
        return NotFoundError(f"no model repo {subject} on the Hub ({where}){hint}")
    if code == "RevisionNotFound":
        return NotFoundError(f"{subject}: no such revision on the Hub ({where})")
    if code == "EntryNotFound":
        return NotFoundError(f"{subject}: no such file on the Hub ({where})")
    if status in (401, 403):
        return HubAccessDenied(f"the Hub at {where} refused access to {subject} ({status})"
                               + (f": {printable(message)}" if message else ""))
    detail = printable(message) if message else (response.reason_phrase if response is not None else str(exc))
    return HubError(f"the Hub ({where}) answered {status} for {subject}: {detail}")


def _retry_after(headers: Any) -> int | None:
    """Seconds until the rate-limit window resets: the RateLimit header (``"api";r=0;t=55``) or Retry-After."""
    match = _RATELIMIT.search(headers.get("RateLimit") or "")
    if match:
        return int(match.group(1))
    value = (headers.get("Retry-After") or "").strip()
    return int(value) if value.isdigit() else None


def _is_network_error(exc: BaseException) -> bool:
    """No connection, a timeout or a dropped one, whichever HTTP library this huggingface_hub uses (httpx2,
    httpx or requests); only libraries already imported are looked at."""
    kinds: list[type] = [TimeoutError, ConnectionError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        loaded = sys.modules.get(module)
        kinds.extend(getattr(loaded, name) for name in names if loaded is not None and hasattr(loaded, name))
    return isinstance(exc, tuple(kinds))
