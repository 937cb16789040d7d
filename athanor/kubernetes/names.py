"""Kubernetes names for athanor's models: valid whatever the model is called, stable, and never shared.

A Service's name must be a DNS-1035 label (lower-case letters, digits and '-', starting with a letter, ending with
a letter or digit, at most 63 characters); a Deployment's must be a DNS-1123 subdomain, and its pods' hostnames a
label, so every object of a model takes the stricter form. A model name that already is one (after the prefix)
is kept as it is, so the names people read are the names they wrote. Any other (upper case, dots, underscores,
non-ASCII, too long) is lower-cased, has every run of other characters replaced by '-', is cut to fit, and gets a
suffix from a hash of the original name: ``Qwen3.5_Coder`` and ``qwen3-5-coder`` differ in their hash, so they
never collide, and a render tomorrow gives the same name as today.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

MAX_LABEL = 63
SUFFIX_CHARS = 8  # hex digits of the name's hash: 4 billion values
_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_OTHER = re.compile(r"[^a-z0-9]+")


def object_name(prefix: str, name: str) -> str:
    """``prefix-name`` as a DNS-1035 label (``prefix`` is athanor's own: lower case, starting with a letter)."""
    plain = f"{prefix}-{name}"
    if len(plain) <= MAX_LABEL and _LABEL.match(plain):
        return plain
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    cleaned = _OTHER.sub("-", ascii_name).strip("-")
    suffix = hashlib.sha256(name.encode("utf-8")).hexdigest()[:SUFFIX_CHARS]
    room = MAX_LABEL - len(prefix) - len(suffix) - 2  # two dashes
    stem = cleaned[:room].rstrip("-")
    return f"{prefix}-{stem}-{suffix}" if stem else f"{prefix}-{suffix}"


def is_label(value: str) -> bool:
    """Whether ``value`` is a DNS-1035 label (what every name made here is)."""
    return len(value) <= MAX_LABEL and bool(_LABEL.match(value))


def label_value(value: str) -> str:
    """A label's value: at most 63 of [A-Za-z0-9._-], starting and ending alphanumeric (empty allowed). Model names
    go in an annotation as written; this is what a label may hold of them."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", value)[:MAX_LABEL]
    return cleaned.strip("-._")
