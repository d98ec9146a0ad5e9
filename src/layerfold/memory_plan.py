"""The memory plan of ``layerfold compress``: what each stage needs, against the memory there is.

Before any weight is read, :func:`plan_memory` builds the model's skeleton from its config
(safetensors folders and GGUF files alike; no tensor is loaded), estimates for every stage the
bytes it needs with the whole model in memory and, where it can, streamed (one decoder layer
at a time, ``models/lazy.py``), and picks for each stage the way that fits:

    calibration text     self-written (whole model) | a file | the bundled corpus (no model)
    selection            the layer-by-layer pass (streamed) | gates, searches (whole model)
    repair               trained on cached pairs, one layer at a time | through the whole model
    healing, evaluation  whole model | skipped, with the command that runs them elsewhere
    saving               copied from the input's files (streamed) | from memory

The budget is ``--memory-limit`` or, by default, what the machine has free for this process:
``MemAvailable`` (``/proc/meminfo``) or the cgroup's limit less its usage, whichever is
smaller, plus what the process already holds.

Two rules decide whether a stage that needs the whole model runs:

1. **It fits**: its estimate is within the budget.
2. **It finishes**: on a CPU, whole-model work is done by default only for models of at most
   ``CPU_WHOLE_MODEL_PARAMS`` = 500 M parameters. The embedded SmolLM2-135M writes its 32 x 256
   calibration tokens in 84 s on this project's 2-core machine; sampling costs about two FLOPs
   per parameter and token, so 500 M parameters take about 5 minutes for the same text, and the
   1.17 B-parameter random Llama of ``benchmarks/perf.md`` took 11.5 minutes for 8 x 128 tokens
   (1/8 of the default) on shared cores, about 1.5 hours for the default. Its evaluation (a
   second copy of the weights for the speed runs) and healing (LoRA through every layer) grow
   the same way.

A stage the user did not ask for by name (its options are the defaults) that breaks a rule is
replaced (self-written text -> the bundled corpus, ``data/corpus``) or skipped with a one-line
reason and the command that would run it. A stage asked for explicitly (an option given: the
values differ from the defaults, as the recorded command line shows them) that does not fit
is refused at once, with the numbers and the command that would work; one that fits but breaks
rule 2 runs, with a note. A streamed plan also keeps the calibration pass's activations to
about one layer's bytes (``--max-memory``, unless given): on a CPU re-reading a layer from the
page cache for each chunk of batches costs a fraction of a second against tens of seconds of
arithmetic per batch, so the peak stays near one layer at almost no cost in time.

The estimates are meant to choose between plans, not to account for every byte; ``plan.peak``
is set beside a measured peak in ``benchmarks/perf.md``. The chosen plan is printed before
work starts and recorded in ``layerfold.json`` (``memory_plan``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .data.calibration import BUNDLED
from .errors import LayerfoldError
from .schema import format_size, parse_size

CPU_WHOLE_MODEL_PARAMS = 500_000_000


@dataclass
class MemoryOptions:
    """The memory budget the plan fits every stage in."""

    limit: int | None = field(default=None, metadata={
        "help": "memory this run may use, e.g. 8GiB (default: what the machine has free: MemAvailable or the "
                "cgroup's limit, whichever is smaller); stages that need more are streamed, replaced or skipped, "
                "and what was asked for by name but cannot fit is refused before any work",
        "flag": "--memory-limit", "parse": parse_size, "show": format_size,
        "allowed": "a memory size like 8GiB or 512MiB"})


# -- what there is ------------------------------------------------------------------------


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def rss_bytes(pid: int | str = "self") -> int:
    """A process's resident set in bytes (Linux /proc); 0 where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def available_memory() -> tuple[int | None, str]:
    """(bytes this process may grow to, where the figure comes from); None where unknown."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except OSError:
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and cap < 2**60:
            found.append((max(0, cap - (used or 0)), "the cgroup's memory limit"))
    if not found:
        return None, "unknown"
    free, where = min(found)
    return free + rss_bytes(), where


# -- what the model is --------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """What the estimates read from the model's skeleton (its config; no weight)."""

    params: int
    weight_bytes: int
    layers: int
    layer_bytes: int  # the largest decoder layer
    resident_bytes: int  # what a streamed model keeps in memory: the tensors outside the layers but an untied head
    hidden: int
    kv: int
    intermediate: int
    heads: int
    vocab: int
    dtype_bytes: int
    tied: bool

    @classmethod
    def of(cls, loaded) -> "Sizes":
        from .healing import is_tied
        from .models.surgery import decoder_layers
        from .train.memory import Shapes

        s = Shapes.of(loaded.model, loaded.arch)
        model = loaded.model
        b = next(model.parameters()).element_size()
        layer_total = sum(p.numel() * p.element_size() for layer in decoder_layers(model, loaded.arch)
                          for p in layer.parameters())
        tied = is_tied(model)
        head = model.get_output_embeddings()
        head_bytes = 0 if tied or head is None else head.weight.numel() * head.weight.element_size()
        c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return cls(s.params, s.weight_bytes, s.layers, s.layer_bytes, s.weight_bytes - layer_total - head_bytes,
                   s.hidden, s.kv, s.intermediate, c.num_attention_heads, s.vocab, b, tied)

    def layer_work(self, rows: int, seq: int) -> int:
        """A decoder layer's temporaries on a batch: the MLP's products and the attention scores."""
        return rows * seq * (3 * self.intermediate + 4 * self.hidden) * self.dtype_bytes + rows * self.heads * seq * seq * 4

    def kept_for_backward(self, rows: int, seq: int) -> int:
        """What one layer keeps for backward (train/memory.py's 9 H + 3 KV + 4 I per token)."""
        from .train.memory import ACT_HIDDEN, ACT_KV, ACT_MLP

        return rows * seq * (ACT_HIDDEN * self.hidden + ACT_KV * self.kv + ACT_MLP * self.intermediate) * self.dtype_bytes

    def logits(self, tokens: int, copies: int = 3) -> int:
        return tokens * self.vocab * 4 * copies


