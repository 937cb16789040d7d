"""The error tree. Every failure a user can cause or meet is one of these.

    AthanorError                 root; the CLI prints str(err) on one line and exits with err.exit_code
    ├── SpecError                desired state that does not validate (carries every SpecIssue of a run)
    ├── StoreError               models.json / state.json cannot be used as they are
    │   ├── StoreCorruptError    unparseable or malformed file; never silently replaced
    │   └── StoreVersionError    written by a newer athanor than this one
    ├── NotFoundError            a named object does not exist
    ├── InvalidValueError        a value given on the command line is not acceptable
    ├── RuntimeNotFoundError     a runtime binary is not installed
    ├── MetadataError            a model's metadata (GGUF header, config.json), on disk or on the Hub, is unusable
    ├── HubError                 the Hugging Face Hub did not answer as asked
    │   ├── HubUnreachable       no connection, a timeout, or offline mode
    │   ├── HubRateLimited       429: too many requests for now
    │   └── HubAccessDenied      401/403: a gated or private repo, or a token the Hub refuses
    └── ServingError             a request cannot be served now (the ingress answers it as an OpenAI error)
        ├── ModelUnavailable     the model cannot run now: disabled, weights missing, failed to start (503)
        └── QueueFull            too many requests already wait for the model (429)

Dependency exceptions (yaml, jsonschema, OSError) are translated at the boundary that meets them,
with ``raise ... from exc`` so the cause stays visible in debug logs.
"""

from __future__ import annotations

from dataclasses import dataclass


class AthanorError(Exception):
    """Root of all athanor errors."""

    exit_code = 1


@dataclass(frozen=True, order=True)
class SpecIssue:
    """One problem in one document, located like a compiler diagnostic."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        text = f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"
        return printable(text)


def printable(text: str) -> str:
    """User text may hold control characters; an error line must stay one line and not drive the terminal."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class SpecError(AthanorError):
    """Desired state that does not validate; holds every issue found, not just the first."""

    def __init__(self, issues: list[SpecIssue]):
        self.issues = sorted(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class StoreError(AthanorError):
    """A store file cannot be read or written."""


class StoreCorruptError(StoreError):
    """A store file exists but cannot be parsed; it is left untouched for the user to inspect."""


class StoreVersionError(StoreError):
    """A store file was written by a newer athanor; we refuse to downgrade it."""


class NotFoundError(AthanorError):
    """A named object (model, recipe, gateway) does not exist."""


class InvalidValueError(AthanorError):
    """A value given on the command line is not acceptable."""


class RuntimeNotFoundError(AthanorError):
    """A runtime binary is not installed where athanor looks for it."""


class MetadataError(AthanorError):
    """A model's metadata (a GGUF header, a config.json), on disk or read from the Hub, is malformed, past athanor's
    limits, or implausible; the message names the file or repo."""


class HubError(AthanorError):
    """The Hugging Face Hub did not answer as asked; the message names the endpoint and what to do."""


class HubUnreachable(HubError):
    """The Hub cannot be reached: no connection, a timeout, or offline mode."""


class HubRateLimited(HubError):
    """The Hub answered 429: too many requests for now."""


class HubAccessDenied(HubError):
    """The Hub refused access (401/403): a gated or private repo, or a token it does not accept."""


class PullRefused(AthanorError):
    """A pull that will not start: the model cannot fit this machine, the disk cannot hold it, or discovery
    would not register it. Nothing was downloaded."""


class ServingError(AthanorError):
    """A request cannot be served now; the message is for the client."""


class ModelUnavailable(ServingError):
    """The model cannot be served now (disabled, weights missing or unreadable, failed to start)."""


class QueueFull(ServingError):
    """Too many requests are already waiting for this model."""
