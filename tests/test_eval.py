"""Evaluation on tiny random models: the scorer, metrics, stability, perplexity, results, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import VOCAB, build_tiny, stability_by_hand, tiny_tokenizer
from layerfold.cli import main
from layerfold.errors import LayerfoldError
from layerfold.eval import EvalResult, encode_pair, evaluate, load_task, perplexity, stability
from layerfold.eval.result import multiple_choice_result
from layerfold.eval.scoring import score_examples, score_examples_naive, suffix_chunks



pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


EXAMPLES = [
    # shared context, choices of different lengths
    [("Question: what is up?\nAnswer:", " the sky"), ("Question: what is up?\nAnswer:", " a b c d e f"),
     ("Question: what is up?\nAnswer:", " x")],
    # WinoGrande: contexts differ at the end, the continuation is shared
    [("Sarah was better than Maria so Sarah", " got it."), ("Sarah was better than Maria so Maria", " got it.")],
    # single-token choices (BoolQ): no second pass needed
    [("A long passage that goes on for many tokens indeed. Question: is it?", " yes"),
     ("A long passage that goes on for many tokens indeed. Question: is it?", " no")],
    # requests sharing no first token
    [("Zed", " a"), ("Wow", " b")],
    [("", " empty context")],
    [("Trailing space ", "moves")],
]


def _flat(results):
    return [s for row in results for s in row]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "gemma2"])
def test_shared_prefix_scorer_equals_one_sequence_per_choice(model_type):
    # mistral and gemma2 have an 8-token sliding window, shorter than these contexts;
    # gemma2 also soft-caps its logits
    model, tok = build_tiny(model_type), tiny_tokenizer()
    fast, stats = score_examples(model, tok, EXAMPLES, batch_size=4)
    naive, naive_stats = score_examples_naive(model, tok, EXAMPLES)
    for a, b in zip(_flat(fast), _flat(naive)):
        assert a.loglik == pytest.approx(b.loglik, abs=1e-4)
        assert a.greedy == b.greedy and a.tokens == b.tokens
    assert stats.tokens_run < naive_stats.tokens_run
    assert stats.tokens_naive == naive_stats.tokens_run


def test_results_do_not_depend_on_batch_size():
    model, tok = build_tiny("llama"), tiny_tokenizer()
    runs = [score_examples(model, tok, EXAMPLES, batch_size=b)[0] for b in (1, 2, 5, 64)]
    for other in runs[1:]:
        for a, b in zip(_flat(runs[0]), _flat(other)):
            assert a.loglik == pytest.approx(b.loglik, abs=1e-5)
            assert a.greedy == b.greedy


def test_loglikelihood_by_hand():
    # with a zero output head every logit is 0: each token has probability 1/VOCAB
    model, tok = build_tiny("llama"), tiny_tokenizer()
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    ctx, cont = "Question: x\nAnswer:", " abc"
    enc = encode_pair(tok, ctx, cont)
    assert len(enc.continuation) == 4  # byte-level tokenizer without merges: " ", "a", "b", "c"
    (scored,), _ = score_examples(model, tok, [[(ctx, cont)]])
    assert scored[0].loglik == pytest.approx(-4 * math.log(VOCAB), rel=1e-6)
    assert scored[0].greedy is False  # argmax of equal logits is token 0, never a byte


def test_loglikelihood_matches_full_forward():
    model, tok = build_tiny("qwen2"), tiny_tokenizer()
    (scored,), _ = score_examples(model, tok, [[("hello", " w")]])
    ids = tok.encode("hello w", add_special_tokens=False)  # ... "o", " ", "w"
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).logits[0], -1)
    expected = float(logp[-2, ids[-2]] + logp[-1, ids[-1]])
    assert scored[0].tokens == 2
    assert scored[0].loglik == pytest.approx(expected, abs=1e-5)


def test_encode_pair_moves_trailing_space_to_continuation():
    tok = tiny_tokenizer()
    a = encode_pair(tok, "Answer: ", "yes")
    b = encode_pair(tok, "Answer:", " yes")
    assert a.context == b.context and a.continuation == b.continuation


def test_acc_and_acc_norm():
    rows = [
        {"ll": [-10.0, -12.0], "chars": [5, 20], "gold": 1},  # acc: 0 (wrong); norm: -2 vs -0.6 -> 1 (right)
        {"ll": [-3.0, -4.0], "chars": [3, 3], "gold": 0},  # right both ways
    ]
    r = multiple_choice_result("t", rows)
    assert r.metrics == {"acc": 0.5, "acc_norm": 1.0}


def test_stability_constructed_example():
    ref_scores = [[0.0, 1.0], [0.0, 0.0], [0.0, 2.0]]  # population std: 0.5, 0, 1
    ref_correct = [True, False, True]
    new_correct = [True, False, False]  # agrees on the first two
    expected = (math.exp(0.5) + math.exp(0.0)) / (math.exp(0.5) + math.exp(0.0) + math.exp(1.0))
    assert stability(ref_scores, ref_correct, new_correct) == pytest.approx(expected)
    assert stability(ref_scores, ref_correct, ref_correct) == pytest.approx(1.0)
    assert stability(ref_scores, ref_correct, [not c for c in ref_correct]) == pytest.approx(0.0)


def test_effective_examples_and_agreement_constructed():
    from layerfold.eval import agreement, effective_examples

    ref_scores = [[0.0, 1.0], [0.0, 0.0], [0.0, 2.0]]  # population std: 0.5, 0, 1
    e = [math.exp(0.5), math.exp(0.0), math.exp(1.0)]
    w = [x / sum(e) for x in e]
    assert effective_examples(ref_scores) == pytest.approx(1 / sum(x * x for x in w))
    assert effective_examples([[0.0, 1.0]] * 4) == pytest.approx(4.0)  # equal confidence: every example counts
    # one example far more confident than the others: the weights rest on it alone (the saturation seen on PIQA)
    assert effective_examples([[0.0, 40.0], [0.0, 1.0], [0.0, 2.0]]) == pytest.approx(1.0, abs=1e-6)
    assert agreement([True, False, True, True], [True, True, False, True]) == pytest.approx(0.5)


@pytest.fixture
def task_files(tmp_path):
    mc = tmp_path / "tasks" / "mc.jsonl"
    mc.parent.mkdir()
    mc.write_text("\n".join(json.dumps(r) for r in [
        {"query": "Question: what is red?", "choices": ["blood", "grass", "sky"], "gold": 0},
        {"query": "Question: what is green?", "choices": ["blood", "grass"], "gold": 1},
        {"query": "Question: yes or no?", "choices": ["no", "yes"], "gold": 1},
    ]) + "\n")
    wino = tmp_path / "tasks" / "wino.jsonl"
    wino.write_text("\n".join(json.dumps(r) for r in [
        {"context_options": ["Ann beat Bo so Ann", "Ann beat Bo so Bo"], "continuation": "was sad.", "gold": 1},
        {"context_options": ["Cy hid from Di so Cy", "Cy hid from Di so Di"], "continuation": "looked.", "gold": 1},
    ]) + "\n")
    lamb = tmp_path / "tasks" / "lamb.jsonl"
    lamb.write_text("\n".join(json.dumps(r) for r in [
        {"context": "The cat sat on the", "continuation": "mat"},
        {"context": "One two three four", "continuation": "five"},
    ]) + "\n")
    return tmp_path


def test_task_layouts(task_files):
    mc = load_task(task_files / "tasks" / "mc.jsonl")
    assert mc.kind == "multiple_choice" and len(mc.examples) == 3
    assert mc.examples[0].requests[1] == ("Question: what is red?", " grass")
    assert mc.examples[0].choice_chars == [5, 5, 3]
    wino = load_task(task_files / "tasks" / "wino.jsonl", limit=1)
    assert len(wino.examples) == 1 and wino.examples[0].requests[0] == ("Ann beat Bo so Ann", " was sad.")
    lamb = load_task(task_files / "tasks" / "lamb.jsonl")
    assert lamb.kind == "language_modeling"
    bad = task_files / "bad.jsonl"
    bad.write_text('{"a": 1}\n')
    with pytest.raises(LayerfoldError, match="unknown task layout"):
        load_task(bad)


def test_perplexity_windows_match_full_forward():
    model, tok = build_tiny("llama"), tiny_tokenizer()
    docs = ["the quick brown fox jumps over the lazy dog " * 3, "pack my box with five dozen liquor jugs"]
    ids = torch.tensor([tok.encode("\n\n".join(docs), add_special_tokens=False)])
    n = ids.shape[1]
    # independent windows of 32 tokens, each scoring all its tokens but the first
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, n, 32):
            x = ids[:, b: b + 32]
            if x.shape[1] >= 2:
                nll += float(F.cross_entropy(model(x).logits[0, :-1], x[0, 1:], reduction="sum"))
                count += x.shape[1] - 1
    r = perplexity(model, tok, docs, window=32, batch_size=2)
    assert r.tokens == count
    assert r.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)
    # overlapping windows score every token but the first exactly once
    overlapped = perplexity(model, tok, docs, window=32, stride=8)
    assert overlapped.tokens == n - 1
    with pytest.raises(LayerfoldError):
        perplexity(model, tok, docs, window=32, stride=64)


def test_evaluate_result_roundtrip_and_stability(task_files, tmp_path):
    model, tok = build_tiny("llama"), tiny_tokenizer()
    tasks = [str(task_files / "tasks" / f"{t}.jsonl") for t in ("mc", "wino", "lamb")]
    ref = evaluate(model, tok, tasks=tasks, ppl=[tasks[2]], speed=False)
    assert set(ref.tasks) == {"mc", "wino", "lamb"}
    assert set(ref.tasks["lamb"].metrics) == {"acc", "perplexity"}
    assert ref.cost.parameters == sum(p.numel() for p in model.parameters())
    path = ref.save(tmp_path / "ref.json")
    again = EvalResult.load(path)
    assert again.summary() == ref.summary()
    same = evaluate(model, tok, tasks=tasks, reference=path, cost=False)
    assert same.tasks["mc"].metrics["stability"] == pytest.approx(1.0)
    other = evaluate(build_tiny("llama", seed=3), tok, tasks=tasks, reference=ref, cost=False)
    for name in ("mc", "wino"):
        for norm, key in ((False, "stability"), (True, "stability_norm")):
            by_hand = stability_by_hand(ref.tasks[name].examples, other.tasks[name].examples, norm)
            assert other.tasks[name].metrics[key] == pytest.approx(by_hand, abs=1e-12)
    # another model changed some answers: the figure is not the trivial 1 of agreeing on everything
    assert min(other.tasks[n].metrics["stability"] for n in ("mc", "wino")) < 1.0
    with pytest.raises(LayerfoldError, match="other examples"):
        evaluate(model, tok, tasks=tasks, reference=ref, limit=1, cost=False)


def test_cli_eval_and_compare(tiny_model_dir, task_files, tmp_path, capsys):
    folder = tiny_model_dir("llama")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    code = main(["-q", "eval", folder, "--data-dir", str(task_files), "--tasks", "mc,wino", "--ppl", "lamb", "--ppl-window", "128",
                 "--json", str(a), "--no-speed", "--reference", folder, "--reference-json", str(b)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "mc acc" in out and "mc stability" in out and "(100.0%)" in out
    assert main(["-q", "compare", str(b), str(a)]) == 0
    out = capsys.readouterr().out
    assert "wino acc_norm" in out and "parameters" in out
    assert main(["-q", "eval", folder, "--data-dir", str(task_files), "--tasks", "nope"]) == 2
    assert "task 'nope'" in capsys.readouterr().err


def test_default_ppl_window_fits_the_models_positions(tiny_model_dir, task_files, tmp_path, capsys):
    """Without --ppl-window, a 256-position model is scored with 256-token windows, not refused
    for the 512 default; an explicit window beyond its positions is still refused."""
    folder = tiny_model_dir("llama")
    out = tmp_path / "e.json"
    code = main(["-q", "eval", folder, "--data-dir", str(task_files), "--ppl", "lamb", "--no-speed", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    assert EvalResult.load(out).settings["ppl_window"] == 256
    assert main(["-q", "eval", folder, "--data-dir", str(task_files), "--ppl", "lamb", "--ppl-window", "512"]) == 2
    assert "longer than the 256 positions" in capsys.readouterr().err


def test_compress_writes_report_with_before_and_after(tiny_model_dir, task_files, text_file, tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main(["-q", "compress", tiny_model_dir("llama"), "--remove", "2", "--calib", text_file,
                 "--calib-samples", "4", "--seq-len", "32", "--data-dir", str(task_files),
                 "--eval-tasks", "mc,wino", "--eval-ppl", "lamb", "-o", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "mc stability" in stdout
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5  # layer map, importance, heatmap, before/after, healing
    for name in ("layer_map", "importance", "block_similarity", "before_after", "healing"):
        assert (out / "figures" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    before, after = EvalResult.load(out / "eval_before.json"), EvalResult.load(out / "eval_after.json")
    assert after.reference == before.model
    assert after.cost.parameters < before.cost.parameters
    assert after.cost.bytes_on_disk > 0
    record = json.loads((out / "layerfold.json").read_text())
    assert set(record["evaluation"]) == {"before", "after"}


def test_write_report_without_evaluation(tmp_path):
    from layerfold.report.html import write_report

    record = {"base_model": "m", "layers_before": 4, "layer_map": [0, 3],
              "recipe": {"method": "last-n", "removed_layers": [1, 2]}, "params_before": 10, "params_after": 6}
    path = write_report(tmp_path, record)
    text = path.read_text()
    assert "No evaluation was run" in text and "2 &rarr; 2" not in text and "4 &rarr; 2" in text
    assert (tmp_path / "figures" / "layer_map.png").exists()


@pytest.mark.integration  # imports lm-evaluation-harness and datasets: slow to import
def test_lm_eval_bridge_agrees_on_local_tasks(task_files):
    pytest.importorskip("lm_eval")
    from layerfold.eval.lm_eval_bridge import run_lm_eval

    model, tok = build_tiny("llama"), tiny_tokenizer()
    theirs = run_lm_eval((model, tok), ["mc", "wino"], batch_size=2, data_dir=task_files)
    ours = evaluate(model, tok, tasks=["mc", "wino"], data_dir=task_files, cost=False)
    assert theirs["mc"]["acc"] == pytest.approx(ours.tasks["mc"].metrics["acc"])
    assert theirs["mc"]["acc_norm"] == pytest.approx(ours.tasks["mc"].metrics["acc_norm"])
    assert theirs["wino"]["acc"] == pytest.approx(ours.tasks["wino"].metrics["acc"])


def test_suffix_chunks_bound_padding_and_keep_every_item():
    lengths = [40, 3, 38, 1, 35, 30, 20, 10, 9, 2, 2]
    chunks = suffix_chunks(list(range(len(lengths))), lambda i: lengths[i])
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    assert len(chunks) > 1  # 40 and 1 never share a chunk
    for c in chunks:
        padded, real = lengths[c[0]] * len(c), sum(lengths[i] for i in c)
        assert lengths[c[0]] == max(lengths[i] for i in c)
        assert padded <= 1.25 * real


def test_choices_of_very_different_lengths_score_as_alone():
    # one example whose suffixes land in several chunks, each against its own copy of the cache
    model, tok = build_tiny("qwen2"), tiny_tokenizer()
    ctx = "Goal: open the jar.\nSolution:"
    ex = [[(ctx, " twist"), (ctx, " hold the lid firmly and twist it counter-clockwise until it opens"),
           (ctx, " run it under hot water, then twist"), (ctx, " x")],
          [("Q: 2+2?\nA:", " 4"), ("Q: 2+2?\nA:", " four, as everybody knows")]]
    fast, stats = score_examples(model, tok, ex, batch_size=2)
    slow, _ = score_examples_naive(model, tok, ex)
    assert stats.forward_passes > 2  # the suffixes really were split
    for a, b in zip(_flat(fast), _flat(slow)):
        assert a.loglik == pytest.approx(b.loglik, abs=1e-4)


def test_peak_memory_is_the_models_not_the_whole_process():
    from layerfold.eval.cost import measure_cost

    model = build_tiny("llama")
    unrelated = torch.ones(64 * 2**20)  # 256 MiB the process holds for other reasons
    cost = measure_cost(model, prefill_tokens=16, decode_tokens=4, repeats=1)
    assert cost.weight_bytes <= cost.peak_memory_bytes < cost.weight_bytes + 128 * 2**20
    del unrelated