# -- the plan -----------------------------------------------------------------------------


@dataclass
class Stage:
    """One stage of the run and how it runs: ``how`` is 'in memory', 'streamed', 'no model'
    or 'skipped'; ``need`` the bytes of that way at its peak."""

    name: str
    how: str
    need: int = 0
    in_memory: int | None = None  # the estimate with the whole model in memory (None: never needed)
    note: str = ""

    def to_dict(self) -> dict:
        return {"stage": self.name, "how": self.how, "need_bytes": self.need, "in_memory_bytes": self.in_memory,
                "note": self.note}


@dataclass
class MemoryPlan:
    budget: int | None
    budget_source: str
    sizes: Sizes
    streamed: bool  # the model never wholly in memory
    reason: str
    stages: list[Stage]
    options: object = field(repr=False, default=None)  # the CompressOptions the run uses
    changes: list[str] = field(default_factory=list)  # the options the plan set, as flags

    @property
    def peak(self) -> int:
        return max((s.need for s in self.stages), default=0)

    def to_dict(self) -> dict:
        return {"streamed": self.streamed, "reason": self.reason, "budget_bytes": self.budget,
                "budget_source": self.budget_source, "weight_bytes": self.sizes.weight_bytes,
                "parameters": self.sizes.params, "peak_estimate_bytes": self.peak, "options_set": self.changes,
                "stages": [s.to_dict() for s in self.stages]}

    def describe(self) -> str:
        s = self.sizes
        budget = f"{_gib(self.budget)} ({self.budget_source})" if self.budget is not None else "unknown"
        count = f"{s.params / 1e6:,.0f} M" if s.params >= 10**7 else f"{s.params:,}"
        head = (f"memory plan  {'streamed' if self.streamed else 'in memory'}: {count} parameters, "
                f"{_gib(s.weight_bytes)} of weights; peak ~{_gib(self.peak)} of a {budget} budget")
        if not self.changes:  # the options as given: one line (layerfold.json holds every stage)
            return head
        lines = [head]
        if self.reason:
            lines.append(f"  why        {self.reason}")
        for st in self.stages:
            need = f"~{_gib(st.need)}" if st.how != "skipped" else "-"
            lines.append(f"  {st.name:<18} {st.how:<10} {need:>10}" + (f"  {st.note}" if st.note else ""))
        if self.changes:
            lines.append(f"  options    {' '.join(self.changes)} (recorded in recipe.yaml)")
        return "\n".join(lines)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


