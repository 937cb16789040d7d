"""athanor's terminal UI (Textual): a live window onto the daemon through its admin API.

Imported only when the TUI opens (``athanor`` on a terminal, or ``athanor tui``), so other commands never load
Textual.
"""

from __future__ import annotations


def run() -> None:
    """Open the TUI on this terminal until the user quits; the daemon and its models are left as they are."""
    from athanor.tui.app import AthanorApp

    AthanorApp().run()
