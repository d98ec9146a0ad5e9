"""What healing needs in memory, from the model's shapes alone (``layerfold heal --dry-run``).

Nothing is loaded: the student and the teacher are meta-device skeletons built from their
configs. The estimate adds up, per device:

- weights: every parameter at the run's dtype (the teacher first, alone: its outputs go to
  the disk cache and it leaves memory before the student arrives);
- the trained tensors' state: the tensor, its gradient and AdamW's two moments (LoRA
  adapters: rank x (in + out) per adapted linear layer; whole layers, the final norm and an
  untied head when they train);
- activations kept for backward, per token of a micro-batch and per decoder layer: the two
  norms' inputs and outputs (the outputs are the projections' inputs), the query and the
  attention's output (the attention keeps its inputs, its output and one log-sum-exp per
  position and head, not the positions x positions scores), the key and the value, and the
  MLP's gate, up, activation and product: 6 H + 2 KV + 4 I values (H hidden size, KV the
  key/value width, I the MLP width), and each LoRA adapter's rank-r middle; counted with
  autograd's saved-tensor hooks, tests/test_heal_memory.py; and the final norm's input (H).
  With ``--heal-checkpointing`` each layer keeps only its input (H) and one layer's full set
  exists at a time, while backward recomputes it;
- the logit loss: with chunked logits (the default) a chunk of 16 MiB of fp32 logits in two
  copies when the head is not trained (the logits and one buffer that holds the log-softmax,
  then the gradient: the chunk's gradient is taken in its forward pass, train/head.py), about
  four when it is (logits, log-softmax, the gradient, recomputed in backward), plus the final
  hidden states; without (``--heal-logit-chunk -1``) the batch's logits in about four copies;
- the runtime itself (Python, torch and its allocator: about 0.5 GiB on a CPU, as
  benchmarks/perf.md measures; a CUDA context is similar).

It is an estimate meant to choose between plans (one device, checkpointing, several
processes, offload), not an accounting to the byte; benchmarks/perf.md sets it beside a
measured peak.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

RUNTIME_BYTES = 512 * 2**20
LOGIT_COPIES = 4
LOGIT_COPIES_DIRECT = 2  # chunks whose gradient is taken in forward (a head that is not trained)
#: the values a decoder layer keeps for backward, per token: 6 H + 2 KV + 4 I (module docstring)
ACT_HIDDEN, ACT_KV, ACT_MLP = 6, 2, 4


@dataclass
class Shapes:
    """What the estimate reads from a model skeleton."""

    params: int
    weight_bytes: int
    layers: int
    hidden: int
    kv: int
    intermediate: int
    vocab: int
    layer_params: int  # the largest decoder layer's parameters
    layer_bytes: int
    linear: list[tuple[int, int]]  # (in, out) of every linear layer inside the decoder layers

    @classmethod
    def of(cls, model: nn.Module, arch) -> "Shapes":
        from .capture import model_layers

        c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        seen, params, nbytes = set(), 0, 0
        for p in model.parameters():  # tied tensors once
            if id(p) not in seen:
                seen.add(id(p))
                params += p.numel()
                nbytes += p.numel() * p.element_size()
        layers = list(model_layers(model, arch))
        sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        big = max(range(len(layers)), key=lambda i: sizes[i])
        layer_bytes = sum(p.numel() * p.element_size() for p in layers[big].parameters())
        linear = [(m.in_features, m.out_features) for layer in layers for m in layer.modules()
                  if isinstance(m, nn.Linear)]
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        kv = (getattr(c, "num_key_value_heads", None) or heads) * head_dim
        return cls(params, nbytes, len(layers), c.hidden_size, kv, getattr(c, "intermediate_size", 4 * c.hidden_size),
                   model.get_output_embeddings().weight.shape[0], sizes[big], layer_bytes, linear)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def trained_parameters(shapes: Shapes, opts, tied: bool) -> int:
    """How many parameters a healing run trains (``opts``: HealOptions)."""
    from ..healing import _parse_layers

    n = 0
    if opts.train in ("lora", "lora+layers"):
        names = None if opts.lora_modules == "all-linear" else opts.lora_modules
        if names is None:
            n += sum(opts.lora_rank * (i + o) for i, o in shapes.linear)
        else:  # named modules: counted as the same share of the layer's linear layers (shapes differ little)
            k = len([m for m in names.split(",") if m.strip()])
            per_layer = len(shapes.linear) // max(1, shapes.layers)
            share = min(1.0, k / max(1, per_layer))
            n += int(share * sum(opts.lora_rank * (i + o) for i, o in shapes.linear))
    if opts.train in ("layers", "lora+layers"):
        n += len(_parse_layers(opts.layers, shapes.layers)) * shapes.layer_params
    if opts.train_norm:
        n += shapes.hidden
    head = opts.lm_head if opts.lm_head != "auto" else ("freeze" if tied else "train")
    if head in ("train", "untie"):
        n += shapes.vocab * shapes.hidden
    return n


@dataclass
class Need:
    """One plan: what each device holds at the peak, in bytes."""

    name: str
    device: int  # per GPU (or the CPU, for a CPU run)
    host: int = 0  # CPU RAM (and disk) beside the GPUs, for offload
    note: str = ""


def healing_needs(student: Shapes, teacher: Shapes | None, opts, *, seq_len: int, dtype: torch.dtype,
                  tied: bool) -> dict:
    """Peak memory per device of healing ``student`` as ``opts`` (HealOptions) says, and of its
    alternatives; every figure in bytes, with the terms it is made of."""
    b = torch.empty(0, dtype=dtype).element_size()
    act_b = 2 if opts.precision == "bf16" else b
    tokens = opts.micro_batch * seq_len
    trained = trained_parameters(student, opts, tied)
    states = trained * b * 4  # tensor (LoRA: new memory), gradient, two moments
    if opts.train == "layers":
        states -= trained * b  # whole layers: the tensor is already among the weights
    per_layer = (ACT_HIDDEN * student.hidden + ACT_KV * student.kv + ACT_MLP * student.intermediate) * act_b
    lora_rank = opts.lora_rank if "lora" in opts.train else 0
    per_layer += lora_rank * len(student.linear) // max(1, student.layers) * act_b  # each adapter's A output
    final_norm = student.hidden * act_b  # its input (its output, the head's input, is counted with the loss)
    full_act = tokens * (per_layer * student.layers + final_norm)
    ckpt_act = tokens * (student.hidden * act_b * student.layers + per_layer + final_norm)

    head = opts.lm_head if opts.lm_head != "auto" else ("freeze" if tied else "train")
    head_trains = head in ("train", "untie")

    def logit_bytes(chunked: bool) -> int:
        if chunked:
            from .head import AUTO_CHUNK_BYTES

            per_chunk = AUTO_CHUNK_BYTES if opts.logit_chunk <= 0 else opts.logit_chunk * student.vocab * 4
            copies = LOGIT_COPIES if head_trains else LOGIT_COPIES_DIRECT
            return copies * min(per_chunk, tokens * student.vocab * 4) + tokens * student.hidden * 4
        return LOGIT_COPIES * tokens * student.vocab * 4

    logits = logit_bytes(opts.logit_chunk >= 0)
    teacher_phase = 0
    if teacher is not None:
        teacher_phase = RUNTIME_BYTES + teacher.weight_bytes + tokens * teacher.hidden * act_b * 4 + logit_bytes(True)

    def student_phase(act: int) -> int:
        return RUNTIME_BYTES + student.weight_bytes + states + act + logits

    plain, ckpt = student_phase(full_act), student_phase(ckpt_act)
    # offload: the GPU holds one layer at a time (and its adapters' state: all of them live on the
    # GPU), the activations with checkpointing and the loss; the CPU or disk holds the weights
    adapters = states if "lora" in opts.train else 0
    offload_gpu = RUNTIME_BYTES + 2 * student.layer_bytes + adapters + ckpt_act + logits
    if teacher is not None:
        offload_gpu = max(offload_gpu, RUNTIME_BYTES + 2 * teacher.layer_bytes + tokens * teacher.hidden * act_b * 4
                          + logit_bytes(True))
    host = max(student.weight_bytes, teacher.weight_bytes if teacher is not None else 0)
    needs = [
        Need("one device", max(plain, teacher_phase)),
        Need("one device, --heal-checkpointing", max(ckpt, teacher_phase)),
        Need("data-parallel under accelerate launch (each process)", max(plain, teacher_phase),
             note="each process holds the whole model and its share of the batch"),
        Need("offload: --device-map auto --heal-checkpointing (GPU, at least)", offload_gpu, host,
             note="layers not on a GPU wait in CPU RAM or --offload-folder"),
    ]
    return {
        "tokens_per_micro_batch": tokens, "dtype": str(dtype).replace("torch.", ""),
        "student_parameters": student.params, "student_weight_bytes": student.weight_bytes,
        "teacher_weight_bytes": teacher.weight_bytes if teacher is not None else None,
        "trained_parameters": trained, "trained_state_bytes": states,
        "activation_bytes": full_act, "activation_bytes_checkpointing": ckpt_act, "logit_bytes": logits,
        "teacher_phase_bytes": teacher_phase,
        "plans": [{"plan": n.name, "device_bytes": n.device, "host_bytes": n.host, "note": n.note} for n in needs],
    }


def describe(need: dict) -> str:
    """The estimate as the command line prints it."""
    lines = [
        f"healing memory estimate ({need['dtype']}, {need['tokens_per_micro_batch']:,} tokens per micro-batch per process)",
        f"  student weights      {_gib(need['student_weight_bytes'])} ({need['student_parameters']:,} parameters)",
    ]
    if need["teacher_weight_bytes"] is not None:
        lines.append(f"  teacher weights      {_gib(need['teacher_weight_bytes'])} (first, alone: "
                     f"its outputs go to the disk cache; that phase peaks at {_gib(need['teacher_phase_bytes'])})")
    lines += [
        f"  trained state        {_gib(need['trained_state_bytes'])} ({need['trained_parameters']:,} trained "
        "parameters: tensor, gradient, two AdamW moments)",
        f"  activations          {_gib(need['activation_bytes'])} "
        f"({_gib(need['activation_bytes_checkpointing'])} with --heal-checkpointing)",
        f"  logit loss           {_gib(need['logit_bytes'])}",
        "  peak per device:",
    ]
    for p in need["plans"]:
        host = f"; CPU RAM or disk {_gib(p['host_bytes'])}" if p["host_bytes"] else ""
        lines.append(f"    {p['plan']:<66} {_gib(p['device_bytes'])}{host}")
    return "\n".join(lines)
