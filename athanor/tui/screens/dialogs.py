"""Small screens over the current view: the confirmation a destructive key asks for, the list of keys (``?``), the
command line (``:``), the repo a pull (``p``) fetches and the starter models an empty registry offers."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Input, Label, OptionList


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; ``y`` (or Enter) answers yes, ``n`` or ``esc`` no."""

    BINDINGS = [Binding("y,enter", "answer(True)", "yes"), Binding("n,escape", "answer(False)", "no")]
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: auto; max-width: 80%; height: auto; border: thick $warning;
                               background: $surface; padding: 1 2; }
    """

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question, id="question")
            yield Label("[b]y[/b] yes   [b]n[/b] no", id="choices")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class HelpScreen(ModalScreen[None]):
    """Every key of the view it was opened from, with what it does (hidden ones too)."""

    BINDINGS = [Binding("escape,question_mark,q", "dismiss_help", "back")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical { width: 70; height: 80%; border: thick $accent; background: $surface; }
    """

    def __init__(self, view: Screen) -> None:
        super().__init__()
        self.view = view

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f" keys of the {getattr(self.view, 'VIEW', 'current')} view (esc closes)")
            yield DataTable(cursor_type="none", id="keys")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("KEY", "ACTION")
        seen = set()
        for binding in [*_bindings(self.view), *_bindings(self.app)]:
            label = binding.key_display or binding.key
            if label in seen or not binding.description:
                continue
            seen.add(label)
            table.add_row(label, binding.description)

    def action_dismiss_help(self) -> None:
        self.dismiss(None)


def _bindings(node: object) -> list[Binding]:
    found = []
    for item in getattr(node, "BINDINGS", []):
        binding = item if isinstance(item, Binding) else Binding(*item)
        keys = [key.strip() for key in binding.key.split(",")]
        for key in keys:
            shown = binding.key_display if binding.key_display and len(keys) == 1 else _display(key)
            found.append(Binding(key, binding.action, binding.description, binding.show, shown))
    return found


def _display(key: str) -> str:
    return {"question_mark": "?", "colon": ":", "slash": "/", "escape": "esc", "enter": "Enter",
            "tab": "Tab"}.get(key, key)


class LinePrompt(ModalScreen[str | None]):
    """One line typed at the bottom of the screen: its text (stripped) on Enter, None on esc or when empty."""

    BINDINGS: list[BindingType] = [Binding("escape", "cancel", "back")]
    DEFAULT_CSS = """
    LinePrompt { align: left bottom; background: $background 0%; }
    LinePrompt > Input { dock: bottom; width: 100%; border: tall $accent; }
    """

    def __init__(self, placeholder: str) -> None:
        super().__init__()
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        yield Input(placeholder=self.placeholder)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


def command_prompt() -> LinePrompt:
    """k9s's command line: ``:models``, ``:events``, ``:logs [MODEL]``, ``:describe [MODEL]``, ``:q``."""
    return LinePrompt(":models  :events  :telemetry  :search  :downloads  :logs [MODEL]  :describe [MODEL]  :q")


def pull_prompt() -> LinePrompt:
    """``p``: a Hugging Face repo to pull, as ``athanor pull`` takes it: ``org/repo`` or ``org/repo FILE``."""
    return LinePrompt("pull: org/repo [FILE.gguf]   (esc: back)")


class StarterPicker(ModalScreen["int | None"]):
    """The starter models for this machine (``hub/starters.py``); Enter pulls the one under the cursor."""

    BINDINGS: list[BindingType] = [Binding("escape", "cancel", "back")]
    DEFAULT_CSS = """
    StarterPicker { align: center middle; }
    StarterPicker > Vertical { width: 90%; height: auto; max-height: 80%; border: thick $accent; padding: 0 1; }
    StarterPicker OptionList { height: auto; max-height: 20; }
    """

    def __init__(self, choices: list[str]) -> None:
        super().__init__()
        self.choices = choices

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Pull a starter model (Enter pulls, esc goes back):")
            yield OptionList(*self.choices, id="starters")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option_index)

    def action_cancel(self) -> None:
        self.dismiss(None)
