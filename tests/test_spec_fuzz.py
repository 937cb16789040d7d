"""Property: whatever a user feeds `apply`, the answer is success or a clean, located error, never a crash."""

from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from athanor import actions
from athanor.errors import AthanorError, SpecError
from athanor.store import open_store

VALID: list[dict[str, Any]] = [
    {
        "apiVersion": "athanor.dev/v1alpha1",
        "kind": "Gateway",
        "metadata": {"name": "default"},
        "spec": {"listen": "127.0.0.1:8080", "residency": {"policy": "memory", "budget": "80%"},
                 "portRange": {"start": 42000, "end": 42100}, "discovery": {"hfCache": False, "paths": []}},
    },
    {
        "apiVersion": "athanor.dev/v1alpha1",
        "kind": "Model",
        "metadata": {"name": "qwen", "labels": {"family": "qwen"}},
        "spec": {"runtime": "llama-server", "source": {"hf": {"repo": "Qwen/Q-GGUF", "file": "q.gguf"}},
                 "aliases": ["q"], "recipe": "coding", "preset": {"ctxSize": 4096, "flashAttn": "on"}},
    },
    {
        "apiVersion": "athanor.dev/v1alpha1",
        "kind": "Recipe",
        "metadata": {"name": "mine"},
        "spec": {"description": "x", "mlx-lm": {"maxTokens": 10}},
    },
]

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children, max_size=3)),
    max_leaves=8,
)
LOCATED = re.compile(r"^.+:\d+:\d+: ")


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def mutated_specs(draw: st.DrawFn) -> str:
    docs = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 4))):
        doc = draw(st.sampled_from(docs))
        path = draw(st.sampled_from(_paths(doc)[1:]))
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = draw(json_values)
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
    text = yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True)
    if draw(st.booleans()):  # and sometimes damage the text itself
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.sampled_from(["", ":", "- ", "{", "]", "\t", "&a ", "*a", "\n  x: 1", "'"])) + text[pos + 1:]
    return text


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(text=mutated_specs())
def test_mutated_specs_never_crash(home, text: str) -> None:
    """`home` isolates ATHANOR_HOME and the HF cache; each example still gets its own store."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.yaml"
        spec.write_text(text)
        store = open_store(Path(tmp) / "home")
        try:
            actions.apply(store, [str(spec)], dry_run=True)
        except SpecError as exc:
            assert exc.issues
            for line in str(exc).splitlines():
                assert LOCATED.match(line), line
        except AthanorError as exc:
            assert str(exc)


def test_alias_bomb_fails_fast(tmp_path, home) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8)
    )
    spec = tmp_path / "bomb.yaml"
    spec.write_text(bomb)
    try:
        actions.apply(open_store(home), [str(spec)], dry_run=True)
    except SpecError as exc:
        assert "more than" in str(exc) and "nodes" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("an alias bomb must be rejected")