def _given(opts, default, group: tuple[str, ...], skip: tuple[str, ...] = ()) -> list[str]:
    """The options of ``group`` that differ from the command's defaults, as flags."""
    from . import schema

    out = []
    for o in schema.options(type(opts)):
        if o.path[: len(group)] != group or o.name in skip or o.name == "progress":
            continue
        value = schema.get(opts, o.path)
        if value != schema.get(default, o.path):
            out.append(o.flag or o.name)
    return out


def plan_memory(opts, loaded=None) -> MemoryPlan:
    """The plan of ``opts`` (CompressOptions): stages, their estimates, and the options the run
    uses (``plan.options``). Raises a one-line LayerfoldError when something asked for cannot fit."""
    from .models.loading import model_skeleton, resolve_device
    from .train.memory import RUNTIME_BYTES

    # the defaults of the options' own class (recipe imports this module: no import back)
    default = type(opts)()
    m = opts.model
    skeleton = loaded if loaded is not None else model_skeleton(m.model, dtype=m.dtype, device=m.device,
                                                                  trust_remote_code=m.trust_remote_code)
    # no --method: the default for this architecture, named in the options the run uses and records
    if opts.selection.method is None:
        opts = replace(opts, selection=opts.selection.with_default_method(skeleton.arch))
    method, selection, repair = opts.selection.parts()
    s = Sizes.of(skeleton)
    device = loaded.device if loaded is not None else resolve_device(m.device)
    if opts.memory.limit is not None:
        budget, source = opts.memory.limit, "--memory-limit"
    else:
        budget, source = available_memory()
    large = device.type == "cpu" and s.params > CPU_WHOLE_MODEL_PARAMS
    p = _Planner(opts, default, s, budget, source, large, RUNTIME_BYTES)
    p.plan_text(method, selection, repair)
    p.plan_selection(method, selection)
    p.plan_repair(repair)
    p.plan_healing(method, skeleton)
    p.plan_evaluation()
    p.finish()
    return MemoryPlan(budget, source, s, p.streamed, p.reason(), p.stages, p.opts, p.changes)


