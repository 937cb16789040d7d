"""Who may talk to the gateway: the defences of a server on loopback against the web pages its user visits.

A page on any site can make the browser send requests to 127.0.0.1:8080. Two attacks follow, both long known
on local model servers:

- DNS rebinding: the page's own host name starts resolving to 127.0.0.1, so its requests are same-origin for
  the browser and it can read every answer. The request still says ``Host: attacker.example``. So only Host
  values naming this machine are served: loopback names and addresses, the listen address (and, when listening
  on every interface, this machine's names and addresses), and what ``spec.allowedHosts`` adds.
- Cross-site requests: a ``text/plain`` POST needs no CORS preflight, so the browser sends it and only hides the
  answer. Browsers mark such requests with ``Origin`` (and ``Sec-Fetch-Site``), so a request from a page whose
  origin is not on this machine, and not in ``spec.cors.allowOrigins``, is refused before it does anything.

The admin routes (``/athanor/...``, and ``/metrics``) start and stop runtimes: they take no browser requests at
all, and only loopback peers unless ``spec.auth`` sets an admin key, which every admin request must then present
(from any peer). A read-only admin key (``auth.readOnlyKeyFile``/``readOnlyKeyEnv``) admits its holder, from any
peer, to GET (and HEAD) requests only: anything else it presents is refused with 403, so a dashboard can watch
without being able to start or stop. Without an admin key, loopback peers that present no key keep full access.
``spec.auth`` API keys likewise guard the model APIs, OpenAI's and Ollama's (``auth.py``), except a CORS preflight
from an origin the Gateway lists: browsers never send ``Authorization`` on one, and the request that follows must
present the key anyway. CORS headers are sent only to origins the Gateway lists; the runtimes' own
``Access-Control-*`` headers (mlx_lm.server sends ``*``, llama-server echoes the origin) never reach a client.

The checks run before the error middleware's ``try``, so they never raise: a bug in them is logged and answered
as a 500 like any other.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from dataclasses import dataclass
from typing import Any, Final, cast
from urllib.parse import urlsplit

from aiohttp import web

from athanor.auth import presented
from athanor.ingress.keycache import KeyCache
from athanor.ingress.heads import HeadMemo
from athanor.ingress.wire import ClientExchange, header_text

# aiohttp's request (the admin API, the other listeners) or the front door's (the /v1 path, and its stand-ins)
ClientRequest = web.Request | ClientExchange

log = logging.getLogger(__name__)

ADMIN_PREFIX: Final = "/athanor/"
METRICS_PATH: Final = "/metrics"
# the model APIs spec.auth's API keys guard: OpenAI's (and Anthropic's), Ollama's
API_PREFIXES: Final = ("/v1/", "/api/")
READ_METHODS: Final = frozenset({"GET", "HEAD"})  # what a read-only admin key grants
_LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_WILDCARDS: Final = frozenset({"", "0.0.0.0", "::"})
MAX_REMEMBERED_HOSTS: Final = 64
_TOKEN: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def host_part(value: str) -> str:
    """``Host``/authority without the port, lower-case, brackets and a trailing dot removed."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    head, sep, tail = value.rpartition(":")
    host = head if sep and tail.isdigit() and ":" not in head else value
    return host.rstrip(".")


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):  # RFC 6761: .localhost is always loopback
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def _this_machine() -> set[str]:
    """Names and addresses a client on the network may use for this machine (listening on every interface).

    Local facts only (no DNS lookup, which can take seconds): the host name, its ``.local`` (mDNS) name and the
    interfaces' addresses as they are when the gateway starts.
    """
    import psutil  # type: ignore[import-untyped]  # no stubs: mypy checks this module for the compiled build

    hostname = socket.gethostname().lower()
    names = {hostname, hostname.split(".")[0] + ".local"}
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                names.add(address.address.split("%")[0].lower())
    return {name for name in names if name}


@dataclass(frozen=True)
class Policy:
    """The Gateway's rules, resolved once per change of its spec."""

    hosts: frozenset[str]
    any_host: bool
    cors_origins: frozenset[str]
    any_origin: bool

    @classmethod
    def from_gateway(cls, gateway: dict[str, Any], listen_hosts: tuple[str, ...], machine: frozenset[str]) -> Policy:
        """``listen_hosts``: the hosts the gateway listens on (spec.listen's, spec.ollama.listen's); ``machine``:
        this machine's names and addresses, when one of them is every interface."""
        listens = {host_part(h) for h in listen_hosts}
        hosts = {host_part(h) for h in gateway.get("allowedHosts", []) if h != "*"}
        hosts |= machine | (listens - _WILDCARDS)
        origins = gateway.get("cors", {}).get("allowOrigins", [])
        return cls(frozenset(hosts), "*" in gateway.get("allowedHosts", []),
                   frozenset(o.rstrip("/").lower() for o in origins if o != "*"), "*" in origins)

    def host_allowed(self, host: str) -> bool:
        return self.any_host or _is_loopback(host) or host in self.hosts

    def cors_allowed(self, origin: str) -> bool:
        return self.any_origin or origin.rstrip("/").lower() in self.cors_origins

    def origin_allowed(self, origin: str) -> bool:
        """A page served from this machine, or one the Gateway lists. ``allowedHosts: ["*"]`` (for a reverse
        proxy in front) does not make every page's origin acceptable."""
        if self.cors_allowed(origin):
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        host = host_part(parts.netloc)
        return _is_loopback(host) or host in self.hosts


