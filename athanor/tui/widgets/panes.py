"""The main view's other areas: the banner, the header line, the event feed and the log tail."""

from __future__ import annotations

from textual.widgets import Log, Static


class Banner(Static):
    """A one-line warning across the top: the daemon is not running, went away, or is being started."""


class HeaderBar(Static):
    """The machine and the gateway: chip, cores, memory, load, service manager, ingress, uptime."""


class Tail(Log):
    """A log that follows its end."""

    def __init__(self, max_lines: int, **kwargs) -> None:
        super().__init__(max_lines=max_lines, auto_scroll=True, **kwargs)

    def write(self, data: str, scroll_end: bool | None = None) -> Tail:
        """As ``Log.write``; and once the new lines are laid out, scrolled to the end again: ``Log`` scrolls at
        once, against the size before the lines, so a burst (the 50-line tail on attaching) stayed at its top."""
        super().write(data, scroll_end)
        if scroll_end or (scroll_end is None and self.auto_scroll):
            self.call_after_refresh(self.scroll_end, animate=False, x_axis=False)
        return self


class EventFeed(Tail):
    """The last events: starts, readiness with load seconds, swaps, evictions, failures with reasons."""

    def __init__(self, **kwargs) -> None:
        super().__init__(200, **kwargs)


class LogTail(Tail):
    """The selected model's log, followed across its restarts."""

    def __init__(self, **kwargs) -> None:
        super().__init__(500, **kwargs)


class EmptyState(Static):
    """What to pull when no model is registered: the starter suggestions for this machine's memory tier."""
