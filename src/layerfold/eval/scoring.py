"""Log-likelihood of continuations, computing each shared prefix once.

A multiple-choice example asks for log p(choice_j | context) for every choice j. The naive
scorer runs one sequence per choice, so the context (often most of the tokens) runs through
the model once per choice. Here the tokens the requests of one example have in common (their
longest common prefix) run once; the model's KV cache of that prefix is then copied to one
row per request, and only the remaining tokens of each request run. Logits are computed only
at the positions that are scored: the base model returns hidden states, and the output head
is applied to the rows that predict continuation tokens (the head is the largest single
matrix of a small model, and most positions are context).

A choice of one token (BoolQ's "yes"/"no") needs no second pass at all: it is predicted by
the last prefix position.

Tokenization follows lm-evaluation-harness: trailing spaces of the context move to the
continuation, and the continuation's tokens are those the whole string has after the
context's tokens. Padding never changes a result: prefixes are left-padded and suffixes
right-padded, with explicit position ids and attention masks, so each row sees exactly its
own tokens at the positions it would have alone (up to float rounding).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..models.compat import cache_kwargs, returned_cache

LOGIT_CHUNK = 512  # rows of hidden states turned into vocabulary logits at once


@dataclass
class Encoded:
    """One request in tokens: ``context`` then ``continuation`` (the scored tokens)."""

    context: list[int]
    continuation: list[int]

    @property
    def inputs(self) -> list[int]:
        """What the model reads: every token but the last (which is only predicted)."""
        return (self.context + self.continuation)[:-1]

    @property
    def first_scored(self) -> int:
        """Input position whose logits predict the first continuation token."""
        return len(self.context) - 1


@dataclass
class Scored:
    loglik: float
    greedy: bool  # every continuation token is the argmax of its prediction
    tokens: int  # continuation tokens


@dataclass
class ScoreStats:
    """Token accounting: what ran through the model versus what the requests contain."""

    tokens_run: int = 0  # real (non-padding) tokens run through the model
    tokens_padded: int = 0  # including padding
    tokens_distinct: int = 0  # distinct context tokens per example + all continuation tokens
    tokens_naive: int = 0  # what one sequence per request would run
    forward_passes: int = 0
    seconds: float = 0.0

    def add(self, other: ScoreStats) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


def encode_pair(tokenizer, context: str, continuation: str, *, add_bos: bool = False) -> Encoded:
    """Tokenize as lm-evaluation-harness does (``_encode_pair``)."""

    def enc(s: str) -> list[int]:
        return list(tokenizer.encode(s, add_special_tokens=False))

    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    prefix = _prefix_token(tokenizer)
    if not context:
        return Encoded([prefix], enc(continuation))
    whole = enc(context + continuation)
    ctx = enc(context)
    cont = whole[len(ctx):]
    if not cont:  # the tokenizer merged the whole continuation into the context's last token
        cont = enc(continuation)
    if add_bos:
        ctx = [prefix] + ctx
    return Encoded(ctx, cont)


def _prefix_token(tokenizer) -> int:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def truncate(e: Encoded, max_len: int) -> Encoded:
    """Drop context tokens from the left so that the inputs fit ``max_len`` positions."""
    over = len(e.context) + len(e.continuation) - 1 - max_len
    if over <= 0:
        return e
    if over >= len(e.context):
        raise ValueError(f"a continuation of {len(e.continuation)} tokens does not fit {max_len} positions")
    return Encoded(e.context[over:], e.continuation)


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


@dataclass
class _Group:
    """Requests sharing one prefix that runs once."""

    requests: list[Encoded]
    prefix: list[int]
    ids: list[int] = field(default_factory=list)  # positions of the requests in the caller's list

    def suffix(self, j: int) -> list[int]:
        return self.requests[j].inputs[len(self.prefix):]

    @property
    def size(self) -> int:
        return len(self.prefix) + sum(len(self.suffix(j)) for j in range(len(self.requests)))


def make_groups(examples: Sequence[Sequence[Encoded]]) -> list[_Group]:
    """One group per example, or one per request when its requests share no first token."""
    groups: list[_Group] = []
    n = 0
    for reqs in examples:
        inputs = [r.inputs for r in reqs]
        p = common_prefix_length(inputs)
        if p == 0:
            for r in reqs:
                groups.append(_Group([r], r.inputs, [n]))
                n += 1
        else:
            groups.append(_Group(list(reqs), inputs[0][:p], list(range(n, n + len(reqs)))))
            n += len(reqs)
    return groups


def distinct_tokens(reqs: Sequence[Encoded]) -> int:
    """Tokens an example really contains: each distinct context once, every continuation."""
    contexts = {tuple(r.context) for r in reqs}
    return sum(len(c) for c in contexts) + sum(len(r.continuation) for r in reqs)


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own output head on selected hidden states (final norm already applied)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2/3 squash their logits; the full forward does the same
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def _base(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


def _pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _prefix_token(tokenizer))


@torch.no_grad()
def _score_batch(model, groups: list[_Group], pad_id: int, stats: ScoreStats) -> list[list[Scored]]:
    device = next(model.parameters()).device
    base = _base(model)
    B = len(groups)
    P = max(len(g.prefix) for g in groups)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.long)
    pos = torch.zeros((B, P), dtype=torch.long)
    for b, g in enumerate(groups):
        p = len(g.prefix)
        ids[b, P - p:] = torch.tensor(g.prefix)
        mask[b, P - p:] = 1
        pos[b, P - p:] = torch.arange(p)
    need_suffix = [(b, j) for b, g in enumerate(groups) for j in range(len(g.requests)) if g.suffix(j)]
    out = base(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
               use_cache=bool(need_suffix))
    h_prefix = out.last_hidden_state
    stats.forward_passes += 1
    stats.tokens_run += int(mask.sum())
    stats.tokens_padded += B * P

    # the suffixes run against copies of their prefix's cache, in chunks of similar length
    # (choices differ in length far more than prefixes do: one chunk would be mostly padding)
    suffix_hidden: dict[tuple[int, int], torch.Tensor] = {}
    if need_suffix:
        cache = returned_cache(out)
        mask = mask.to(device)
        chunks = suffix_chunks(need_suffix, lambda bj: len(groups[bj[0]].suffix(bj[1])))
        for c, chunk in enumerate(chunks):
            S = len(groups[chunk[0][0]].suffix(chunk[0][1]))
            R = len(chunk)
            sids = torch.full((R, S), pad_id, dtype=torch.long)
            smask = torch.zeros((R, S), dtype=torch.long)
            spos = torch.zeros((R, S), dtype=torch.long)
            for r, (b, j) in enumerate(chunk):
                suf = groups[b].suffix(j)
                p = len(groups[b].prefix)
                sids[r, : len(suf)] = torch.tensor(suf)
                smask[r, : len(suf)] = 1
                spos[r, : len(suf)] = torch.arange(p, p + len(suf))
                spos[r, len(suf):] = p + len(suf) - 1
            rows = torch.tensor([b for b, _ in chunk], device=device)
            # selecting rows rewrites the cache in place: every chunk but the last gets a copy
            chunk_cache = cache if c == len(chunks) - 1 else copy.deepcopy(cache)
            chunk_cache.batch_select_indices(rows)  # one copy of each prefix's cache per request
            full_mask = torch.cat([mask[rows], smask.to(device)], dim=1)
            h = base(input_ids=sids.to(device), attention_mask=full_mask, position_ids=spos.to(device),
                     use_cache=True, **cache_kwargs(base, chunk_cache)).last_hidden_state
            for r, bj in enumerate(chunk):
                suffix_hidden[bj] = h[r]
            stats.forward_passes += 1
            stats.tokens_run += int(smask.sum())
            stats.tokens_padded += R * S
            del chunk_cache
        del cache

    # gather the hidden state of every scored position, then one output head over all of them
    picks: list[torch.Tensor] = []
    targets: list[int] = []
    spans: list[list[tuple[int, int]]] = []
    n = 0
    for b, g in enumerate(groups):
        p = len(g.prefix)
        spans.append([])
        for j, r in enumerate(g.requests):
            positions = range(r.first_scored, r.first_scored + len(r.continuation))
            in_prefix = [i for i in positions if i < p]
            in_suffix = [i - p for i in positions if i >= p]
            if in_prefix:
                picks.append(h_prefix[b, [P - p + i for i in in_prefix]])
            if in_suffix:
                picks.append(suffix_hidden[(b, j)][in_suffix])
            targets += r.continuation
            spans[-1].append((n, n + len(r.continuation)))
            n += len(r.continuation)
    hidden = torch.cat(picks, dim=0)
    target = torch.tensor(targets, device=device)
    logp = torch.empty(len(targets), device=device)
    hit = torch.empty(len(targets), dtype=torch.bool, device=device)
    for s in range(0, len(targets), LOGIT_CHUNK):
        lg = output_logits(model, hidden[s: s + LOGIT_CHUNK])
        t = target[s: s + LOGIT_CHUNK]
        logp[s: s + LOGIT_CHUNK] = F.log_softmax(lg, dim=-1).gather(1, t[:, None])[:, 0]
        hit[s: s + LOGIT_CHUNK] = lg.argmax(dim=-1) == t
    logp, hit = logp.cpu(), hit.cpu()
    return [[Scored(float(logp[a:z].sum()), bool(hit[a:z].all()), z - a) for a, z in sp] for sp in spans]


def suffix_chunks(items: list, length: Callable, waste: float = 0.25) -> list[list]:
    """Split ``items`` into runs of similar ``length``, longest first: a chunk is padded to its
    first (longest) item, and a new chunk starts when padding would exceed ``waste`` of it."""
    ordered = sorted(items, key=length, reverse=True)
    chunks: list[list] = []
    for it in ordered:
        if chunks:
            chunk = chunks[-1]
            longest = length(chunk[0])
            real = sum(length(x) for x in chunk) + length(it)
            if longest * (len(chunk) + 1) <= (1 + waste) * real:
                chunk.append(it)
                continue
        chunks.append([it])
    return chunks


def score_examples(
    model,
    tokenizer,
    examples: Sequence[Sequence[tuple[str, str]]],
    *,
    batch_size: int = 8,
    add_bos: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[list[Scored]], ScoreStats]:
    """Score every (context, continuation) request of every example.

    ``batch_size`` counts examples (prefixes) per forward pass; results do not depend on it.
    Returns one list of ``Scored`` per example, in the input order, and token accounting.
    """
    import time

    t0 = time.perf_counter()
    max_len = int(getattr(model.config, "max_position_embeddings", 0) or 10**9)
    encoded = [[truncate(encode_pair(tokenizer, c, k, add_bos=add_bos), max_len) for c, k in ex] for ex in examples]
    stats = ScoreStats()
    for reqs in encoded:
        stats.tokens_distinct += distinct_tokens(reqs)
        stats.tokens_naive += sum(len(r.inputs) for r in reqs)
    groups = make_groups(encoded)
    # longest prefix first: the first batch shows at once whether memory suffices, and
    # prefixes of similar length batched together waste little padding (the suffixes are
    # chunked by their own length in _score_batch)
    order = sorted(range(len(groups)), key=lambda i: (-len(groups[i].prefix), -groups[i].size))
    flat: list[Scored | None] = [None] * sum(len(ex) for ex in encoded)
    pad_id = _pad_id(tokenizer)
    for s in range(0, len(order), batch_size):
        batch = [groups[i] for i in order[s: s + batch_size]]
        for g, scored in zip(batch, _score_batch(model, batch, pad_id, stats)):
            for k, sc in zip(g.ids, scored):
                flat[k] = sc
        if progress:
            progress(len(batch))
    results: list[list[Scored]] = []
    k = 0
    for ex in encoded:
        results.append(flat[k: k + len(ex)])  # type: ignore[arg-type]
        k += len(ex)
    stats.seconds = time.perf_counter() - t0
    return results, stats


@torch.no_grad()
def score_examples_naive(model, tokenizer, examples, *, add_bos: bool = False) -> tuple[list[list[Scored]], ScoreStats]:
    """Reference scorer: one full forward of the whole model per request, no padding.

    Slow on purpose; the tests and benchmarks compare the shared-prefix scorer against it.
    """
    import time

    t0 = time.perf_counter()
    device = next(model.parameters()).device
    max_len = int(getattr(model.config, "max_position_embeddings", 0) or 10**9)
    stats = ScoreStats()
    results = []
    for ex in examples:
        reqs = [truncate(encode_pair(tokenizer, c, k, add_bos=add_bos), max_len) for c, k in ex]
        stats.tokens_distinct += distinct_tokens(reqs)
        row = []
        for r in reqs:
            inputs = torch.tensor([r.inputs], device=device)
            logits = model(input_ids=inputs).logits[0].float()
            lp = F.log_softmax(logits, dim=-1)
            idx = torch.arange(r.first_scored, r.first_scored + len(r.continuation), device=device)
            t = torch.tensor(r.continuation, device=device)
            row.append(Scored(float(lp[idx, t].sum()), bool((logits[idx].argmax(-1) == t).all()),
                              len(r.continuation)))
            stats.tokens_run += len(r.inputs)
            stats.tokens_padded += len(r.inputs)
            stats.tokens_naive += len(r.inputs)
            stats.forward_passes += 1
        results.append(row)
    stats.seconds = time.perf_counter() - t0
    return results, stats