class Guard:
    """The checks every request passes before any handler runs, and the CORS answers."""

    def __init__(self, listen_host: str):
        self.keys = KeyCache()
        self.rebind(listen_host)

    def rebind(self, listen_host: str, *more_hosts: str) -> None:
        """The gateway listens on other addresses now (``more_hosts``: its Ollama listener's, say): the Host values
        it serves follow."""
        self._listen_hosts = (listen_host, *more_hosts)
        wildcard = any(host_part(h) in _WILDCARDS for h in self._listen_hosts)
        self._machine = frozenset(_this_machine()) if wildcard else frozenset()
        self._cached: tuple[object, Policy] | None = None
        self._hosts: dict[str, bool] = {}  # Host header -> allowed, for the policy cached above
        # Heads admitted, by their key in the front door's memo: (the policy, the API keys) they were admitted under
        self._admitted: HeadMemo[tuple[Policy, object]] = HeadMemo()

    def policy(self, gateway: dict[str, Any]) -> Policy:
        """The policy for this gateway spec (the controller keeps one dict per version of the spec): rebuilt only
        when the settings it is made of change."""
        if self._cached is None or self._cached[0] is not gateway:
            policy = Policy.from_gateway(gateway, self._listen_hosts, self._machine)
            if self._cached is None or self._cached[1] != policy:
                self._hosts = {}
            else:
                policy = self._cached[1]
            self._cached = (gateway, policy)
        return self._cached[1]

    def _host_allowed(self, host: str, policy: Policy) -> bool:
        """``policy.host_allowed`` remembered per header value: clients send the same few on every request."""
        allowed = self._hosts.get(host)
        if allowed is None:
            allowed = policy.host_allowed(host_part(host))
            if len(self._hosts) < MAX_REMEMBERED_HOSTS:
                self._hosts[host] = allowed
        return allowed

    def refusal(self, request: ClientRequest, policy: Policy, auth: dict[str, Any]) -> tuple[int, str] | None:
        """(status, reason) when the request must be refused, else None. ``auth``: the Gateway's spec.auth.
        Never raises: the caller runs it outside its error handling."""
        try:
            # The front door's request and its stand-ins have a head key (None or bytes); aiohttp's has none. (An
            # isinstance of aiohttp's request is an ABC's, in Python: a measurable share of a proxied request.)
            key = getattr(request, "head_key", _NO_HEAD)
            if key is _NO_HEAD:
                headers = request.headers
                host, origin, fetch_site = headers.get("Host"), headers.get("Origin"), headers.get("Sec-Fetch-Site")
            else:  # the values as the front door's one pass over the headers read them
                fields = cast(ClientExchange, request).fields
                if key is not None:  # a head the front door remembers: admitted before, under these settings?
                    self.keys.refresh(auth)
                    admitted = self._admitted.get(cast(bytes, key))
                    if admitted is not None and admitted[0] is policy and admitted[1] is self.keys.api:
                        return None
                host, origin, fetch_site = (_text(fields.get(b"host")), _text(fields.get(b"origin")),
                                            _text(fields.get(b"sec-fetch-site")))
                refused = self._refusal(request, host, origin, fetch_site, policy, auth)
                if refused is None and key is not None and not _judged_by_peer(request.path):
                    self._admitted.remember(cast(bytes, key), (policy, self.keys.api))
                return refused
            return self._refusal(request, host, origin, fetch_site, policy, auth)
        except Exception:  # noqa: BLE001 - a bug here must still answer in the format clients parse
            log.exception("unexpected error checking %s %s", request.method, request.path[:200])
            return 500, "internal error in the gateway (see its log)"

    def _refusal(self, request: ClientRequest, host: str | None, origin: str | None, fetch_site: str | None,
                 policy: Policy, auth: dict[str, Any]) -> tuple[int, str] | None:
        if host is not None and not self._host_allowed(host, policy):
            return 403, (f"host {host[:100]!r} is not served here (DNS-rebinding protection); add it to the "
                         "Gateway's spec.allowedHosts to allow it")
        path = request.path
        self.keys.refresh(auth)
        if path.startswith(ADMIN_PREFIX) or path == METRICS_PATH:
            if origin is not None or fetch_site not in (None, "none", "same-origin"):
                return 403, "the admin API takes no requests from web pages"
            return self._admin_refusal(request)
        if origin is not None:
            if origin == "null" or not policy.origin_allowed(origin):
                return 403, (f"cross-site request from origin {origin[:100]!r} refused; add the origin to the "
                             "Gateway's spec.cors.allowOrigins to allow it")
        elif fetch_site == "cross-site":
            return 403, "cross-site request refused"
        if self.keys.api.configured and path.startswith(API_PREFIXES) and not _cors_preflight(request, policy):
            return _key_refusal(self.keys.api, request, "API")
        return None

    def _admin_refusal(self, request: ClientRequest) -> tuple[int, str] | None:
        """An admin key admits everything; a read-only key, GETs only (from any peer, like an admin key). Without
        an admin key configured, a loopback peer that presents no key is admitted, as before there were keys."""
        admin, read_only = self.keys.admin, self.keys.read_only
        key = presented(request.headers)
        if key is not None and admin.configured and admin.admits(key):
            return None
        if key is not None and read_only.configured and read_only.admits(key):
            if request.method in READ_METHODS:
                return None
            return 403, (f"the read-only admin key grants GET requests only, not {request.method[:20]}; "
                         "present an admin key (auth.adminKeyFile) to change what runs")
        if admin.configured:
            return _key_refusal(admin, request, "admin")
        if key is not None and read_only.configured:  # a key nobody configured: not valid, or not checkable
            return _key_refusal(read_only, request, "read-only admin")
        if not _loopback_peer(request):
            return 403, ("the admin API answers only on loopback (set auth.adminKeyFile, or auth.readOnlyKeyFile for "
                         "GETs, to allow other clients)")
        return None

    @staticmethod
    def cors_headers(request: ClientRequest, policy: Policy) -> dict[str, str]:
        """Headers for an answer to an allowed cross-origin request (none for anything else)."""
        origin = request.headers.get("Origin")
        if origin is None or request.path.startswith(ADMIN_PREFIX) or not policy.cors_allowed(origin):
            return {}
        return {"Access-Control-Allow-Origin": "*" if policy.any_origin else origin, "Vary": "Origin"}

    def preflight(self, request: ClientRequest, policy: Policy) -> tuple[int, dict[str, str], str | None]:
        """The answer to ``OPTIONS``: (status, headers, error message or None)."""
        allow = {"Allow": "GET, POST, OPTIONS"}
        origin = request.headers.get("Origin")
        method = request.headers.get("Access-Control-Request-Method")
        if origin is None or method is None:
            return 204, allow, None
        if not policy.cors_allowed(origin):
            return 403, allow, (f"CORS is not enabled for origin {origin[:100]!r}; add it to the Gateway's "
                                "spec.cors.allowOrigins")
        if method not in ("GET", "POST"):
            return 403, allow, f"method {method[:20]!r} is not allowed; GET and POST are"
        requested = [h.strip() for h in request.headers.get("Access-Control-Request-Headers", "").split(",")]
        headers = {**allow, **self.cors_headers(request, policy), "Access-Control-Allow-Methods": "GET, POST",
                   "Access-Control-Max-Age": "600"}
        names = [h for h in requested if h and _TOKEN.match(h)]
        if names:
            headers["Access-Control-Allow-Headers"] = ", ".join(names)
        return 204, headers, None


