"""CORE evaluation: prompts, spans and scores against hand-computed examples; bundle handling; determinism."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmoe.train.core_eval import (
    CORE_TASKS,
    CoreBundleError,
    Request,
    crop,
    evaluate_core,
    fewshot_indices,
    item_requests,
    load_items,
    main,
    render_language_modeling,
    render_multiple_choice,
    render_schema,
    score_requests,
)

V = 128
TASKS = {t.name: t for t in CORE_TASKS}


class CharTokenizer:
    """One token per ASCII character; bos = 0."""

    bos_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


class Bigram(torch.nn.Module):
    """logits[b, t] = table[idx[b, t]]: log p(next | prev) is hand-computable."""

    def __init__(self, entries: dict[tuple[str, str], float], max_seq_len: int = 256):
        super().__init__()
        self.table = torch.zeros(V, V)
        for (prev, nxt), value in entries.items():
            self.table[ord(prev), ord(nxt)] = value
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)

    def forward(self, idx):
        return SimpleNamespace(logits=self.table[idx])


def nll(row: dict[str, float], nxt: str) -> float:
    """-log p(nxt | prev) for a table row with the given non-zero entries (all other V - len(row) logits 0)."""
    z = (V - len(row)) + sum(math.exp(v) for v in row.values())
    return math.log(z) - row.get(nxt, 0.0)


def write_bundle(folder, tasks: dict[str, list[dict]]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, items in tasks.items():
        (folder / TASKS[name].file).write_text("".join(json.dumps(i) + "\n" for i in items))
    return folder


def run(model, bundle, **kw):
    return evaluate_core(model, CharTokenizer(), bundle, device="cpu", progress=False, **kw)


# ---------------------------------------------------------------------------- prompts
def test_task_table_is_dclm_core():
    assert len(CORE_TASKS) == 22 and len({t.name for t in CORE_TASKS}) == 22
    t = TASKS
    assert (t["arc_easy"].fewshot, t["arc_easy"].delimiter, t["arc_easy"].baseline) == (10, "\nAnswer: ", 0.25)
    assert (t["copa"].kind, t["copa"].fewshot, t["copa"].delimiter, t["copa"].baseline) == (
        "multiple_choice",
        0,
        " ",
        0.5,
    )
    assert (t["commonsense_qa"].baseline, t["boolq"].baseline) == pytest.approx((0.403, 0.62))
    assert t["agi_eval_lsat_ar"].fewshot == 3
    assert t["winograd"].kind == t["winogrande"].kind == "schema"
    assert {n for n, x in t.items() if x.kind == "language_modeling"} == {
        "jeopardy", "bigbench_qa_wikidata", "lambada_openai", "bigbench_dyck_languages", "bigbench_cs_algorithms",
        "bigbench_operators", "bigbench_repeat_copy_logic", "squad", "coqa",
    }  # fmt: skip
    assert t["hellaswag"].file == t["hellaswag_zeroshot"].file and t["hellaswag"].fewshot == 10


def test_prompts_render_shots_with_gold_answers_and_blank_lines():
    shot = {"query": "Q1", "choices": ["a", "b"], "gold": 1}
    item = {"query": "Q2", "choices": ["x", "y"], "gold": 0}
    assert render_multiple_choice(item, "\nAnswer: ", [shot]) == [
        "Q1\nAnswer: b\n\nQ2\nAnswer: x",
        "Q1\nAnswer: b\n\nQ2\nAnswer: y",
    ]
    shot = {"context_options": ["A1", "A2"], "continuation": "end.", "gold": 0}
    item = {"context_options": ["B1", "B2"], "continuation": "fin.", "gold": 1}
    assert render_schema(item, " ", [shot]) == ["A1 end.\n\nB1 fin.", "A1 end.\n\nB2 fin."]
    shot = {"context": "C1\n", "continuation": "D1"}
    item = {"context": " C2 ", "continuation": "D2"}
    assert render_language_modeling(item, "\nAnswer: ", [shot]) == (
        "C1\nAnswer: D1\n\nC2\nAnswer:",
        "C1\nAnswer: D1\n\nC2\nAnswer: D2",
    )


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 300), k=st.integers(0, 10), data=st.data())
def test_fewshot_draw_is_seeded_by_item_and_excludes_it(n, k, data):
    k = min(k, n - 1)
    i = data.draw(st.integers(0, n - 1))
    got = fewshot_indices(i, n, k)
    assert got == fewshot_indices(i, n, k)
    assert i not in got and len(set(got)) == k and all(0 <= j < n for j in got)
    expected = random.Random(1234 + i).sample([j for j in range(n) if j != i], k) if k else []
    assert got == expected  # the protocol's draw (nanochat: rng.sample of the list without the item)


def test_fewshot_needs_enough_items():
    with pytest.raises(CoreBundleError, match="10-shot needs at least 11 items"):
        fewshot_indices(0, 5, 10)


def test_spans_multiple_choice_prefix_schema_suffix_lm_continuation():
    tok = CharTokenizer()
    (a, b) = item_requests(TASKS["copa"], {"query": "q", "choices": ["ab", "c"], "gold": 0}, [], tok, 7)
    assert (a.tokens, a.start, a.end, a.item) == ([0, *map(ord, "q ab")], 3, 5, 7)
    assert (b.tokens, b.start, b.end) == ([0, *map(ord, "q c")], 3, 4)
    (a, b) = item_requests(
        TASKS["winograd"], {"context_options": ["xa", "xb"], "continuation": "c", "gold": 0}, [], tok, 0
    )
    assert (a.start, a.end, b.start, b.end) == (3, 5, 3, 5)  # the shared " c" is scored
    (r,) = item_requests(TASKS["lambada_openai"], {"context": "hi ", "continuation": "yo"}, [], tok, 0)
    assert (r.tokens, r.start, r.end) == ([0, *map(ord, "hi yo")], 3, 6)  # " yo": the delimiter belongs to it


def test_lm_span_when_the_tokenizer_merges_across_the_boundary():
    class Merging(CharTokenizer):
        def encode(self, text):
            return [99] if text == "ab cd" else super().encode(text)  # the whole prompt is one token

    (r,) = item_requests(TASKS["lambada_openai"], {"context": "ab", "continuation": "cd"}, [], Merging(), 0)
    assert r.tokens == [0, ord("a"), ord("b"), ord(" "), ord("c"), ord("d")] and (r.start, r.end) == (3, 6)


def test_crop_keeps_the_tail_and_shifts_the_span():
    req = Request(0, list(range(10)), 8, 10)
    assert crop(req, 4) == Request(0, [6, 7, 8, 9], 2, 4)
    assert crop(req, 10) is req
    assert crop(Request(0, list(range(10)), 3, 10), 4) == Request(0, [6, 7, 8, 9], 1, 4)  # >= 1 context token


# ---------------------------------------------------------------------------- hand-computed scores
MC_ROW = {"a": 4.0, "c": 2.0}  # table row after " ": p(a) and p(c) raised; row "a" all zero (uniform)


def test_multiple_choice_scores_are_mean_continuation_nll():
    model = Bigram({(" ", "a"): 4.0, (" ", "c"): 2.0})
    reqs = item_requests(TASKS["copa"], {"query": "q", "choices": ["ab", "c"], "gold": 0}, [], CharTokenizer(), 0)
    (nll_ab, _), (nll_c, _) = score_requests(model, reqs, 0, "cpu", batch_size=2)
    assert nll_ab == pytest.approx((nll(MC_ROW, "a") + math.log(V)) / 2, abs=1e-5)
    assert nll_c == pytest.approx(nll(MC_ROW, "c"), abs=1e-5)
    # by the mean "ab" wins (3.04 < 3.24); by the sum "c" would (6.09 > 3.24)
    assert nll_ab < nll_c < 2 * nll_ab


def test_multiple_choice_accuracy_and_centering(tmp_path):
    model = Bigram({(" ", "a"): 4.0, (" ", "c"): 2.0})
    item = {"query": "q", "choices": ["ab", "c"]}
    bundle = write_bundle(tmp_path / "b", {"copa": [{**item, "gold": 0}, {**item, "gold": 0}, {**item, "gold": 1}]})
    result = run(model, bundle)
    score = result.tasks["copa"]
    assert (score.n, score.accuracy) == (3, pytest.approx(2 / 3))
    assert score.centered == pytest.approx((2 / 3 - 0.5) / 0.5)
    assert result.score == pytest.approx(score.centered) and result.n_tasks == 1
    assert len(result.missing) == 21 and "CORE over 1 of 22 tasks" in result.coverage


def test_schema_scores_the_shared_continuation_after_each_context(tmp_path):
    model = Bigram({("a", " "): 3.0, (" ", "c"): 1.0})
    reqs = item_requests(
        TASKS["winograd"], {"context_options": ["xa", "xb"], "continuation": "c", "gold": 0}, [], CharTokenizer(), 0
    )
    (nll_a, _), (nll_b, _) = score_requests(model, reqs, 0, "cpu", batch_size=1)
    shared = nll({"c": 1.0}, "c")
    assert nll_a == pytest.approx((nll({" ": 3.0}, " ") + shared) / 2, abs=1e-5)
    assert nll_b == pytest.approx((math.log(V) + shared) / 2, abs=1e-5)
    item = {"context_options": ["xa", "xb"], "continuation": "c"}
    bundle = write_bundle(tmp_path / "b", {"winograd": [{**item, "gold": 0}, {**item, "gold": 1}]})
    assert run(model, bundle).tasks["winograd"].accuracy == 0.5


def test_language_modeling_needs_an_exact_greedy_match(tmp_path):
    model = Bigram({("i", " "): 5.0, (" ", "y"): 5.0, ("y", "o"): 5.0})
    items = [{"context": "hi", "continuation": "yo"}, {"context": "hi", "continuation": "yu"}]
    bundle = write_bundle(tmp_path / "b", {"lambada_openai": items})
    score = run(model, bundle).tasks["lambada_openai"]
    assert (score.accuracy, score.centered) == (0.5, 0.5)  # baseline 0: centered = accuracy


def test_items_get_ten_other_items_as_shots_in_the_seeded_shuffled_order(tmp_path):
    items = [{"context": f"Q{i}", "continuation": f"A{i}"} for i in range(30)]
    bundle = write_bundle(tmp_path / "b", {"jeopardy": items})
    shuffled = load_items(bundle / "jeopardy_all.jsonl", TASKS["jeopardy"])
    expected_order = list(items)
    random.Random(1337).shuffle(expected_order)
    assert shuffled == expected_order
    for i, item in enumerate(shuffled[:5]):
        shots = [shuffled[j] for j in fewshot_indices(i, 30, 10)]
        (req,) = item_requests(TASKS["jeopardy"], item, shots, CharTokenizer(), i)
        text = "".join(map(chr, req.tokens[1:]))
        blocks = text.split("\n\n")
        assert len(blocks) == 11 and blocks[-1] == f"{item['context']}\nAnswer: {item['continuation']}"
        assert item["context"] + "\n" not in "\n\n".join(blocks[:-1]) + "\n"  # never its own shot
        assert "".join(map(chr, req.tokens[req.start : req.end])) == " " + item["continuation"]


# ---------------------------------------------------------------------------- bundle
def test_missing_bundle_says_where_to_get_it(tmp_path):
    with pytest.raises(CoreBundleError, match=r"does not exist.*\.\./shared/eval/core.*llm-foundry"):
        run(Bigram({}), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CoreBundleError, match="none of the CORE task files"):
        run(Bigram({}), tmp_path / "empty")


def test_malformed_items_name_file_and_line(tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "copa.jsonl").write_text('{"query": "q", "choices": ["a"], "gold": 0}\n{"query": "q"}\n')
    with pytest.raises(CoreBundleError, match=r"copa.jsonl:2: a multiple_choice item needs choices, gold"):
        run(Bigram({}), bundle)


def test_task_files_are_found_in_category_folders(tmp_path):
    write_bundle(
        tmp_path / "eval_data" / "commonsense_reasoning", {"copa": [{"query": "q", "choices": ["a", "b"], "gold": 0}]}
    )
    assert run(Bigram({}), tmp_path).tasks["copa"].n == 1


def test_shared_bundle_covers_18_of_22_tasks(small_tokenizer, core_bundle, random_model):
    model = random_model(vocab_size=320, max_seq_len=64, n_dense_layers=3)  # dense: fast on CPU
    result = evaluate_core(model, small_tokenizer, core_bundle, device="cpu", max_per_task=1, progress=False)
    assert result.n_tasks == 18 and sorted(result.missing) == ["coqa", "hellaswag", "hellaswag_zeroshot", "squad"]
    assert result.coverage.startswith("CORE over 18 of 22 tasks (missing: hellaswag_zeroshot")
    assert all(s.n == 1 for s in result.tasks.values())
    assert result.score == pytest.approx(sum(s.centered for s in result.tasks.values()) / 18)


def test_scores_are_deterministic_and_independent_of_batching(small_tokenizer, core_bundle, random_model):
    model = random_model(vocab_size=320, max_seq_len=64, n_dense_layers=3)  # dense: fast on CPU
    kw = dict(device="cpu", max_per_task=3, progress=False, tasks=["copa", "winograd", "lambada_openai", "boolq"])
    first = evaluate_core(model, small_tokenizer, core_bundle, batch_size=16, **kw)
    assert evaluate_core(model, small_tokenizer, core_bundle, batch_size=16, **kw) == first
    single = evaluate_core(model, small_tokenizer, core_bundle, batch_size=1, **kw)
    assert {n: s.accuracy for n, s in single.tasks.items()} == {n: s.accuracy for n, s in first.tasks.items()}


def test_eval_leaves_model_buffers_untouched(tmp_path, random_model):
    model = random_model(vocab_size=128)
    before = {n: b.clone() for n, b in model.named_buffers()}
    bundle = write_bundle(tmp_path / "b", {"copa": [{"query": "q", "choices": ["ab", "c"], "gold": 0}]})
    run(model, bundle)
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())


# ---------------------------------------------------------------------------- CLI
def test_cli_scores_a_checkpoint(trained_run, tmp_path, capsys, core_bundle):
    run_dir, _ = trained_run
    out = tmp_path / "core.json"
    argv = [str(run_dir), "--bundle", str(core_bundle), "--max-per-task", "2", "--tasks", "copa,lambada_openai"]
    assert main([*argv, "--device", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "copa" in text and "lambada_openai" in text and "CORE over 2 of 22 tasks" in text
    saved = json.loads(out.read_text())
    assert saved["n_tasks"] == 2 and set(saved["tasks"]) == {"copa", "lambada_openai"}


def test_cli_errors_are_one_line_with_exit_code_2(trained_run, tmp_path, capsys):
    run_dir, _ = trained_run
    assert main([str(run_dir), "--bundle", str(tmp_path / "none"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nmoe-eval: error: CORE bundle") and err.count("\n") == 1
    assert main([str(tmp_path / "no-checkpoint"), "--bundle", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(run_dir), "--device", "cpu"]) == 2  # the run's eval.core_bundle is empty
    assert "--bundle" in capsys.readouterr().err
