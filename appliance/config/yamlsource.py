"""YAML loading that remembers where every key and value came from (file:line:column)."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Path_ = tuple  # a key path into the document: ("modules", "stats", "window", "size")


@dataclass(frozen=True)
class Mark:
    line: int      # 1-based
    column: int    # 1-based


@dataclass
class YamlDocument:
    path: Path
    data: Any
    value_marks: dict[tuple, Mark] = field(default_factory=dict)
    key_marks: dict[tuple, Mark] = field(default_factory=dict)

    def mark_for(self, path: tuple, *, key: bool = False) -> Mark:
        """Where path's key (key=True) or value sits; falls back to the nearest ancestor."""
        marks = self.key_marks if key else self.value_marks
        p = tuple(path)
        while p:
            if p in marks:
                return marks[p]
            if not key and p in self.key_marks:
                return self.key_marks[p]
            p = p[:-1]
        return self.value_marks.get((), Mark(1, 1))


class YamlError(Exception):
    """A syntax or structure error, already phrased as file:line:col: message."""

    def __init__(self, path: Path, mark: Mark, message: str) -> None:
        self.path, self.mark, self.message = path, mark, message
        super().__init__(f"{path}:{mark.line}:{mark.column}: {message}")


def _mark(node: yaml.Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)


MAX_VALUES = 100_000   # values after expanding aliases; a config is a few hundred


def _expanded_size(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """How many values the document has once aliases are expanded (an alias bomb of a few
    hundred bytes expands to millions), refusing alias cycles."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise YamlError(Path("?"), _mark(node), "an alias refers to itself (recursive structure)")
    active.add(key)
    children = []
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    size = 1
    for child in children:
        size += _expanded_size(child, memo, active)
        if size > MAX_VALUES:
            break
    active.discard(key)
    memo[key] = size
    return size


def _walk(doc: YamlDocument, node: yaml.Node, path: tuple, visited: set[int] | None = None) -> None:
    # Marks for an aliased node are recorded once, at its first path: enough to point at it.
    visited = set() if visited is None else visited
    if id(node) in visited:
        return
    visited.add(id(node))
    doc.value_marks[path] = _mark(node)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, Mark] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = yaml.SafeLoader().construct_object(key_node) if not isinstance(key_node, yaml.ScalarNode) \
                else _scalar(key_node)
            if key in seen:
                # PyYAML silently keeps the last one; a plant engineer's copy-paste deserves better.
                first = seen[key]
                raise YamlError(doc.path, _mark(key_node),
                                f"duplicate key {key!r} in {'.'.join(map(str, path)) or 'the top level'} "
                                f"(first defined at line {first.line})")
            seen[key] = _mark(key_node)
            doc.key_marks[path + (key,)] = _mark(key_node)
            _walk(doc, value_node, path + (key,), visited)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(doc, item, path + (i,), visited)


def _scalar(node: yaml.ScalarNode) -> Any:
    loader = yaml.SafeLoader("")
    return loader.construct_object(node)


MAX_CONFIG_BYTES = 1 << 20


def _read_config_text(path: Path) -> str:
    """A regular file of at most 1 MiB, read without blocking: a FIFO or /dev/zero named as a
    config (e.g. from the console) must not hang or exhaust the supervisor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise YamlError(path, Mark(1, 1), "config file not found") from None
    except OSError as exc:
        raise YamlError(path, Mark(1, 1), f"cannot open: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise YamlError(path, Mark(1, 1), "not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_CONFIG_BYTES:
        raise YamlError(path, Mark(1, 1), f"larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is far smaller")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlError(path, Mark(1, 1), f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def load_yaml(path: str | Path, text: str | None = None) -> YamlDocument:
    path = Path(path)
    if text is None:
        text = _read_config_text(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            try:
                size = _expanded_size(node, {}, set())
            except YamlError as exc:
                raise YamlError(path, exc.mark, exc.message) from None
            if size > MAX_VALUES:
                raise YamlError(path, Mark(1, 1), f"the document expands to more than {MAX_VALUES} values "
                                "(aliases?); a config is far smaller")
        data = yaml.safe_load(text)
    except RecursionError:
        raise YamlError(path, Mark(1, 1), "the document nests too deeply") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Mark(mark.line + 1, mark.column + 1) if mark else Mark(1, 1)
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        raise YamlError(path, where, f"YAML syntax error: {what}") from None
    except yaml.reader.ReaderError as exc:   # a character YAML does not allow (NUL, other controls)
        before = text[:exc.position]
        where = Mark(before.count("\n") + 1, exc.position - (before.rfind("\n") + 1) + 1)
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise YamlError(path, where, f"YAML syntax error: the character U+{char:04X} is not allowed in a YAML "
                                     f"file") from None
    doc = YamlDocument(path=path, data=data if data is not None else {})
    if node is not None:
        _walk(doc, node, ())
    return doc
