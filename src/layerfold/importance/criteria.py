"""Layer and block importance from one calibration pass (METHODS.md section 1).

Every criterion is a function of the cosine similarity between hidden states ``h[l]`` and
``h[l+n]`` (``h[0]`` the embeddings, ``h[L]`` the raw output of the last layer, before the
final norm). One observer accumulates, for every pair (l, l+n):

- the mean cosine over all tokens (LLM-Streamline's block similarity, ShortGPT's BI for n=1);
- the mean angular distance arccos(cos)/pi on each sample's last token (Gromov et al.).

Cosines are row-wise dot products of unit vectors; no token-by-token matrix is formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class LayerScores:
    """All criteria for a model with ``num_layers`` layers.

    ``cosine[l][n]`` is the mean cosine between h[l] and h[l+n] over all tokens;
    ``angular[l][n]`` the mean angular distance on last tokens (NaN where l+n > L).
    """

    num_layers: int
    cosine: list[list[float]]
    angular: list[list[float]]
    tokens: int
    samples: int
    extra: dict = field(default_factory=dict)

    @property
    def block_influence(self) -> list[float]:
        """ShortGPT's BI(l) = 1 - mean cos(h[l], h[l+1]); low means removable."""
        return [1.0 - self.cosine[l][1] for l in range(self.num_layers)]

    def block_cosine(self, n: int) -> list[float]:
        """cos(h[l], h[l+n]) for every start l of a window of n layers; high means removable."""
        return [self.cosine[l][n] for l in range(self.num_layers - n + 1)]

    def block_angular(self, n: int) -> list[float]:
        return [self.angular[l][n] for l in range(self.num_layers - n + 1)]

    @classmethod
    def from_dict(cls, d: dict) -> LayerScores:
        """Scores written by ``to_dict`` (``layerfold analyze --json``); null pairs become NaN again."""
        def rows(key):
            return [[math.nan if v is None else float(v) for v in row] for row in d[key]]

        known = {"num_layers", "tokens", "samples", "block_influence", "cosine", "angular"}
        return cls(int(d["num_layers"]), rows("cosine"), rows("angular"), int(d.get("tokens", 0)),
                   int(d.get("samples", 0)), {k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        """JSON-ready: undefined pairs (NaN) become null."""

        def clean(rows):
            return [[None if math.isnan(v) else v for v in row] for row in rows]

        return {
            "num_layers": self.num_layers,
            "tokens": self.tokens,
            "samples": self.samples,
            "block_influence": self.block_influence,
            "cosine": clean(self.cosine),
            "angular": clean(self.angular),
            **self.extra,
        }


class SimilarityObserver:
    """Accumulates pairwise cosine statistics during ``layer_pass``.

    Within a chunk it keeps each batch's unit-normalised states for all layers seen so far
    (float16 to halve memory); each new layer output is compared against all of them.
    """

    def __init__(self, num_layers: int, store_dtype: torch.dtype = torch.float16):
        L = num_layers
        self.L = L
        self.cos_sum = torch.zeros(L + 1, L + 1, dtype=torch.float64)
        self.ang_sum = torch.zeros(L + 1, L + 1, dtype=torch.float64)
        self.tokens = 0
        self.samples = 0
        self.store_dtype = store_dtype
        self._units: list[list[torch.Tensor]] = []

    def on_chunk_start(self, n_batches: int) -> None:
        self._units = [[] for _ in range(n_batches)]

    def on_chunk_end(self) -> None:
        self._units = []

    @staticmethod
    def _unit(h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        return h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def __call__(self, l: int, b: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        units = self._units[b]
        if l == 0:
            units.append(self._unit(h_in).to(self.store_dtype))
            self.tokens += h_in.shape[0] * h_in.shape[1]
            self.samples += h_in.shape[0]
        u_out = self._unit(h_out)
        for start, u in enumerate(units):  # u = unit(h[start]); pair (start, l+1)
            cos = (u.float() * u_out).sum(dim=-1)  # [batch, seq]
            n = l + 1 - start
            self.cos_sum[start, n] += cos.double().sum()
            last = cos[:, -1].clamp(-1.0, 1.0)
            self.ang_sum[start, n] += (torch.arccos(last) / math.pi).double().sum()
        units.append(u_out.to(self.store_dtype))

    def scores(self) -> LayerScores:
        L = self.L
        cos = [[math.nan] * (L + 1) for _ in range(L + 1)]
        ang = [[math.nan] * (L + 1) for _ in range(L + 1)]
        for l in range(L + 1):
            for n in range(1, L + 1 - l):
                cos[l][n] = float(self.cos_sum[l, n] / max(self.tokens, 1))
                ang[l][n] = float(self.ang_sum[l, n] / max(self.samples, 1))
        return LayerScores(L, cos, ang, self.tokens, self.samples)
