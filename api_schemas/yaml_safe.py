"""Bounded YAML: the one loader for spec files, `--set` values and YAML uploads to the API.

`yaml.safe_load` refuses arbitrary objects but not size: an alias is a pointer to an earlier node, so
a 1.3 KB document of nested anchors (`&a1 [*a0, *a0, ...]`, seven levels of ten) stands for tens of
millions of nodes, and whatever walks the result (pydantic, json.dumps, the database) expands it.
`BoundedSafeLoader` counts while the document is *composed*, before any Python object exists: the
aliases, the nodes the document stands for once every alias is expanded, and the nesting depth
(also once expanded). A document past a limit is refused with the path of the node where it went
past, and nothing is ever expanded in memory. Aliases to an enclosing node (a recursive document)
are refused too: a spec is a tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from yaml.error import Mark
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = ["DEFAULT_LIMITS", "BoundedSafeLoader", "YAMLLimitError", "YAMLLimits", "load_yaml"]


@dataclass(frozen=True)
class YAMLLimits:
    """What one document may hold. A large sweep spec has a few hundred nodes, nesting below 10."""

    max_aliases: int = 100
    max_nodes: int = 20_000  # counted with every alias expanded
    max_depth: int = 32  # counted with every alias expanded; the root is depth 1


DEFAULT_LIMITS = YAMLLimits()


class YAMLLimitError(yaml.YAMLError):
    """A document past one of the YAMLLimits.

    `path` is where, dotted like spec error paths (`sweep.parameters.method.alpha.values[3]`);
    `too_large` is set when the limit is on size (expanded nodes), which the API answers with 413.
    """

    def __init__(self, problem: str, *, path: str, mark: Mark | None, too_large: bool = False) -> None:
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        self.problem = problem + where
        self.path = path
        self.too_large = too_large
        super().__init__(f"{path or '<root>'}: {self.problem}")


def _dotted(parts: list[str | int]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class BoundedSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that enforces YAMLLimits during composition (see the module docstring).

    Every composed node adds one to a running count; an anchored node remembers how much its subtree
    added (nodes, and levels below it), so an alias adds exactly what expanding it would, without
    expanding it.
    """

    def __init__(self, stream: str | bytes, limits: YAMLLimits = DEFAULT_LIMITS) -> None:
        super().__init__(stream)
        self.limits = limits
        self._aliases = 0
        self._nodes = 0
        self._depth = 0  # of the node being composed
        self._deepest = 0  # deepest level reached inside the anchored subtree being composed
        self._path: list[str | int] = []
        self._weights: dict[str, tuple[int, int]] = {}  # anchor -> (expanded nodes, levels)

    def _refuse(self, problem: str, mark: Mark | None, *, too_large: bool = False) -> YAMLLimitError:
        return YAMLLimitError(problem, path=_dotted(self._path), mark=mark, too_large=too_large)

    def _add_nodes(self, count: int, mark: Mark | None) -> None:
        self._nodes += count
        if self._nodes > self.limits.max_nodes:
            raise self._refuse(
                f"the document expands to more than {self.limits.max_nodes} nodes (aliases counted "
                "as copies of what they refer to)",
                mark,
                too_large=True,
            )

    def _reach(self, depth: int, mark: Mark | None) -> None:
        if depth > self.limits.max_depth:
            raise self._refuse(f"nested deeper than {self.limits.max_depth} levels", mark)
        self._deepest = max(self._deepest, depth)

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if isinstance(parent, SequenceNode):
            self._path.append(int(index))
        elif isinstance(parent, MappingNode):
            self._path.append(str(index.value) if isinstance(index, ScalarNode) else "<key>")
        try:
            event = self.peek_event()
            if isinstance(event, AliasEvent):
                self._alias(event.anchor, event.start_mark)
                return super().compose_node(parent, index)  # the shared node; unknown anchors fail there
            self._depth += 1
            self._reach(self._depth, event.start_mark)
            before_nodes, outer_deepest = self._nodes, self._deepest
            self._deepest = self._depth
            self._add_nodes(1, event.start_mark)
            node = super().compose_node(parent, index)
            if event.anchor is not None:
                self._weights[event.anchor] = (self._nodes - before_nodes, self._deepest - self._depth + 1)
            self._deepest = max(self._deepest, outer_deepest)
            self._depth -= 1
            return node
        finally:
            if parent is not None:
                self._path.pop()

    def _alias(self, anchor: str, mark: Mark | None) -> None:
        self._aliases += 1
        if self._aliases > self.limits.max_aliases:
            raise self._refuse(f"more than {self.limits.max_aliases} aliases", mark)
        if anchor in self.anchors and anchor not in self._weights:
            raise self._refuse(f"alias *{anchor} refers to a node that contains it", mark)
        nodes, levels = self._weights.get(anchor, (0, 0))
        self._reach(self._depth + levels, mark)
        self._add_nodes(nodes, mark)


def load_yaml(text: str | bytes, *, limits: YAMLLimits = DEFAULT_LIMITS) -> Any:
    """Parse one YAML document like `yaml.safe_load`, within `limits` (YAMLLimitError otherwise).

    Other malformed input raises yaml.YAMLError as safe_load does; YAMLLimitError is one of those.
    """
    loader = BoundedSafeLoader(text, limits)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
