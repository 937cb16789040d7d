"""The on-disk store: models.json (desired state + discovered facts) and state.json (observed state)."""

from athanor.store.files import atomic_write_text, locked, read_json
from athanor.store.store import Store, open_store

__all__ = ["Store", "atomic_write_text", "locked", "open_store", "read_json"]
