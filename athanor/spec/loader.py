"""Read YAML spec files into plain data while remembering where every value came from.

PyYAML's constructors forget positions, and its mappings silently keep the last of two equal keys. We compose
the node graph ourselves so that every error can say ``file:line:column`` and duplicate keys are errors. Only
JSON-shaped data comes out (str, int, float, bool, None, list, dict): timestamps and other tags stay strings.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from athanor.errors import SpecError, SpecIssue

JSONPath = tuple[str | int, ...]
_MAX_NODES = 200_000  # an alias bomb must fail fast, not eat the machine
STDIN = "<stdin>"  # the file name of documents read from ``-f -``
_JSON_TAGS = {
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}


@dataclass
class Document:
    """One YAML document with a map from JSON path to (line, column), both 1-based."""

    file: str
    index: int
    data: Any
    marks: dict[JSONPath, tuple[int, int]] = field(default_factory=dict)
    key_marks: dict[JSONPath, tuple[int, int]] = field(default_factory=dict)

    def resolve_path(self, raw: str) -> str:
        """A path written in this document, made absolute: relative to the file's directory (as kustomize does),
        or to the working directory for stdin, with ``~`` expanded.

        The store must not keep a relative path: the daemon that reads it runs in another directory.
        """
        base = os.getcwd() if self.file == STDIN else os.path.dirname(os.path.abspath(self.file))
        return os.path.abspath(os.path.join(base, os.path.expanduser(raw)))

    def locate(self, path: JSONPath, *, key: bool = False) -> tuple[int, int]:
        """Position of ``path`` (its key when ``key``), else of its nearest located ancestor."""
        probe = tuple(path)
        if key and probe in self.key_marks:
            return self.key_marks[probe]
        while probe:
            if probe in self.marks:
                return self.marks[probe]
            probe = probe[:-1]
        return self.marks.get((), (1, 1))

    def issue(self, path: JSONPath, message: str, *, key: bool = False) -> SpecIssue:
        line, column = self.locate(path, key=key)
        return SpecIssue(self.file, line, column, format_path(path), message)

    def issue_at(self, node: yaml.Node, path: JSONPath, message: str) -> SpecIssue:
        line, column = node.start_mark.line + 1, node.start_mark.column + 1
        return SpecIssue(self.file, line, column, format_path(path), message)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def format_path(path: Iterable[str | int]) -> str:
    """``spec.preset.ctxSize``, ``spec.aliases[0]``, ``metadata.labels["athanor.dev/x"]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


class _Builder:
    """Turns a composed node tree into data, recording marks and collecting issues."""

    def __init__(self, doc: Document, issues: list[SpecIssue]):
        self.doc = doc
        self.issues = issues
        self.constructor = yaml.SafeLoader("")  # only its scalar constructors are used
        self.nodes = 0

    def build(self, node: yaml.Node, path: JSONPath) -> Any:
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            raise _TooLarge
        self.doc.marks.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        if node.tag in _JSON_TAGS:
            value = self.constructor.construct_object(node)
            if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
                self.issues.append(self.doc.issue(path, f"{node.value!r} is not a finite number"))
            return value
        return str(node.value)

    def _mapping(self, node: yaml.MappingNode, path: JSONPath) -> dict[str, Any]:
        result: dict[str, Any] = {}
        explicit: set[str] = set()
        for key_node, value_node in self._pairs(node):
            if key_node is None:  # merged from '<<': explicit keys win, later merges do not override
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                line, col = key_node.start_mark.line + 1, key_node.start_mark.column + 1
                self.issues.append(SpecIssue(self.doc.file, line, col, format_path(path), "keys must be plain strings"))
                continue
            key = str(key_node.value)
            child = path + (key,)
            if key in explicit:
                first = self.doc.key_marks[child]
                self.issues.append(self.doc.issue_at(key_node, child, f"duplicate key (first at line {first[0]})"))
                continue
            explicit.add(key)
            self.doc.key_marks[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            result[key] = self.build(value_node, child)
        for key_node, value_node in self._merged(node):
            key = str(key_node.value)
            if key not in result:
                result[key] = self.build(value_node, path + (key,))
        return result

    @staticmethod
    def _pairs(node: yaml.MappingNode) -> Iterable[tuple[yaml.Node | None, yaml.Node]]:
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                yield None, value_node
            else:
                yield key_node, value_node

    def _merged(self, node: yaml.MappingNode) -> Iterable[tuple[yaml.ScalarNode, yaml.Node]]:
        for key_node, value_node in node.value:
            if key_node.tag != "tag:yaml.org,2002:merge":
                continue
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    line, col = source.start_mark.line + 1, source.start_mark.column + 1
                    self.issues.append(SpecIssue(self.doc.file, line, col, "", "'<<' must merge a mapping"))
                    continue
                for k, v in source.value:
                    if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                        yield k, v


class _TooLarge(Exception):
    pass


def parse_text(text: str, file: str) -> tuple[list[Document], list[SpecIssue]]:
    """All documents of one YAML stream, and every issue found in it (syntax errors stop the stream)."""
    docs: list[Document] = []
    issues: list[SpecIssue] = []
    loader = yaml.SafeLoader(text)
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            doc = Document(file=file, index=index, data=None)
            index += 1
            try:
                doc.data = _Builder(doc, issues).build(node, ())
            except _TooLarge:
                line = node.start_mark.line + 1
                issues.append(SpecIssue(file, line, 1, "", f"document has more than {_MAX_NODES} nodes (alias bomb?)"))
                continue
            if doc.data is None or doc.data == "":
                continue  # an empty document between '---' separators
            docs.append(doc)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = " ".join(filter(None, [exc.context, exc.problem])) or "invalid YAML"
        issues.append(SpecIssue(file, line, col, "", f"YAML syntax error: {problem}"))
    except yaml.YAMLError as exc:
        issues.append(SpecIssue(file, 1, 1, "", f"YAML error: {exc}"))
    finally:
        loader.dispose()
    return docs, issues


def spec_files(target: str) -> list[Path]:
    """The files behind ``-f``: one file, or every *.yaml / *.yml below a directory, in a stable order."""
    path = Path(target).expanduser()
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    if path.exists():
        return [path]
    raise SpecError([SpecIssue(target, 1, 1, "", "no such file or directory")])


def load_sources(targets: Iterable[str], stdin: Any = None) -> tuple[list[Document], list[SpecIssue]]:
    """Parse every ``-f`` target (``-`` is stdin): the documents that parsed and every syntax issue found.

    Issues are returned rather than raised so that validation can report them together with its own.
    """
    docs: list[Document] = []
    issues: list[SpecIssue] = []
    for target in targets:
        if target == "-":
            stream = stdin if stdin is not None else sys.stdin
            found, problems = parse_text(stream.read(), STDIN)
            docs += found
            issues += problems
            continue
        try:
            paths = spec_files(target)
        except SpecError as exc:
            issues += exc.issues
            continue
        for path in paths:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                issues.append(SpecIssue(str(path), 1, 1, "", f"cannot read: {exc}"))
                continue
            found, problems = parse_text(text, str(path))
            docs += found
            issues += problems
    return docs, issues
