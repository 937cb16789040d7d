"""The phases of a model's runtime instance, and the error of a move between them that ``instance.py``'s table
forbids.

A module of its own because mypyc cannot compile a class derived from ``str`` or ``RuntimeError`` as a native
class: ``instance.py``, which every proxied request passes through, is compiled (``athanor/native.py``); this
stays Python.
"""

from __future__ import annotations

from enum import Enum


class Phase(str, Enum):
    STANDBY = "Standby"
    STARTING = "Starting"
    READY = "Ready"
    DRAINING = "Draining"
    STOPPING = "Stopping"
    FAILED = "Failed"


class TransitionError(RuntimeError):
    """A phase change the table forbids: a bug in the controller, never a user error."""