_NO_HEAD: Final = object()


def _judged_by_peer(path: str) -> bool:
    """Whether a request to ``path`` is judged by its peer's address too (the admin API's, without keys): its
    admission does not follow from its head alone."""
    return path.startswith(ADMIN_PREFIX) or path == METRICS_PATH


def _text(value: bytes | None) -> str | None:
    return None if value is None else header_text(value)


def _cors_preflight(request: ClientRequest, policy: Policy) -> bool:
    """A browser's CORS preflight from an origin the Gateway lists: it carries no key (browsers never send
    ``Authorization`` on one) and does nothing but ask; the request it clears must present the key."""
    origin = request.headers.get("Origin")
    return (request.method == "OPTIONS" and origin is not None
            and "Access-Control-Request-Method" in request.headers and policy.cors_allowed(origin))


def _key_refusal(keys: Any, request: ClientRequest, what: str) -> tuple[int, str] | None:
    key = presented(request.headers)
    if keys.admits(key):
        return None
    if keys.problem:  # the why (a file's path) is in the gateway's log (ingress/keycache.py), not for any client
        return 503, f"the gateway's {what} key configuration is unreadable, so it refuses every request (see its log)"
    if key is None:
        return 401, f"an {what} key is required: send Authorization: Bearer KEY"
    return 401, f"the {what} key presented is not valid"


def _loopback_peer(request: ClientRequest) -> bool:
    return _is_loopback((request.remote or "").split("%")[0])  # an IPv4 peer of [::] arrives as ::ffff:a.b.c.d
