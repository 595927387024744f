"""Hugging Face Hub connection: endpoint, cache folder, offline switch and token (from options, else
the environment, read at call time and passed to huggingface_hub explicitly: the library reads them
once, at import), the timeout every request gets, and one HubError line per failure kind.
Downloads live in merger.io.hub_fetch, uploads in merger.io.hub_publish.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from merger.errors import HubError

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_TIMEOUT = 30.0  # seconds without an answer before a Hub request fails (options["timeout"])
_TRUE = {"1", "ON", "YES", "TRUE"}
# Set by the user, huggingface_hub passes these per call (HEAD/metadata, downloads): merger keeps them.
_HF_TIMEOUT_VARS = (("HF_HUB_ETAG_TIMEOUT", "DEFAULT_ETAG_TIMEOUT"),
                    ("HF_HUB_DOWNLOAD_TIMEOUT", "DEFAULT_DOWNLOAD_TIMEOUT"))
def endpoint_of(options: dict[str, Any]) -> str:
    return (options.get("endpoint") or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline_of(options: dict[str, Any]) -> bool:
    if options.get("offline") is not None:
        return bool(options["offline"])
    return any((os.environ.get(k) or "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_dir_of(options: dict[str, Any]) -> str:
    if options.get("cache_dir"):
        return str(options["cache_dir"])
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def token_of(options: dict[str, Any]) -> str | bool | None:
    # None lets huggingface_hub look in its usual places (HF_TOKEN, the cached login).
    return options.get("token")


def timeout_of(options: dict[str, Any]) -> float:
    value = options.get("timeout")
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not (seconds > 0 and math.isfinite(seconds)):
        raise HubError(f"--timeout {value!r}: expected a positive number of seconds, e.g. --timeout 60")
    return seconds


def _user_timeouts() -> dict[float, str]:
    """{seconds: variable} for HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT when the user set them
    (in the environment, or in huggingface_hub.constants, which is what huggingface_hub reads)."""
    from huggingface_hub import constants

    found: dict[float, str] = {}
    for var, default in _HF_TIMEOUT_VARS:
        value = getattr(constants, var, None)
        if value is not None and (os.environ.get(var) or value != getattr(constants, default, value)):
            found.setdefault(float(value), var)
    return found


class RequestLimits:
    """The limits merger puts on each request huggingface_hub sends during one call: `timeout`
    seconds to connect, to send, and between bytes received, unless the request carries a timeout
    the user set (HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT). huggingface_hub retries timed-out
    requests (up to 5 times with 1+2+4+8+8 s of sleep, and hf_hub_download's second HEAD waits 60 s),
    so once one request has timed out every later one in the call fails at once: a Hub that never
    answers costs about one timeout, not minutes."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.expired: tuple[float, str] | None = None  # (seconds, what set them) of the first timeout
        self._user = _user_timeouts()

    def prepare(self, extensions: dict[str, Any]) -> tuple[float, str]:
        """Set the request's timeout (httpx's `extensions["timeout"]`); returns it and its source."""
        current = (extensions.get("timeout") or {}).get("read")
        if current is not None and float(current) in self._user:
            return float(current), self._user[float(current)]
        extensions["timeout"] = dict.fromkeys(("connect", "read", "write", "pool"), self.timeout)
        return self.timeout, "--timeout"

    def expire(self, seconds: float, source: str) -> None:
        if self.expired is None:
            self.expired = (seconds, source)

    def failure(self, what: str, endpoint: str, publish: bool = False) -> HubError:
        seconds, source = self.expired or (self.timeout, "--timeout")
        cached = "" if publish else ", or set HF_HUB_OFFLINE=1 to use cached models only"
        return HubError(f"{what}: the Hub at {endpoint} did not answer within {seconds:g} s; check the network "
                        f"or HF_ENDPOINT{',' if cached else ', or'} raise {source}{cached}")


@contextmanager
def bounded_requests(options: dict[str, Any]) -> Iterator[RequestLimits]:
    """Within the block, huggingface_hub's shared HTTP client applies RequestLimits for
    `options["timeout"]`. huggingface_hub's client factory is global: the one in place before is
    wrapped (a user's proxy or certificate setup is kept) and put back afterwards. Transfers are kept
    off hf_xet, whose own client takes no timeout from us: Xet-stored files come down, and LFS files
    go up, through the HTTP endpoints the Hub keeps for clients without it."""
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils import _http

    limits = RequestLimits(timeout_of(options))
    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or _http.default_client_factory
    xet_was_off = constants.HF_HUB_DISABLE_XET  # read at call time (huggingface_hub's is_xet_available)
    set_client_factory(_limited_factory(previous, limits))
    constants.HF_HUB_DISABLE_XET = True
    try:
        yield limits
    finally:
        constants.HF_HUB_DISABLE_XET = xet_was_off
        set_client_factory(previous)


def _limited_factory(previous: Callable[[], Any], limits: RequestLimits) -> Callable[[], Any]:
    import httpx2

    class Refused(httpx2.TransportError):
        """Not a TimeoutException or NetworkError: huggingface_hub does not retry it."""

    class Watched(httpx2.SyncByteStream):
        """A streamed body (a download): a stall between chunks counts as the call's timeout too."""

        def __init__(self, inner: Any, seconds: float, source: str):
            self.inner, self.seconds, self.source = inner, seconds, source

        def __iter__(self) -> Iterator[bytes]:
            try:
                yield from self.inner
            except httpx2.TimeoutException:
                limits.expire(self.seconds, self.source)
                raise

        def close(self) -> None:
            self.inner.close()

    def factory() -> Any:
        client = previous()
        send = client.send

        def limited_send(request: Any, **kwargs: Any) -> Any:
            if limits.expired is not None:
                raise Refused(f"not sent: an earlier request timed out after {limits.expired[0]:g} s",
                              request=request)
            seconds, source = limits.prepare(request.extensions)
            try:
                response = send(request, **kwargs)
            except httpx2.TimeoutException:
                limits.expire(seconds, source)
                raise
            if kwargs.get("stream"):
                response.stream = Watched(response.stream, seconds, source)
            return response

        client.send = limited_send  # Client.request and Client.stream both go through send
        return client

    return factory


def hub_failure(e: Exception, what: str, repo_id: str, revision: str | None, endpoint: str,
                offline: bool = False) -> HubError:
    """One line per failure kind: repo or revision missing, refused credentials, no network."""
    from huggingface_hub import errors as hfe

    status = getattr(getattr(e, "response", None), "status_code", None)
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, hfe.GatedRepoError):
        return HubError(f"{what}: {repo_id} is gated on {endpoint}; accept its terms on the repo page and {login}")
    if isinstance(e, hfe.RevisionNotFoundError):
        return HubError(f"{what}: revision {revision or 'main'!r} not found in {repo_id}; "
                        f"check the branch, tag or commit after '@'")
    if isinstance(e, hfe.RepositoryNotFoundError):
        return HubError(f"{what}: no local folder or Hub repository {repo_id} on {endpoint}; check the "
                        f"path or repo id (private repos need a token: {login})")
    if isinstance(e, hfe.HfHubHTTPError) and status in (401, 403):
        access = "write access" if what.startswith("publish") else f"access to {repo_id}"
        return HubError(f"{what}: {endpoint} refused the credentials (HTTP {status}); "
                        f"{login} with a token that has {access}")
    if isinstance(e, hfe.HfHubHTTPError):
        detail = (getattr(e, "server_message", "") or "").splitlines()
        return HubError(f"{what}: {endpoint} answered HTTP {status} for {repo_id}"
                        f"{': ' + detail[0] if detail else ''}; try again later")
    cause = e.__cause__ or e.__context__
    if isinstance(e, hfe.LocalEntryNotFoundError) and (offline or isinstance(cause, hfe.OfflineModeIsEnabled)):
        return HubError(f"{what}: {repo_id} is not in the Hugging Face cache and offline mode is on "
                        f"(HF_HUB_OFFLINE); unset it to download, or run once online")
    if isinstance(e, hfe.LocalEntryNotFoundError) and isinstance(cause, hfe.HfHubHTTPError):
        return hub_failure(cause, what, repo_id, revision, endpoint, offline)
    if isinstance(e, (hfe.HTTPError, hfe.LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        return HubError(f"{what}: cannot reach the Hub at {endpoint} ({type(cause or e).__name__}); check "
                        f"the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use cached models only")
    return HubError(f"{what}: Hub request failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
