"""Which original layer each layer of a transformed model comes from.

Every transform (removal, a block replaced by one trained layer, sharing, unfolding) yields
a :class:`LayerMap`; the model card, the report, tail-layer distillation, healing an earlier
output and the exports read it, instead of each working out the correspondence again.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..errors import LayerfoldError


@dataclass(frozen=True)
class LayerMap:
    """For each new layer, the original layer it is (``None``: a replacement of a block).

    ``blocks`` gives each replacement's original block as (new index, first, last); a block
    whose first layer stays untrained in its place (LLM-Streamline's ``--replacement none``)
    is that layer, not a replacement.
    """

    sources: tuple[int | None, ...]
    layers_before: int
    blocks: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self):
        seen = [s for s in self.sources if s is not None]
        if len(set(seen)) != len(seen) or any(not 0 <= s < self.layers_before for s in seen):
            raise LayerfoldError(f"not a layer map of {self.layers_before} layers: {list(self.sources)}")

    # -- made by the transforms ------------------------------------------------------------

    @classmethod
    def identity(cls, n: int) -> LayerMap:
        return cls(tuple(range(n)), n)

    @classmethod
    def removal(cls, n: int, removed: Sequence[int]) -> LayerMap:
        """Layers ``removed`` of ``n`` are gone; the others keep their order."""
        drop = set(removed)
        return cls(tuple(i for i in range(n) if i not in drop), n)

    @classmethod
    def replacement(cls, n: int, start: int, window: int, *, keeps_first: bool = False) -> LayerMap:
        """Layers ``start .. start+window-1`` become one new layer (the first of them, untrained,
        with ``keeps_first``)."""
        sources = (*range(start), start if keeps_first else None, *range(start + window, n))
        blocks = () if keeps_first else ((start, start, start + window - 1),)
        return cls(sources, n, blocks)

    @classmethod
    def from_list(cls, sources: Sequence[int | None], layers_before: int | None = None) -> LayerMap:
        """A map recorded as a list (``layerfold.json``); replaced blocks are read back from the gaps."""
        sources = tuple(sources)
        n = layers_before if layers_before is not None else (max((s for s in sources if s is not None), default=-1) + 1)
        blocks = []
        for j, s in enumerate(sources):
            if s is None:
                before = next((sources[i] for i in range(j - 1, -1, -1) if sources[i] is not None), -1)
                after = next((sources[i] for i in range(j + 1, len(sources)) if sources[i] is not None), n)
                blocks.append((j, before + 1, after - 1))
        return cls(sources, n, tuple(blocks))

    def then(self, later: LayerMap) -> LayerMap:
        """This map followed by one of the model it produced (e.g. a pruned model pruned again)."""
        if later.layers_before != len(self):
            raise LayerfoldError(f"cannot chain a map of {later.layers_before} layers after one that gives {len(self)}")
        sources = tuple(None if s is None else self.sources[s] for s in later.sources)
        blocks = [(j, self._first(a), self._last(b)) for j, a, b in later.blocks]
        for j, s in enumerate(later.sources):
            if s is not None and self.sources[s] is None:
                blocks.append((j, *next((a, b) for k, a, b in self.blocks if k == s)))
        return LayerMap(sources, self.layers_before, tuple(sorted(blocks)))

    def _first(self, new: int) -> int:
        s = self.sources[new]
        return s if s is not None else next(a for k, a, _ in self.blocks if k == new)

    def _last(self, new: int) -> int:
        s = self.sources[new]
        return s if s is not None else next(b for k, _, b in self.blocks if k == new)

    # -- read by everyone else -----------------------------------------------------------

    @property
    def kept(self) -> list[int]:
        """For each new layer, the original layer whose output its output stands for: itself,
        or for a replacement the last layer of its block (what tail-layer distillation aligns)."""
        return [self._last(j) for j in range(len(self))]

    @property
    def removed(self) -> list[int]:
        """Original layers that are no longer in the model as themselves."""
        present = {s for s in self.sources if s is not None}
        return [i for i in range(self.layers_before) if i not in present]

    def to_list(self) -> list[int | None]:
        return list(self.sources)

    def describe(self) -> str:
        """``0-11 12<-18..20 13-21<-21-29``: runs of new layers and the originals they come from."""
        parts, j = [], 0
        while j < len(self):
            s = self.sources[j]
            if s is None:
                _, a, b = next(x for x in self.blocks if x[0] == j)
                parts.append(f"{j}<-[{a}..{b}]")
                j += 1
                continue
            k = j
            while k + 1 < len(self) and self.sources[k + 1] is not None and self.sources[k + 1] == self.sources[k] + 1:
                k += 1
            new = f"{j}" if j == k else f"{j}-{k}"
            old = f"{s}" if j == k else f"{s}-{self.sources[k]}"
            parts.append(new if new == old else f"{new}<-{old}")
            j = k + 1
        return " ".join(parts)

    def __len__(self) -> int:
        return len(self.sources)

    def __iter__(self) -> Iterator[int | None]:
        return iter(self.sources)

    def __getitem__(self, i):
        return self.sources[i]
