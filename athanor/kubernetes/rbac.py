"""What the gateway may do in its namespace under ``serviceManager: kubernetes``, and no more.

These are exactly the calls ``managers/kubernetes.py`` makes: patch a model's Deployment's ``scale`` (start: 1,
stop: 0; a Deployment never applied answers 404, which is how the gateway knows to say so), list and watch the
models' Pods (where a runtime is, whether it is ready, how it ended), and read a Pod's log (``athanor logs``). It
reads no Deployment and no Secret: the runtime key comes mounted. The rendered Role is built from this table, and
the tests check every request the gateway sent against it, and that it needed every rule.
"""

from __future__ import annotations

from typing import Any

# (API group, resource, verbs): "" is the core group; "deployments/scale" is the Deployment's scale subresource.
RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("apps", "deployments/scale", ("patch",)),
    ("", "pods", ("list", "watch")),
    ("", "pods/log", ("get",)),
)


def role_rules() -> list[dict[str, Any]]:
    """The Role's ``rules``, one per resource, in a fixed order (the same bytes every render)."""
    return [{"apiGroups": [group], "resources": [resource], "verbs": list(verbs)} for group, resource, verbs in RULES]


def allows(group: str, resource: str, verb: str) -> bool:
    """Whether the Role lets the gateway make one call (``resource`` with its subresource, as in ``RULES``)."""
    return any(g == group and r == resource and verb in verbs for g, r, verbs in RULES)
