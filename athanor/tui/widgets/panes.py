"""The main view's other areas: the banner, the header line, the event feed and the log tail."""

from __future__ import annotations

from textual.widgets import Log, Static


class Banner(Static):
    """A one-line warning across the top: the daemon is not running, went away, or is being started."""


class HeaderBar(Static):
    """The machine and the gateway: chip, cores, memory, load, service manager, ingress, uptime."""


class EventFeed(Log):
    """The last events: starts, readiness with load seconds, swaps, evictions, failures with reasons."""

    def __init__(self, **kwargs) -> None:
        super().__init__(max_lines=200, auto_scroll=True, **kwargs)


class LogTail(Log):
    """The selected model's log, followed across its restarts."""

    def __init__(self, **kwargs) -> None:
        super().__init__(max_lines=500, auto_scroll=True, **kwargs)


class EmptyState(Static):
    """What to pull when no model is registered: the starter suggestions for this machine's memory tier."""
