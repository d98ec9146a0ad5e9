"""Healing: a short recovery training of a compressed model, with the original as teacher.

What trains (``HealOptions.train``):
- ``lora``: LoRA adapters (PEFT) on the chosen linear modules of every decoder layer,
  merged into the weights at the end, so the output is a standard model of the same shape;
- ``layers``: full fine-tuning of chosen decoder layers (default: the last three) and the
  final norm (the "Reassessing Layer Pruning" recipe);
- ``lora+layers``: both.

The output head. "Reassessing Layer Pruning" also trains lm_head, on Llama, whose head is
its own matrix. Many small models (SmolLM2, Qwen2-0.5B, Gemma) tie lm_head to the input
embeddings; training it then either changes the input embeddings as well (and needs the
gradient to travel back through every layer) or means untying it, which adds
vocab x hidden parameters (28M for SmolLM2-135M, more than a fifth of the pruned model)
and defeats the compression. So ``lm_head="auto"`` trains an untied head and freezes a
tied one (the final norm still trains); ``"train"`` trains it even when tied (the input
embeddings move with it), ``"untie"`` gives the model its own head first, ``"freeze"``
never trains it.

Losses: next-token cross-entropy (``ce``), KL to the teacher's logits (``kl``) and MSE
between the outputs of the student's last ``mse_layers`` decoder layers and of the teacher
layers they came from (``mse``; the layer map, ``train.tail_map``), mixed by their weights.

Data: the same sources as calibration. The default is text the *teacher* writes itself
(data-free), with a different seed from calibration, so healing does not reuse the exact
calibration text (reusing it would be harmless, but unseen text makes the healing loss an
honest signal). Files are checked against the evaluation task files and refused if they
are, or copy, one of them.
"""

from __future__ import annotations

import copy
import math
import re
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .data.calibration import CalibrationSpec, load_calibration
from .data.guard import check_not_eval_data
from .errors import LayerfoldError
from .models.loading import LoadedModel, input_device
from .nn.lora import add_lora, has_lora, merge_lora
from .train import (
    Checkpoints,
    HiddenMSE,
    LogitKL,
    NextTokenLoss,
    TrainConfig,
    TrainResult,
    build_teacher_cache,
    model_layers,
    steps_for_tokens,
    tail_map,
    train,
)
from .train.teacher import cache_bytes

TRAIN_MODES = ("lora", "layers", "lora+layers")
LM_HEAD_MODES = ("auto", "freeze", "train", "untie")
HEAL_SEED = 1  # calibration text uses seed 0: healing text is different text
CALIBRATION_TEXT = "calib"  # --heal-data calib: heal on the calibration text (compress only)


