"""Class hierarchies (trees or DAGs) and the LCS-height class similarity of Barz & Denzler.

Conventions: the height of a leaf is 0 and a node's height is the longest path down to a leaf; the depth of a root
is 0 and a node's depth is the longest path up to a root; ``lcs(a, b)`` is the common ancestor (a node counts as its
own ancestor) of greatest depth, ties broken by smaller height, then by ``str(node)``.
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Hashable, Iterable, Sequence

import numpy as np

Node = Hashable


class ClassHierarchy:
    """A directed acyclic "is-a" graph given as (parent, child) edges; ``aliases`` map other names to node ids."""

    def __init__(self, edges: Iterable[tuple[Node, Node]], aliases: dict[Node, Node] | None = None):
        self.parents: dict[Node, set] = defaultdict(set)
        self.children: dict[Node, set] = defaultdict(set)
        for parent, child in edges:
            self.parents[child].add(parent)
            self.children[parent].add(child)
        self.nodes = sorted(set(self.parents) | set(self.children), key=_sort_key)
        if not self.nodes:
            raise ValueError("a class hierarchy needs at least one (parent, child) edge")
        self.aliases = dict(aliases or {})
        self._order = _topological_order(self.nodes, self.parents, self.children)
        self.depths = _longest_paths(self._order, self.parents)
        self.heights = _longest_paths(self._order[::-1], self.children)
        self.max_height = max(self.heights.values())
        self._rank = self._lcs_ranks()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_parent_child_file(cls, path: str | os.PathLike) -> "ClassHierarchy":
        """Read "parent child" lines (blank lines and ``#`` comments skipped) from a local file or object-store URI;
        ids are ints when all are ints."""
        from rayhash import storage

        pairs = []
        for lineno, line in enumerate(storage.read_bytes(path).decode("utf-8").splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'parent child', got {line.strip()!r}")
            pairs.append(tuple(fields))
        if not pairs:
            raise ValueError(f"{path}: no 'parent child' lines found")
        if all(p.lstrip("-").isdigit() and c.lstrip("-").isdigit() for p, c in pairs):
            pairs = [(int(p), int(c)) for p, c in pairs]
        return cls(pairs)

    @classmethod
    def from_wordnet(cls, synsets: Sequence[str]) -> "ClassHierarchy":
        """Hypernym closure (incl. instance hypernyms) of WordNet noun synsets up to ``entity.n.01``.

        ``synsets`` are wnids (``"n01440764"``) or synset names (``"apple.n.01"``). Nodes are named like the input:
        wnids when every input is a wnid, else synset names (wnid inputs stay usable through aliases).
        """
        from rayhash.semantics.wordnet import wordnet_synset, wnid_of

        as_wnid = all(_is_wnid(s) for s in synsets)
        name = wnid_of if as_wnid else (lambda s: s.name())
        edges, aliases, seen, stack = [], {}, set(), []
        for given in synsets:
            syn = wordnet_synset(given)
            if given != name(syn):
                aliases[given] = name(syn)
            stack.append(syn)
        while stack:
            syn = stack.pop()
            if syn in seen:
                continue
            seen.add(syn)
            for hyper in syn.hypernyms() + syn.instance_hypernyms():
                edges.append((name(hyper), name(syn)))
                stack.append(hyper)
        if not edges:  # e.g. only entity.n.01 was given
            raise ValueError(f"WordNet synsets {list(synsets)[:5]} have no hypernyms; nothing to build")
        return cls(edges, aliases)

    # ----------------------------------------------------------------- queries
    @property
    def leaves(self) -> list:
        """Nodes without children, sorted (ints numerically)."""
        return [n for n in self.nodes if not self.children.get(n)]

    @property
    def roots(self) -> list:
        return [n for n in self.nodes if not self.parents.get(n)]

    def resolve(self, node: Node) -> Node:
        """The node id for ``node`` (following aliases); KeyError naming the node when unknown."""
        node = self.aliases.get(node, node)
        if node not in self.depths:
            raise KeyError(f"{node!r} is not a node of this class hierarchy")
        return node

    def height(self, node: Node) -> int:
        return self.heights[self.resolve(node)]

    def depth(self, node: Node) -> int:
        return self.depths[self.resolve(node)]

    def ancestors(self, node: Node) -> set:
        """All ancestors of ``node``, including itself."""
        out, stack = set(), [self.resolve(node)]
        while stack:
            n = stack.pop()
            if n not in out:
                out.add(n)
                stack.extend(self.parents.get(n, ()))
        return out

    def lcs(self, a: Node, b: Node) -> Node | None:
        """Lowest common subsumer: the deepest common ancestor (None when a and b share no ancestor)."""
        common = self.ancestors(a) & self.ancestors(b)
        return min(common, key=self._rank.__getitem__) if common else None

    def similarity(self, a: Node, b: Node, metric: str = "lcs_height") -> float:
        return float(self.similarity_matrix([a, b], metric)[0, 1])

    def similarity_matrix(self, leaves: Sequence[Node] | None = None, metric: str = "lcs_height") -> np.ndarray:
        """(C, C) float32 class similarities, rows/columns in the order of ``leaves`` (default: ``self.leaves``).

        ``lcs_height``: ``1 - height(lcs)/max_height``; ``wu_palmer``: ``2 D(lcs) / (D(a) + D(b))`` with node-counting
        depth ``D = depth + 1``. Pairs without a common ancestor get 0. Vectorised: O(sum over nodes of
        (#leaves below)^2), a second or so for the 1,000 ImageNet classes.
        """
        leaves = [self.resolve(x) for x in (self.leaves if leaves is None else leaves)]
        lcs = self._lcs_matrix(leaves)
        if metric == "lcs_height":
            h = np.array([self.heights[n] for n in self._by_rank] + [self.max_height], dtype=np.float64)
            sim = 1.0 - h[lcs] / max(self.max_height, 1)
        elif metric == "wu_palmer":
            dl = np.array([self.depths[n] + 1 for n in self._by_rank] + [0], dtype=np.float64)
            dq = np.array([self.depths[n] + 1 for n in leaves], dtype=np.float64)
            sim = 2.0 * dl[lcs] / (dq[:, None] + dq[None, :])
        else:
            raise ValueError(f"unknown similarity metric {metric!r}; use 'lcs_height' or 'wu_palmer'")
        return sim.astype(np.float32)

    # ----------------------------------------------------------------- internals
    def _lcs_ranks(self) -> dict:
        """Rank of every node as an LCS candidate: deeper first, then lower, then by name."""
        self._by_rank = sorted(self.nodes, key=lambda n: (-self.depths[n], self.heights[n], str(n)))
        return {n: i for i, n in enumerate(self._by_rank)}

    def _lcs_matrix(self, leaves: list) -> np.ndarray:
        """(C, C) LCS rank per pair (``len(nodes)`` = none): best-ranked nodes claim their leaf pairs first."""
        below = defaultdict(list)  # node rank -> positions of the given leaves under it
        for i, leaf in enumerate(leaves):
            for a in self.ancestors(leaf):
                below[self._rank[a]].append(i)
        none = len(self.nodes)
        out = np.full((len(leaves), len(leaves)), none, dtype=np.int64)
        for rank in sorted(below):
            idx = np.asarray(below[rank])
            block = out[np.ix_(idx, idx)]
            block[block == none] = rank
            out[np.ix_(idx, idx)] = block
        return out


def _sort_key(node: Node):
    return (0, node, "") if isinstance(node, int) else (1, 0, str(node))


def _is_wnid(s) -> bool:
    return isinstance(s, str) and len(s) == 9 and s[0] == "n" and s[1:].isdigit()


def _topological_order(nodes: list, parents: dict, children: dict) -> list:
    """Roots first (Kahn); ValueError naming a node on a cycle."""
    indeg = {n: len(parents.get(n, ())) for n in nodes}
    order = [n for n in nodes if indeg[n] == 0]
    for n in order:  # the list grows while iterating
        for c in sorted(children.get(n, ()), key=_sort_key):
            indeg[c] -= 1
            if indeg[c] == 0:
                order.append(c)
    if len(order) != len(nodes):
        stuck = next(n for n in nodes if indeg[n] > 0)
        raise ValueError(f"class hierarchy has a cycle through {stuck!r}; a hierarchy must be acyclic")
    return order


def _longest_paths(order: list, preds: dict) -> dict:
    """Longest path length from a source, visiting nodes so that ``preds`` come first."""
    out = {}
    for n in order:
        out[n] = 1 + max((out[p] for p in preds.get(n, ())), default=-1)
    return out
