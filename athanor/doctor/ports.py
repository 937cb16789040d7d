"""The ports checks: can the gateway and every servable model bind their port, and if not, who holds it.

A port held by the running gateway or one of its runtimes is fine; one held by anything else fails with that
program's pid and name (as far as this user may see) and the command that frees it. Ports are tried by binding
them the way the gateway and the controller's preflight do, so doctor agrees with what a start would meet.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

from athanor.addresses import parse_listen
from athanor.doctor.check import GATEWAY_FIX, Check
from athanor.doctor.context import Context
from athanor.ports import port_is_free
from athanor.runtimes.launch import LOOPBACK


def check_ports(ctx: Context) -> Iterator[Check]:
    holders = PortHolders()
    yield from _gateway_port(ctx, holders)
    yield from _ollama_port(ctx, holders)
    yield from _model_ports(ctx, holders)


def _gateway_port(ctx: Context, holders: PortHolders) -> Iterator[Check]:
    """The running gateway's address (else the Gateway's ``spec.listen``): free, or held by that gateway."""
    listen = ctx.daemon["listen"] if ctx.daemon else ctx.gateway["listen"]
    note = f" (spec.listen is {ctx.gateway['listen']})" if listen != ctx.gateway["listen"] else ""
    try:
        host, port = parse_listen(listen)
    except ValueError:
        yield Check(False, "gateway port", f"cannot read the listen address {listen!r}",
                    f"{GATEWAY_FIX} with spec.listen set to HOST:PORT", required=True)
        return
    error = bind_error(host, port)
    if error is None:
        yield Check(True, "gateway port", f"{listen} free{note}")
        return
    if error.errno != errno.EADDRINUSE:
        yield Check(False, "gateway port", f"cannot listen on {listen}: {error.strerror or error}{note}",
                    f"{GATEWAY_FIX} with spec.listen set to an address of this machine", required=True)
        return
    pid = holders.holder(port)
    if pid and ctx.daemon and _in_trees(pid, {ctx.daemon["pid"]}):
        yield Check(True, "gateway port", f"{listen} held by the athanor gateway (pid {pid}){note}")
    else:
        yield Check(False, "gateway port", f"{listen} is held by {_held_by(pid)}{note}",
                    _free_port_fix(pid, "spec.listen of the Gateway", GATEWAY_FIX), required=True)


def _ollama_port(ctx: Context, holders: PortHolders) -> Iterator[Check]:
    """The Gateway's second address for Ollama's clients, when it sets one: free, or the gateway's. Held by
    anything else (Ollama itself, most often) it fails, but not as required: the gateway serves its main address
    meanwhile, and takes this one once it is free."""
    listen = (ctx.gateway.get("ollama") or {}).get("listen")
    if not listen:
        return
    host, port = parse_listen(listen)  # the schema has checked its shape
    error = bind_error(host, port)
    if error is None:
        yield Check(True, "ollama port", f"{listen} free")
        return
    pid = holders.holder(port) if error.errno == errno.EADDRINUSE else None
    if pid and ctx.daemon and _in_trees(pid, {ctx.daemon["pid"]}):
        yield Check(True, "ollama port", f"{listen} held by the athanor gateway (pid {pid})")
    elif error.errno == errno.EADDRINUSE:
        yield Check(False, "ollama port", f"{listen} is held by {_held_by(pid)}; Ollama's clients are not served "
                    "there (the gateway's own address still answers Ollama's API)",
                    _free_port_fix(pid, "spec.ollama.listen of the Gateway", GATEWAY_FIX))
    else:
        yield Check(False, "ollama port", f"cannot listen on {listen}: {error.strerror or error}",
                    f"{GATEWAY_FIX} with spec.ollama.listen set to an address of this machine")


def _model_ports(ctx: Context, holders: PortHolders) -> Iterator[Check]:
    """Every servable model's port: free or held by athanor's runtimes in one line; each held by another program
    in a line of its own."""
    ours = _athanor_pids(ctx)
    free = held_ours = 0
    failures: list[Check] = []
    for name in sorted(ctx.doc["models"]):
        spec = ctx.doc["models"][name]["spec"]
        port = spec.get("port")
        if not isinstance(port, int) or spec.get("residency") == "disabled":
            continue
        if port_is_free(port, LOOPBACK, reuse_address=True):  # as the controller's preflight checks it
            free += 1
            continue
        pid = holders.holder(port)
        if pid and _in_trees(pid, ours):
            held_ours += 1
            continue
        failures.append(Check(False, f"port {port}", f"model {name}'s port is held by {_held_by(pid)}",
                              _free_port_fix(pid, f"spec.port of model {name}", "athanor apply -f MODEL.yaml"),
                              required=True))
    if failures:
        yield from failures
    elif free + held_ours:
        ours_text = f", {held_ours} held by athanor's runtimes" if held_ours else ""
        yield Check(True, "model ports", f"{free} free{ours_text}", required=True)
    else:
        yield Check(True, "model ports", "no registered model to serve")


def bind_error(host: str, port: int) -> OSError | None:
    """Why a server could not bind ``host:port`` now (None: it could), binding as the gateway does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "0.0.0.0", port))
        except OSError as exc:
            return exc
    return None