class _Planner:
    """The stages of one plan, decided in pipeline order (the text first: every later stage reads it)."""

    def __init__(self, opts, default, sizes: Sizes, budget: int | None, source: str, large: bool, runtime: int):
        self.original, self.opts, self.default, self.s = opts, opts, default, sizes
        self.budget, self.source, self.large, self.runtime = budget, source, large, runtime
        self.stages: list[Stage] = []
        self.changes: list[str] = []
        self.refusals: list[str] = []
        self.fixes: dict = {}  # option path -> value: what makes the refused request fit
        s = sizes
        self.whole = runtime + s.weight_bytes
        self.base = runtime + s.resident_bytes + 2 * s.layer_bytes  # streamed: one layer read while the last goes
        self.misfit = False  # the whole model does not fit at all

    # -- the rules ---------------------------------------------------------------------

    def fits(self, need: int) -> bool:
        return self.budget is None or need <= self.budget

    def whole_model_ok(self, need: int) -> bool:
        """Rules 1 and 2 (the module docstring) for a stage that needs the whole model."""
        if not self.fits(need):
            self.misfit = True
            return False
        return not self.large

    def why_not(self, need: int) -> str:
        if not self.fits(need):
            return f"needs the whole model, ~{_gib(need)}: over the budget"
        return "needs the whole model: too slow on a CPU at this size"

    def set(self, changes: dict, flag: str) -> None:
        from . import schema

        self.opts = schema.with_values(self.opts, changes)
        self.changes.append(flag)

    def refuse(self, what: str, need: int, fixes: dict) -> None:
        self.refusals.append(f"{what} needs ~{_gib(need)} with the whole model in memory, more than the "
                             f"{_gib(self.budget)} budget ({self.source})")
        self.fixes.update(fixes)

    def add(self, name: str, how: str, need: int, in_memory: int | None = None, note: str = "") -> None:
        self.stages.append(Stage(name, how, need, in_memory, note))

    # -- the stages --------------------------------------------------------------------

    def self_write_need(self, samples: int, seq: int) -> int:
        from .data.calibration import SELF_BATCH

        s = self.s
        rows = min(samples, SELF_BATCH)
        kv = rows * (seq + 16) * s.layers * 2 * s.kv * s.dtype_bytes  # the KV cache at the end of a batch
        return self.whole + kv + s.logits(rows) + s.layer_work(rows, 16)

    def text(self, path: tuple[str, ...], spec, samples: int, what: str, flag: str) -> None:
        """One text a stage reads: self-written (the whole model), or the bundled corpus instead."""
        if spec.source != "self":
            self.add(what, "no model", 0, note=f"from {spec.source}")
            return
        need = self.self_write_need(samples, spec.seq_len)
        if self.whole_model_ok(need):
            self.add(what, "in memory", need, need, "self-written")
            return
        self.set({path + ("source",): BUNDLED}, f"{flag} {BUNDLED}")
        self.add(what, "no model", 0, need, f"the bundled corpus, not self-written text ({self.why_not(need)}; "
                                            f"other text: {flag} FILE)")

    def plan_text(self, method, selection, repair) -> None:
        o = self.opts
        reads = (selection.needs != "nothing" and not o.selection.scores) or repair.needs_text \
            or (method.cure and o.foldgpt.cure.steps > 0)
        if reads:
            self.text(("data",), o.data, o.data.samples, "calibration text", "--calib")
        if repair.name == "replacement" and o.repair.spec.trainable and o.repair.data.source not in ("calib",):
            import math

            rows = math.ceil(o.repair.train_tokens / o.repair.data.seq_len) + o.repair.val_rows
            self.text(("repair", "data"), o.repair.data, rows, "repair text", "--train-data")

    def pass_need(self, rows: int, seq: int) -> tuple[int, int]:
        """(bytes of the streamed layer pass at the current --max-memory, bytes of one batch's activations)."""
        from .importance import activation_bytes_per_batch

        s, o = self.s, self.opts
        per_batch = activation_bytes_per_batch(s.hidden, s.layers, rows, seq)
        n_batches = -(-o.data.samples // max(1, o.layer_pass.batch_size))
        chunk = min(n_batches, max(1, o.layer_pass.max_memory // max(per_batch, 1)))
        return self.base + chunk * per_batch + s.layer_work(rows, seq), per_batch

    def plan_selection(self, method, selection) -> None:
        o, s = self.opts, self.s
        rows, seq = min(o.layer_pass.batch_size, o.data.samples), o.data.seq_len
        if selection.needs == "scores" and not o.selection.scores:
            need, per_batch = self.pass_need(rows, seq)
            given = o.layer_pass.max_memory != self.default.layer_pass.max_memory
            if not given and (self.large or not self.fits(need)):
                # a streamed plan: activations of about one layer's bytes (or whatever is left)
                cap = s.layer_bytes
                if self.budget is not None:
                    cap = min(cap, max(per_batch, self.budget - self.base - s.layer_work(rows, seq)))
                cap = max(cap // 2**20 * 2**20, 2**20)  # whole MiB: the recorded --max-memory reads well
                if cap < o.layer_pass.max_memory:
                    self.set({("layer_pass", "max_memory"): cap}, f"--max-memory {format_size(cap)}")
                    need, _ = self.pass_need(rows, seq)
            self.add(f"selection ({selection.name})", "streamed", need, note="one decoder layer at a time")
            return
        if selection.needs in ("gates", "search") or method.auto or method.share:
            train = selection.needs == "gates"
            need = self.whole + s.logits(rows * seq) + (
                s.layers * s.kept_for_backward(rows, seq) if train else s.layer_work(rows, seq))
            if method.auto:
                need += s.weight_bytes  # a candidate beside the original
            what = f"--method {o.selection.parts()[0].name}" + (f" --select {o.selection.select}" if o.selection.select else "")
            if not self.fits(need):
                self.misfit = True
                self.refuse(f"the selection ({what})", need, {("selection", "method"): "bi", ("selection", "select"): None,
                                                              ("selection", "repair"): None})
            note = "the whole model" + (" (slow on a CPU at this size)" if self.large else "")
            self.add(f"selection ({selection.name})", "in memory", need, need, note)

    def plan_repair(self, repair) -> None:
        o, s = self.opts, self.s
        if repair.name == "none":
            return
        rows, seq = min(o.layer_pass.batch_size, o.data.samples), o.data.seq_len
        pass_need, _ = self.pass_need(rows, seq)
        if repair.name == "replacement" and o.repair.spec.trainable:
            from .methods.streamline import PAIR_LOSSES, STREAMED_INIT, STREAMED_LOSS

            mb, tseq = o.repair.batch_size, o.repair.data.seq_len
            streamed = self.base + 3 * s.layer_bytes + s.kept_for_backward(mb, tseq) + s.layer_work(mb, tseq)
            streamed = max(pass_need, streamed)
            if o.repair.loss in PAIR_LOSSES:
                self.add("repair", "streamed", streamed, note=f"pairs on disk, one layer trained ({o.repair.replacement})")
                return
            need = self.whole + 3 * s.layer_bytes + s.layers * s.kept_for_backward(mb, tseq) + s.logits(mb * tseq)
            explicit = [f for f in _given(o, self.default, ("repair",)) if f in ("--loss", "--train-init")]
            if not explicit and not self.whole_model_ok(need):
                # the default in-place loss, on a model it cannot train whole: the best pair loss instead
                self.set({("repair", "loss"): STREAMED_LOSS, ("repair", "init"): STREAMED_INIT},
                         f"--loss {STREAMED_LOSS} --train-init {STREAMED_INIT}")
                self.add("repair", "streamed", streamed, need,
                         f"pairs on disk, one layer trained ({o.repair.replacement}); not --loss {o.repair.loss} "
                         f"({self.why_not(need)})")
                return
            if not self.fits(need):
                self.misfit = True
                self.refuse(f"the repair (--loss {o.repair.loss})", need,
                            {("repair", "loss"): STREAMED_LOSS, ("repair", "init"): STREAMED_INIT})
            self.add("repair", "in memory", need, need, f"--loss {o.repair.loss} trains through the whole model")
            return
        self.add("repair", "streamed", pass_need + 2 * s.hidden * s.hidden * 8, note=repair.name)

    def plan_healing(self, method, skeleton) -> None:
        from .train.memory import Shapes, healing_needs

        o, s = self.opts, self.s
        if method.cure:
            if o.foldgpt.cure.steps <= 0:
                return
            need = self.whole + 2 * s.weight_bytes + s.layers * s.kept_for_backward(o.foldgpt.cure.batch_size, o.data.seq_len)
            if not self.fits(need):
                self.misfit = True
                self.refuse("FoldGPT's cure", need, {("foldgpt", "cure", "steps"): 0})
            self.add("cure", "in memory", need, need, "the whole model and a frozen copy as teacher")
            return
        if not o.healing.enabled:
            return
        shapes = Shapes.of(skeleton.model, skeleton.arch)
        dtype = next(skeleton.model.parameters()).dtype
        seq = o.data.seq_len if o.healing.data.source == "calib" else o.healing.data.seq_len
        est = healing_needs(shapes, shapes if o.healing.needs_teacher else None, o.healing, seq_len=seq, dtype=dtype,
                            tied=s.tied)
        need = est["plans"][1 if o.healing.checkpointing else 0]["device_bytes"]
        if o.healing.needs_teacher and not o.healing.teacher_cache:
            need += s.weight_bytes  # a frozen copy of the original as the live teacher
        if o.evaluation.enabled and o.evaluation.speed_rounds:
            need += s.weight_bytes  # the original's copy waits for the speed runs
        explicit = _given(o, self.default, ("healing",))
        if self.whole_model_ok(need):
            self.add("healing", "in memory", need, need, f"{o.healing.train}, {o.healing.tokens:,} tokens")
            return
        if explicit and not self.fits(need):
            self.refuse(f"healing ({' '.join(explicit)})", need, {("healing", "tokens"): 0})
            self.add("healing", "in memory", need, need)
            return
        if explicit:
            self.add("healing", "in memory", need, need, f"asked for ({' '.join(explicit)}); slow on a CPU at this size")
            return
        self.set({("healing", "tokens"): 0}, "--no-heal")
        model = self.original.model.model or "embedded"
        self.add("healing", "skipped", 0, need,
                 f"{self.why_not(need)}; to heal elsewhere: layerfold heal {self._out()} --teacher {model} "
                 f"--heal-tokens {o.healing.tokens} (--dry-run first shows what each way needs, offload included)")

    def plan_evaluation(self) -> None:
        from .eval.evaluate import DEFAULT_PPL_WINDOW

        o, s = self.opts, self.s
        if not o.evaluation.enabled:
            return
        e = o.evaluation
        tokens = max(min(e.batch_size, max(1, e.heldout_rows)) * o.data.seq_len, DEFAULT_PPL_WINDOW)
        need = self.whole + (s.weight_bytes if e.speed_rounds else 0) + s.logits(tokens) + s.layer_work(
            e.batch_size, o.data.seq_len)
        explicit = _given(o, self.default, ("evaluation",), skip=("enabled", "report"))
        if self.whole_model_ok(need):
            self.add("evaluation", "in memory", need, need,
                     "before and after" + (", with a copy of the original for the speed runs" if e.speed_rounds else ""))
            return
        if explicit and not self.fits(need):
            self.refuse(f"the evaluation ({' '.join(explicit)})", need, {("evaluation", "enabled"): False})
            self.add("evaluation", "in memory", need, need)
            return
        if explicit:
            self.add("evaluation", "in memory", need, need, f"asked for ({' '.join(explicit)}); slow on a CPU at this size")
            return
        self.set({("evaluation", "enabled"): False}, "--no-eval")
        model = self.original.model.model or "embedded"
        self.add("evaluation", "skipped", 0, need,
                 f"{self.why_not(need)}; to evaluate elsewhere: layerfold eval {self._out()} --reference {model}")

    def _out(self) -> str:
        return self.original.output.path or "OUT"

    @property
    def streamed(self) -> bool:
        return not any(st.how == "in memory" for st in self.stages)

    def finish(self) -> None:
        self.add("saving", "streamed" if self.streamed else "in memory", self.base if self.streamed else self.whole,
                 note="tensors copied from the input's files" if self.streamed else "")
        if self.refusals:
            self._raise(self.refusals[0])
        peak = max(st.need for st in self.stages)
        if not self.fits(peak):
            worst = max(self.stages, key=lambda st: st.need)
            raise LayerfoldError(
                f"memory plan: even streamed, {worst.name} needs ~{_gib(worst.need)} (runtime {_gib(self.runtime)}, "
                f"tensors outside the layers {_gib(self.s.resident_bytes)}, two layers {_gib(2 * self.s.layer_bytes)}, "
                f"activations), more than the {_gib(self.budget)} budget ({self.source}); lower --batch-size or --seq-len, "
                "or raise --memory-limit")

    def _raise(self, first: str) -> None:
        from . import schema

        fixed = schema.with_values(self.original, self.fixes)
        command = fixed.command()
        raise LayerfoldError(f"memory plan: {first}; what fits: {command}")

    def reason(self) -> str:
        if not self.streamed:
            return ""
        if self.misfit and not self.large:
            return f"the whole model needs more than the {_gib(self.budget)} budget"
        return (f"on a CPU, models over {CPU_WHOLE_MODEL_PARAMS / 1e6:.0f} M parameters ({self.s.params / 1e6:,.0f} M "
                "here) run whole only when asked: self-written text, evaluation and healing would take hours")