@dataclass
class HealOptions:
    """One healing recipe. ``tokens`` is the budget; 0 means no healing."""

    tokens: int = field(default=0, metadata={
        "help": "healing token budget; 0: no healing", "consts": {"--no-heal": (0, "no healing (the same as --heal-tokens 0)")}})
    data: CalibrationSpec = field(default_factory=lambda: CalibrationSpec(seed=HEAL_SEED), metadata={
        "help": "the healing text",
        "prefix": "heal-data-", "flags": {"source": "--heal-data", "seq_len": "--heal-seq-len"},
        "helps": {"source": "'self' (the original model writes the text), 'calib' (compress only: the calibration "
                            "text, already written and cached) or a .txt/.jsonl file; evaluation files are refused",
                  "seq_len": "tokens per healing sequence",
                  "seed": "seed of self-written healing text (calibration uses 0, so healing text differs)"},
        "exclude": ("samples",), "aliases": {"text_field": ("--text-field",)}})
    # samples in ``data`` is not an option: the token budget sets how many rows are read (one
    # pass), unless ``rows`` caps them (the rows are then repeated in further passes)
    rows: int = field(default=0, metadata={
        "help": "distinct healing sequences; fewer than the budget needs are repeated (0: one pass, no repeats)"})
    train: str = field(default="lora", metadata={
        "help": "lora: LoRA adapters merged at the end; layers: full fine-tune of --heal-layers; or both",
        "choices": TRAIN_MODES})
    layers: str = field(default="last:3", metadata={
        "help": "layers fully trained by 'layers' modes: last:K, all, none, or indices like 3,4,7"})
    lm_head: str = field(default="auto", metadata={
        "help": "auto: train lm_head if it is its own matrix, freeze it if tied to the embeddings; untie: give it "
                "its own matrix (+vocab x hidden parameters)", "choices": LM_HEAD_MODES})
    train_norm: bool = field(default=True, metadata={"help": "do not train the final norm", "flag": "--heal-no-norm"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank", "flag": "--lora-rank"})
    lora_alpha: float = field(default=32.0, metadata={
        "help": "LoRA scaling numerator (scale = alpha / rank)", "flag": "--lora-alpha"})
    lora_modules: str = field(default="all-linear", metadata={
        "help": "modules that get LoRA: all-linear or comma-separated names (q_proj,v_proj,...)",
        "flag": "--lora-modules"})
    ce: float = field(default=0.0, metadata={"help": "weight of the next-token loss"})
    kl: float = field(default=1.0, metadata={"help": "weight of the KL to the teacher's logits"})
    mse: float = field(default=0.0, metadata={
        "help": "weight of the (relative) MSE between the last layers' outputs of student and teacher"})
    mse_layers: int = field(default=3, metadata={"help": "tail layers aligned by --heal-mse"})
    temperature: float = field(default=1.0, metadata={"help": "distillation temperature"})
    teacher_cache: bool = field(default=True, metadata={
        "help": "run the teacher on every batch instead of caching its top-k logits on disk",
        "flag": "--no-teacher-cache"})
    topk: int = field(default=64, metadata={"help": "teacher logits kept per token in the cache"})
    # 0 and 0 (neither given): 8-row optimizer steps in micro-batches of one row, the same rows
    # and, up to rounding, the same steps as 8 x 1, with an eighth of the activations: the main
    # job's healing peaks at 2.9x its fp32 weights instead of 5.7x, at no more CPU time per token
    # on a CPU (benchmarks/perf.md). Either given: the other defaults as before (8 rows, 1 step).
    batch_size: int = field(default=0, metadata={
        "help": "sequences per micro-batch; 0: 1 with --grad-accum 8 when neither is given, else 8 (on a GPU "
                "with room, --heal-batch-size 8 --grad-accum 1 is faster: the same training)"})
    grad_accum: int = field(default=0, metadata={
        "help": "micro-batches per optimizer step; 0: 8 when --heal-batch-size is not given either, else 1",
        "flag": "--grad-accum"})
    lr: float | None = field(default=None, metadata={
        "help": "learning rate (default: 5e-4 for lora, benchmarks/healing.md; 1e-4 when whole layers train)"})
    warmup: float = field(default=0.05, metadata={"help": "fraction of the steps spent warming up linearly"})
    precision: str = field(default="fp32", metadata={
        "help": "bf16 autocast (fast on GPUs and recent CPUs) or fp32", "choices": ("fp32", "bf16")})
    checkpointing: bool = field(default=False, metadata={
        "help": "recompute layer activations in the backward pass: less memory, about a third more time, "
                "the same result"})
    logit_chunk: int = field(default=0, metadata={
        "help": "positions per chunk of output-head logits in the kl and ce losses (each chunk's gradient is "
                "taken in its forward pass, or recomputed in backward when the head trains, so the batch's "
                "full-vocabulary logits never exist at once; the same loss up to rounding); "
                "0: auto (16 MiB of fp32 logits per chunk); -1: the whole batch's logits at once"})
    seed: int = field(default=0, metadata={"help": "seed of batch order and LoRA init"})
    checkpoint_dir: str | None = field(default=None, metadata={
        "help": "folder for training checkpoints of every training stage (needed by --resume)",
        "flag": "--checkpoint-dir", "path": True})
    checkpoint_every: int = field(default=0, metadata={
        "help": "optimizer steps between checkpoints; 0: none (10 when --checkpoint-dir is given)",
        "flag": "--checkpoint-every"})
    resume: bool = field(default=False, metadata={
        "help": "continue a killed run from --checkpoint-dir (same settings give the same result)", "flag": "--resume"})
    log_file: str | None = field(default=None, metadata={
        "help": "JSON-lines training log (one record per step)", "flag": "--heal-log", "path": True})
    progress: bool = field(default=True, metadata={"schema": False})

    @property
    def micro_batch(self) -> int:
        """Rows per micro-batch, the default resolved (see ``batch_size``)."""
        if self.batch_size:
            return self.batch_size
        return 8 if self.grad_accum else 1

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step, the default resolved (see ``batch_size``)."""
        if self.grad_accum:
            return self.grad_accum
        return 1 if self.batch_size else 8

    @property
    def enabled(self) -> bool:
        return self.tokens > 0

    @property
    def needs_teacher(self) -> bool:
        return self.kl > 0 or self.mse > 0

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 5e-4 if self.train == "lora" else 1e-4

    def checkpoints(self, subfolder: str | None = None) -> Checkpoints:
        """Where a training stage of this run checkpoints (every 10 steps unless told otherwise)."""
        folder = self.checkpoint_dir
        if folder and subfolder:
            folder = str(Path(folder) / subfolder)
        return Checkpoints(folder, self.checkpoint_every or (10 if folder else 0), self.resume)

    def validate(self) -> None:
        if self.resume and not self.checkpoint_dir:
            raise LayerfoldError("--resume needs --checkpoint-dir")
        if self.tokens < 0:
            raise LayerfoldError(f"--heal-tokens must not be negative (got {self.tokens})")
        if self.train not in TRAIN_MODES:
            raise LayerfoldError(f"--heal-train must be one of {', '.join(TRAIN_MODES)} (got {self.train!r})")
        if self.lm_head not in LM_HEAD_MODES:
            raise LayerfoldError(f"--heal-lm-head must be one of {', '.join(LM_HEAD_MODES)} (got {self.lm_head!r})")
        if min(self.ce, self.kl, self.mse) < 0 or self.ce + self.kl + self.mse == 0:
            raise LayerfoldError("healing loss weights (--heal-ce, --heal-kl, --heal-mse) must be >= 0, one of them > 0")
        if self.temperature <= 0:
            raise LayerfoldError(f"--heal-temperature must be positive (got {self.temperature})")
        if self.rows < 0:
            raise LayerfoldError(f"--heal-rows must not be negative (got {self.rows})")
        if self.batch_size < 0 or self.grad_accum < 0:
            raise LayerfoldError(f"--heal-batch-size and --grad-accum must be at least 1, or 0 for the default "
                                 f"(got {self.batch_size} and {self.grad_accum})")
        if self.lora_rank < 1:
            raise LayerfoldError(f"--lora-rank must be at least 1 (got {self.lora_rank})")
        if self.logit_chunk < -1:
            raise LayerfoldError(f"--heal-logit-chunk must be a number of positions, 0 (auto) or -1 (off) (got {self.logit_chunk})")
        if not 0 <= self.warmup < 1:
            raise LayerfoldError(f"warmup fraction must be in [0, 1) (got {self.warmup})")
        if self.mse > 0 and self.mse_layers < 1:
            raise LayerfoldError("--heal-mse-layers must be at least 1 when --heal-mse is used")
        _parse_layers(self.layers, 10**6)  # syntax only
        self.data.validate()
        if self.data.source != CALIBRATION_TEXT:  # compress checks the calibration source itself
            check_not_eval_data(self.data.source)

    def recipe(self) -> dict:
        d = asdict(self)
        for k in ("checkpoint_dir", "checkpoint_every", "resume", "log_file", "progress", "checkpointing"):
            d.pop(k)
        d["lr"] = self.learning_rate()
        d["batch_size"], d["grad_accum"] = self.micro_batch, self.accumulation
        return d


@dataclass
class HealResult:
    train: TrainResult
    trainable: str  # what trained, in words
    trainable_parameters: int
    rows: int
    seq_len: int
    seconds: dict[str, float]
    teacher_cache_bytes: int | None = None
    lm_head: str = ""

    def summary(self) -> dict:
        h = self.train.history
        return {
            "tokens": self.train.tokens, "steps": self.train.steps, "rows": self.rows, "seq_len": self.seq_len,
            "trainable": self.trainable, "trainable_parameters": self.trainable_parameters,
            "lm_head": self.lm_head, "loss_first": h[0]["loss"] if h else None,
            "loss_last": h[-1]["loss"] if h else None, "seconds": self.seconds,
            "teacher_cache_bytes": self.teacher_cache_bytes,
        }


DEFAULT_HEAL_TOKENS = 65536  # `layerfold heal` without --heal-tokens


def heal_command_defaults() -> HealOptions:
    """`layerfold heal`: LoRA distilled from the original on text it writes itself."""
    return HealOptions(tokens=DEFAULT_HEAL_TOKENS)


def compress_defaults() -> HealOptions:
    """The main job's healing (`layerfold compress` with no healing flags): the recipe that
    did best in benchmarks/healing.md among those that finish in a few minutes on 2 CPU
    cores. It reuses the calibration text (already written and cached for the importance
    scores), so it costs no text generation."""
    # LoRA (rank 16, every linear layer, merged at the end) beat training the last three
    # layers at every budget measured there, per token and per second
    return HealOptions(tokens=main_job_heal_tokens(), train="lora",
                       data=CalibrationSpec(source=CALIBRATION_TEXT, seed=HEAL_SEED))


MAIN_JOB_HEAL_TOKENS = 32768
HEAL_TOKENS_ENV = "LAYERFOLD_HEAL_TOKENS"


def main_job_heal_tokens() -> int:
    """The main job's healing budget: 32,768 tokens, or ``$LAYERFOLD_HEAL_TOKENS`` (CI runs the
    README's own command line with a smaller budget; the recorded recipe holds what ran)."""
    import os

    text = os.environ.get(HEAL_TOKENS_ENV, "").strip()
    if not text:
        return MAIN_JOB_HEAL_TOKENS
    try:
        tokens = int(text.replace("_", ""))
    except ValueError:
        tokens = -1
    if tokens < 0:
        raise LayerfoldError(f"${HEAL_TOKENS_ENV} must be a number of tokens, 0 or more (got {text!r})")
    return tokens


def _parse_layers(text: str, n: int) -> list[int]:
    text = text.strip().lower()
    if text in ("", "none"):
        return []
    if text == "all":
        return list(range(n))
    m = re.fullmatch(r"last:(\d+)", text)
    if m:
        k = int(m.group(1))
        return list(range(max(0, n - k), n))
    try:
        idx = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LayerfoldError(f"--heal-layers must be 'last:K', 'all', 'none' or indices like 3,4,7 (got {text!r})") from None
    bad = [i for i in idx if not -n <= i < n]
    if bad:
        raise LayerfoldError(f"--heal-layers: no layers {bad} in a model with {n} layers")
    return sorted({i % n for i in idx})


def shares_weights(model: nn.Module, arch) -> bool:
    """Whether decoder layers share weight tensors (a FoldGPT model; lm_head tied to the
    embeddings does not count)."""
    from .nn.shared import shared_parameter_map

    return any(name.startswith(arch.layers + ".") for name in shared_parameter_map(model))


def is_tied(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def untie_lm_head(model: nn.Module) -> None:
    """Give the model its own output matrix (a copy of the embeddings)."""
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", None)
    if callable(text_config):
        text_config().tie_word_embeddings = False


def global_batch(opts: HealOptions) -> int:
    """Rows per micro-batch over all processes: ``--heal-batch-size`` is each process's
    (accelerate's convention), and the token budget is the run's, shared by the processes."""
    from .train.parallel import processes

    return opts.micro_batch * processes().count


def healing_data(opts: HealOptions, source_model: LoadedModel, seq_len: int | None = None) -> torch.Tensor:
    """Token rows for ``opts.tokens`` tokens (one pass), written by / read for ``source_model``."""
    if opts.data.source == CALIBRATION_TEXT:
        raise LayerfoldError("--heal-data calib (the calibration text) works only with `layerfold compress`")
    seq = seq_len or opts.data.seq_len
    batch = global_batch(opts)
    steps = steps_for_tokens(opts.tokens, batch, opts.accumulation, seq)
    rows = steps * batch * opts.accumulation
    if opts.rows:
        rows = min(rows, opts.rows)
    return load_calibration(replace(opts.data, samples=rows, seq_len=seq), source_model, progress=opts.progress)


def prepare_teacher(opts: HealOptions, teacher: LoadedModel, ids: torch.Tensor, layer_map=None,
                    removed: int = 0):
    """The teacher as the loop wants it: a top-k cache on disk, or the live model.

    The cache keeps the outputs of the teacher layers the mse loss compares with: those of
    ``tail_map(mse_layers, layer_map)``, or, when the layer map is not known yet but the number
    of ``removed`` layers is, every layer one of the student's last layers can come from."""
    if not opts.needs_teacher:
        return None
    if not opts.teacher_cache:
        return teacher.model
    layers = []
    if opts.mse > 0:
        if layer_map is not None or not removed:
            layers = list(tail_map(opts.mse_layers, layer_map).values())
        else:
            n = len(model_layers(teacher.model, teacher.arch))
            layers = list(range(max(0, n - opts.mse_layers - removed), n))
    return build_teacher_cache(teacher, ids, topk=opts.topk, temperature=opts.temperature, layers=layers,
                               batch_size=opts.micro_batch, progress=opts.progress)


def heal(
    student: LoadedModel,
    teacher: LoadedModel | None,
    opts: HealOptions,
    *,
    ids: torch.Tensor | None = None,
    prepared_teacher=None,
    eval_fn=None,
    eval_every: int = 0,
    layer_map=None,
) -> HealResult:
    """Heal ``student`` in place (``student.model`` is replaced by the healed, merged model).

    ``ids`` and ``prepared_teacher`` let a caller compute the healing data and the teacher
    cache before it modifies the original model (``compress`` does, so that it needs no copy
    of the original in memory). ``layer_map``: the original index of each student layer
    (None for a replacement module), so the mse loss compares each of the student's last
    layers with the teacher layer it came from.
    """
    opts.validate()
    if not opts.enabled:
        raise LayerfoldError("healing needs a token budget (--heal-tokens N)")
    if opts.needs_teacher and teacher is None and prepared_teacher is None:
        raise LayerfoldError("the kl and mse healing losses need a teacher (--teacher ORIGINAL), or use --heal-kl 0 --heal-ce 1")
    seconds: dict[str, float] = {}
    if teacher is not None and teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise LayerfoldError("the teacher and the student use different tokenizers")
    n = len(model_layers(student.model, student.arch))
    if layer_map is not None and len(layer_map) != n:
        raise LayerfoldError(f"the layer map names {len(layer_map)} layers, the student has {n}")
    t = time.perf_counter()
    if ids is None:
        ids = healing_data(opts, teacher or student)
    seconds["data"] = time.perf_counter() - t
    t = time.perf_counter()
    if prepared_teacher is None and teacher is not None:
        prepared_teacher = prepare_teacher(opts, teacher, ids, layer_map)
    seconds["teacher"] = time.perf_counter() - t
    cache_size = cache_bytes(prepared_teacher) if hasattr(prepared_teacher, "folder") else None

    model = student.model
    trained_model, what, head_mode = _make_trainable(student, opts)
    losses = _losses(opts, layer_map)

    steps = steps_for_tokens(opts.tokens, global_batch(opts), opts.accumulation, ids.shape[1])
    config = TrainConfig(
        steps=steps, batch_size=opts.micro_batch, grad_accum=opts.accumulation, lr=opts.learning_rate(),
        warmup_steps=int(math.floor(opts.warmup * steps)), precision=opts.precision, seed=opts.seed,
        **opts.checkpoints().settings(), log_file=opts.log_file, progress=opts.progress, desc="healing", eval_every=eval_every,
    )
    t = time.perf_counter()
    result = train(trained_model, ids, config, losses, teacher=prepared_teacher, trainable=None,
                   arch=student.arch, eval_fn=eval_fn, logit_chunk=opts.logit_chunk)
    seconds["train"] = time.perf_counter() - t
    n_trainable = result.trainable_parameters

    if trained_model is not model:
        model = trained_model.merge_and_unload()
    elif has_lora(model):  # a shared model's adapters: each one added to its shared tensor once
        merge_lora(model)
    if opts.checkpointing:
        _set_checkpointing(model, False)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    student.model = model
    return HealResult(result, "; ".join(what), n_trainable, ids.shape[0], ids.shape[1], seconds, cache_size, head_mode)


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    """Activation checkpointing on or off: transformers 5.x names it activation_checkpointing_*
    (the gradient_checkpointing_* aliases warn), older releases only have the old names."""
    new = hasattr(model, "activation_checkpointing_enable")
    if not on:
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()
    elif new:  # non-reentrant: works with frozen embeddings (no input needs a gradient) and LoRA
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _make_trainable(student: LoadedModel, opts: HealOptions) -> tuple[nn.Module, list[str], str]:
    """Freeze everything, then switch on what ``opts`` trains (LoRA adapters, whole layers, the
    final norm, the head); returns the model to train (a PEFT wrapper with LoRA), what trains
    in words, and the head's mode."""
    model = student.model
    layers = model_layers(model, student.arch)
    n = len(layers)
    full_layers = _parse_layers(opts.layers, n) if opts.train in ("layers", "lora+layers") else []

    # the output head (see the module docstring)
    tied = is_tied(model)
    head_mode = opts.lm_head
    if head_mode == "auto":
        head_mode = "freeze" if tied else "train"
    if head_mode == "untie":
        if tied:
            untie_lm_head(model)
        head_mode = "train"
    head_words = {"freeze": "lm_head frozen" + (" (tied to the embeddings)" if tied else ""),
                  "train": "lm_head trained" + (" (tied: the input embeddings move with it)" if is_tied(model) else "")}[head_mode]

    for p in model.parameters():
        p.requires_grad_(False)
    if opts.checkpointing:
        _set_checkpointing(model, True)
    trained_model: nn.Module = model
    what = []
    if opts.train in ("lora", "lora+layers"):
        if shares_weights(model, student.arch):
            # PEFT would give each member of a shared group its own adapter and merge all of
            # them into the one shared tensor; nn.lora gives the tensor one adapter
            add_lora(model, student.arch, opts.lora_rank, opts.lora_alpha, modules=opts.lora_modules, seed=opts.seed)
            what.append(f"LoRA r={opts.lora_rank} on {opts.lora_modules} (one adapter per shared tensor)")
        else:
            trained_model = _add_lora(model, opts)
            what.append(f"LoRA r={opts.lora_rank} on {opts.lora_modules}")
    # full fine-tuning is switched on after PEFT, which freezes everything it does not add
    for i in full_layers:
        for p in layers[i].parameters():
            p.requires_grad_(True)
    if full_layers:
        what.append(f"layers {_ranges(full_layers)} of {n}")
    if opts.train_norm:
        from .models.architectures import get_path

        norm = list(get_path(model, student.arch.final_norm).parameters())
        if any(p.device.type == "meta" for p in norm):
            what.append("final norm frozen (offloaded by the device map)")
        else:
            for p in norm:
                p.requires_grad_(True)
            what.append("final norm")
    if head_mode == "train":
        head = model.get_output_embeddings().weight
        if head.device.type == "meta" and opts.lm_head == "auto":
            head_words = "lm_head frozen (offloaded by the device map)"
        else:
            head.requires_grad_(True)  # an explicit request on an offloaded head fails in train(), clearly
    what.append(head_words)
    return trained_model, what, head_mode


def _losses(opts: HealOptions, layer_map=None) -> list:
    """The healing objective's terms, by their weights (``layer_map``: see :func:`heal`)."""
    losses = []
    if opts.ce > 0:
        losses.append(NextTokenLoss(weight=opts.ce))
    if opts.kl > 0:
        losses.append(LogitKL(weight=opts.kl, temperature=opts.temperature))
    if opts.mse > 0:
        losses.append(HiddenMSE(tail_map(opts.mse_layers, layer_map), weight=opts.mse))
    return losses


def _add_lora(model: nn.Module, opts: HealOptions) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise LayerfoldError("LoRA healing needs the 'peft' package: pip install 'peft>=0.11' (a core dependency of layerfold)") from None
    targets = "all-linear" if opts.lora_modules == "all-linear" else [m.strip() for m in opts.lora_modules.split(",") if m.strip()]
    config = LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_alpha, lora_dropout=0.0, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise LayerfoldError(f"cannot add LoRA to {opts.lora_modules}: {str(e).splitlines()[0]}") from None
    _init_adapters(peft_model, opts.seed)
    return peft_model


def _init_adapters(peft_model: nn.Module, seed: int) -> None:
    """Give every LoRA adapter real memory and its standard start (A: Kaiming-uniform, B: 0),
    drawn from one seeded CPU generator in module order.

    PEFT creates an adapter on its base layer's device; for a layer a device map offloaded
    (weights on the meta device between calls) that is the meta device, where nothing can
    train. Such adapters are moved to the device the layer runs on. Drawing every start from
    one CPU generator makes the start the same whatever the placement: the same seed, the
    same start, on one device or spread over several.
    """
    from peft.tuners.lora import LoraLayer

    fallback = input_device(peft_model)
    g = torch.Generator().manual_seed(seed)
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        hook = getattr(module.get_base_layer(), "_hf_hook", None)
        runs_on = getattr(hook, "execution_device", None)
        runs_on = fallback if runs_on is None else torch.device(runs_on)
        for name in module.lora_A:
            a, b = module.lora_A[name], module.lora_B[name]
            for part in (a, b):
                if part.weight.device.type == "meta":
                    part.to_empty(device=runs_on)
            start = torch.empty(a.weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(start, a=math.sqrt(5), generator=g)
            with torch.no_grad():
                a.weight.copy_(start)
                b.weight.zero_()
                for part in (a, b):
                    if getattr(part, "bias", None) is not None:
                        part.bias.zero_()


def _ranges(idx: list[int]) -> str:
    out, start = [], None
    for i, j in zip(idx, idx[1:] + [None]):
        start = i if start is None else start
        if j != i + 1:
            out.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ",".join(out)


def teacher_copy(loaded: LoadedModel) -> LoadedModel:
    """A frozen copy of a model, to serve as teacher after the original is modified."""
    return replace(loaded, model=copy.deepcopy(loaded.model).eval())