class PortHolders:
    """Who holds which TCP port, read once and only when a port is taken (psutil; on macOS only our own
    processes are visible)."""

    def __init__(self) -> None:
        self._sockets: list[tuple[int, int | None, bool]] | None = None

    def holder(self, port: int) -> int | None:
        """The pid that holds ``port`` (a listener first), or None when it cannot be seen."""
        if self._sockets is None:
            self._sockets = _tcp_sockets()
        candidates = [(not listening, pid) for p, pid, listening in self._sockets if p == port and pid]
        return min(candidates)[1] if candidates else None


def _tcp_sockets() -> list[tuple[int, int | None, bool]]:
    """(local port, pid, listening) of every TCP socket this user may see."""
    import psutil

    try:
        return [(c.laddr.port, c.pid, c.status == psutil.CONN_LISTEN)
                for c in psutil.net_connections(kind="tcp") if c.laddr]
    except psutil.AccessDenied:  # macOS: the system-wide table needs root; our own processes tell theirs
        pass
    except (psutil.Error, OSError):
        return []
    found: list[tuple[int, int | None, bool]] = []
    for proc in psutil.process_iter():
        try:
            connections = (getattr(proc, "net_connections", None) or proc.connections)(kind="tcp")
        except (psutil.Error, OSError):
            continue
        found += [(c.laddr.port, proc.pid, c.status == psutil.CONN_LISTEN) for c in connections if c.laddr]
    return found


def _athanor_pids(ctx: Context) -> set[int]:
    """The gateway's pid and its runtimes' (as recorded in state.json)."""
    pids = {ctx.daemon["pid"]} if ctx.daemon else set()
    for instance in ctx.state.get("instances", {}).values():
        if not isinstance(instance, dict):
            continue
        handle = instance.get("handle") if isinstance(instance.get("handle"), dict) else {}
        pids |= {p for p in (instance.get("pid"), handle.get("pid")) if isinstance(p, int) and p > 0}
    return pids


def _in_trees(pid: int, roots: set[int]) -> bool:
    """Whether ``pid`` is one of ``roots`` or a descendant of one (a runtime a wrapper started counts as ours)."""
    import psutil

    if pid in roots:
        return True
    try:
        return any(parent.pid in roots for parent in psutil.Process(pid).parents())
    except psutil.Error:
        return False


def _held_by(pid: int | None) -> str:
    """The holder of a port as the report names it: 'pid 123 (llama-server)'."""
    if not pid:
        return "another program (its pid is not visible to this user)"
    import psutil

    try:
        name = psutil.Process(pid).name()
    except psutil.Error:
        name = "?"
    return f"pid {pid} ({name})"


def _free_port_fix(pid: int | None, setting: str, apply: str) -> str:
    stop = f"kill {pid}" if pid else "stop what holds it"
    return f"{stop} (or set {setting} to a free port and {apply})"
