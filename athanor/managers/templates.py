"""The Jinja2 templates service files are rendered from (``templates/`` in the source tree, ``_data`` in a wheel).

Plists are XML: their environment escapes every value (autoescape), so a path holding ``&`` or ``<`` stays one
string. Units are not markup: their values are quoted by systemd's own rules before they reach the template.
"""

from __future__ import annotations

import functools
from typing import Any

from athanor.paths import data_path


@functools.lru_cache(maxsize=None)
def _environment(folder: str, escape: bool) -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(data_path(f"templates/{folder}"))),
        autoescape=escape,
        undefined=jinja2.StrictUndefined,  # a missing value is a bug, never an empty string in a service file
        keep_trailing_newline=True,
    )


def render(folder: str, name: str, *, escape: bool, **values: Any) -> bytes:
    return _environment(folder, escape).get_template(name).render(**values).encode("utf-8")
