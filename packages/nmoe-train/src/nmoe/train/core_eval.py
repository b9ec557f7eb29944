"""CORE: DCLM's 22-task in-context-learning score (the number nanochat reports), on any nmoe model.

Protocol (DCLM `eval/mmlu_and_lowvar.yaml` tasks, `eval/eval_meta_data.csv` random baselines — the
corrected "Core_v2" values — and nanochat's prompt rendering and scoring):
- Each task's items are shuffled with random.Random(1337); `max_per_task` keeps the first N.
- Item i's few-shot examples: random.Random(1234 + i).sample of the other items (the whole file),
  each rendered with its gold answer and followed by a blank line.
- multiple_choice: `query + delimiter + choice` per choice; schema: `option + delimiter + continuation`
  per context option. The prediction is the option whose continuation tokens (after the options'
  common token prefix / before their common suffix) have the lowest mean negative log-likelihood.
- language_modeling: `context.strip() + delimiter + continuation`; correct iff greedy decoding
  reproduces every continuation token (the prompt without it is stripped of trailing space).
- Every sequence starts with the tokenizer's bos token and is cut from the left to the model's
  max_seq_len. centered = (accuracy - baseline) / (1 - baseline); CORE = mean centered accuracy.

Sequences of many items are scored together, sorted by length, right-padded (causal attention
makes the padding invisible), under bf16 autocast on CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

N_CORE_TASKS = 22
DEFAULT_DELIMITER = " "  # llm-foundry's default continuation_delimiter
ANSWER_DELIMITER = "\nAnswer: "
SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234
BUNDLE_HINT = (
    "A CORE bundle is a folder of the DCLM / llm-foundry in-context-learning task files (.jsonl, found "
    "by name anywhere under it): the 18-task copy in ../shared/eval/core beside the nmoe repo, "
    "mosaicml/llm-foundry's scripts/eval/local_data/, or nanochat's eval_bundle/eval_data/."
)


class CoreBundleError(RuntimeError):
    """The CORE bundle is missing or malformed; the message says where to get it or what is wrong."""


@dataclass(frozen=True)
class CoreTask:
    """One CORE task: how to prompt and score it, and its random-guess accuracy (for centering)."""

    name: str
    kind: str  # multiple_choice | schema | language_modeling
    fewshot: int
    delimiter: str
    baseline: float  # random-guess accuracy as a fraction
    file: str


def _task(name, kind, fewshot, baseline_percent, file, delimiter=DEFAULT_DELIMITER) -> CoreTask:
    return CoreTask(name, kind, fewshot, delimiter, baseline_percent / 100.0, file)


MC, SCHEMA, LM = "multiple_choice", "schema", "language_modeling"
CORE_TASKS: tuple[CoreTask, ...] = (
    _task("hellaswag_zeroshot", MC, 0, 25, "hellaswag.jsonl"),
    _task("jeopardy", LM, 10, 0, "jeopardy_all.jsonl", ANSWER_DELIMITER),
    _task("bigbench_qa_wikidata", LM, 10, 0, "bigbench_qa_wikidata.jsonl"),
    _task("arc_easy", MC, 10, 25, "arc_easy.jsonl", ANSWER_DELIMITER),
    _task("arc_challenge", MC, 10, 25, "arc_challenge.jsonl", ANSWER_DELIMITER),
    _task("copa", MC, 0, 50, "copa.jsonl"),
    _task("commonsense_qa", MC, 10, 40.3, "commonsense_qa.jsonl"),
    _task("piqa", MC, 10, 50, "piqa.jsonl", ANSWER_DELIMITER),
    _task("openbook_qa", MC, 0, 25, "openbook_qa.jsonl"),
    _task("lambada_openai", LM, 0, 0, "lambada_openai.jsonl"),
    _task("hellaswag", MC, 10, 25, "hellaswag.jsonl"),
    _task("winograd", SCHEMA, 0, 50, "winograd_wsc.jsonl"),
    _task("winogrande", SCHEMA, 0, 50, "winogrande.jsonl"),
    _task("bigbench_dyck_languages", LM, 10, 0, "bigbench_dyck_languages.jsonl"),
    _task("agi_eval_lsat_ar", MC, 3, 25, "agi_eval_lsat_ar.jsonl"),
    _task("bigbench_cs_algorithms", LM, 10, 0, "bigbench_cs_algorithms.jsonl"),
    _task("bigbench_operators", LM, 10, 0, "bigbench_operators.jsonl"),
    _task("bigbench_repeat_copy_logic", LM, 10, 0, "bigbench_repeat_copy_logic.jsonl"),
    _task("squad", LM, 10, 0, "squad.jsonl"),
    _task("coqa", LM, 0, 0, "coqa.jsonl"),
    _task("boolq", MC, 10, 62, "boolq.jsonl", ANSWER_DELIMITER),
    _task("bigbench_language_identification", MC, 10, 25, "bigbench_language_identification.jsonl"),
)
assert len(CORE_TASKS) == N_CORE_TASKS
_REQUIRED_KEYS = {
    MC: ("query", "choices", "gold"),
    SCHEMA: ("context_options", "continuation", "gold"),
    LM: ("context", "continuation"),
}


@dataclass(frozen=True)
class TaskScore:
    accuracy: float
    centered: float
    n: int  # items scored


@dataclass(frozen=True)
class CoreResult:
    score: float  # mean centered accuracy over the tasks scored
    n_tasks: int
    tasks: dict[str, TaskScore]
    missing: list[str] = field(default_factory=list)  # CORE tasks whose file the bundle lacks

    @property
    def coverage(self) -> str:
        """'CORE over N of 22 tasks' (+ the missing ones)."""
        text = f"CORE over {self.n_tasks} of {N_CORE_TASKS} tasks"
        return text + (f" (missing: {', '.join(self.missing)})" if self.missing else "")

    def table(self) -> str:
        """Per-task accuracy / centered table and the CORE line."""
        width = max([len(n) for n in self.tasks] + [4])
        lines = [f"{'task':<{width}}  {'n':>6}  {'accuracy':>8}  {'centered':>8}"]
        for name, s in self.tasks.items():
            lines.append(f"{name:<{width}}  {s.n:>6}  {s.accuracy:>8.4f}  {s.centered:>8.4f}")
        lines.append(f"CORE {self.score:.4f}  ({self.coverage})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- prompts
def _shots_text(shots: Sequence[str]) -> str:
    return "".join(s + "\n\n" for s in shots)


def render_multiple_choice(item: dict, delimiter: str, shots: Sequence[dict] = ()) -> list[str]:
    """One prompt per choice: few-shot examples (with their gold choice), then query + delimiter + choice."""
    prefix = _shots_text([s["query"] + delimiter + s["choices"][s["gold"]] for s in shots])
    return [prefix + item["query"] + delimiter + choice for choice in item["choices"]]


def render_schema(item: dict, delimiter: str, shots: Sequence[dict] = ()) -> list[str]:
    """One prompt per context option, each followed by the shared continuation."""
    prefix = _shots_text([s["context_options"][s["gold"]] + delimiter + s["continuation"] for s in shots])
    return [prefix + option + delimiter + item["continuation"] for option in item["context_options"]]


def render_language_modeling(item: dict, delimiter: str, shots: Sequence[dict] = ()) -> tuple[str, str]:
    """(prompt without the continuation, stripped; prompt with it)."""
    prefix = _shots_text([s["context"].strip() + delimiter + s["continuation"] for s in shots])
    without = prefix + item["context"].strip() + delimiter
    return without.strip(), without + item["continuation"]


class _AllBut(Sequence):
    """range(n) without `skip`, without building the list (random.sample only needs len and indexing)."""

    def __init__(self, n: int, skip: int):
        self.n, self.skip = n, skip

    def __len__(self) -> int:
        return self.n - 1

    def __getitem__(self, i):
        if not 0 <= i < self.n - 1:
            raise IndexError(i)
        return i if i < self.skip else i + 1


def fewshot_indices(item_index: int, n_items: int, k: int) -> list[int]:
    """The k few-shot examples of item `item_index`: seeded by its index, never the item itself."""
    if k == 0:
        return []
    if n_items - 1 < k:
        raise CoreBundleError(f"{k}-shot needs at least {k + 1} items, the task file has {n_items}")
    return random.Random(FEWSHOT_SEED + item_index).sample(_AllBut(n_items, item_index), k)


# ---------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class Request:
    """One sequence to score: tokens[start:end] is the continuation."""

    item: int
    tokens: list[int]
    start: int
    end: int


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _common_suffix(seqs: Sequence[Sequence[int]]) -> int:
    return _common_prefix([list(reversed(s)) for s in seqs])


def item_requests(task: CoreTask, item: dict, shots: Sequence[dict], tokenizer, index: int) -> list[Request]:
    """Token sequences and continuation spans of one item (one per option; one for language modelling)."""
    bos = [tokenizer.bos_id]
    if task.kind == LM:
        without, with_ = render_language_modeling(item, task.delimiter, shots)
        head = bos + tokenizer.encode(without)
        full = bos + tokenizer.encode(with_)
        if full[: len(head)] != head:  # a merge across the boundary: tokenise the continuation on its own
            full = head + tokenizer.encode(with_[len(without) :])
        return [Request(index, full, len(head), len(full))]
    prompts = (render_multiple_choice if task.kind == MC else render_schema)(item, task.delimiter, shots)
    seqs = [bos + tokenizer.encode(p) for p in prompts]
    shortest = min(len(s) for s in seqs)
    if task.kind == MC:  # options share the context: continuation = after the common prefix
        start = min(_common_prefix(seqs), shortest - 1)
        return [Request(index, s, start, len(s)) for s in seqs]
    shared = min(_common_suffix(seqs), shortest - 1)  # schema: options share the continuation (suffix)
    return [Request(index, s, len(s) - shared, len(s)) for s in seqs]


def crop(req: Request, max_len: int) -> Request:
    """Cut from the left to max_len tokens (at least one context token stays before the continuation)."""
    cut = len(req.tokens) - max_len
    if cut <= 0:
        return req
    return Request(req.item, req.tokens[cut:], max(req.start - cut, 1), req.end - cut)


# ---------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_requests(model, requests: Sequence[Request], pad_id: int, device, batch_size: int, bar=None):
    """Per request: (mean continuation NLL, greedy match of every continuation token), in request order."""
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i].tokens), i))
    out: list[tuple[float, bool]] = [(math.nan, False)] * len(requests)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else nullcontext()
    for lo in range(0, len(order), batch_size):
        rows = [requests[i] for i in order[lo : lo + batch_size]]
        width = len(rows[0].tokens)
        batch = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for r, req in enumerate(rows):
            batch[r, : len(req.tokens)] = torch.tensor(req.tokens)
        batch = batch.to(device)
        with autocast:
            logits = model(batch).logits
        nlls, greedy = [], []
        for r, req in enumerate(rows):
            pred_logits = logits[r, req.start - 1 : req.end - 1].float()  # position t predicts token t + 1
            target = batch[r, req.start : req.end]
            nlls.append(torch.nn.functional.cross_entropy(pred_logits, target, reduction="mean"))
            greedy.append((pred_logits.argmax(-1) == target).all())
        for r, (nll, match) in enumerate(zip(torch.stack(nlls).tolist(), torch.stack(greedy).tolist())):  # one sync
            out[order[lo + r]] = (nll, bool(match))
        if bar is not None:
            bar.update(len(rows))
    return out


def task_accuracy(task: CoreTask, items: Sequence[dict], requests: Sequence[Request], scores) -> float:
    """Fraction of items answered correctly from their requests' scores."""
    by_item: dict[int, list[tuple[float, bool]]] = {}
    for req, score in zip(requests, scores):
        by_item.setdefault(req.item, []).append(score)
    correct = 0
    for index, item_scores in by_item.items():
        if task.kind == LM:
            correct += item_scores[0][1]
        else:
            nlls = [nll for nll, _ in item_scores]
            correct += nlls.index(min(nlls)) == items[index]["gold"]
    return correct / len(by_item)


# ---------------------------------------------------------------------------- bundle
def check_bundle(bundle_dir: str | Path) -> Path:
    """The bundle folder, or CoreBundleError saying where to get one (the trainer checks it before training)."""
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise CoreBundleError(f"CORE bundle {bundle} does not exist. {BUNDLE_HINT}")
    if not any(find_task_file(bundle, t) for t in CORE_TASKS):
        raise CoreBundleError(f"CORE bundle {bundle} holds none of the CORE task files. {BUNDLE_HINT}")
    return bundle


def find_task_file(bundle: Path, task: CoreTask) -> Path | None:
    """The task's file anywhere under the bundle folder (flat or llm-foundry's category folders)."""
    direct = bundle / task.file
    if direct.is_file():
        return direct
    found = sorted(bundle.rglob(task.file))
    return found[0] if found else None


def load_items(path: Path, task: CoreTask) -> list[dict]:
    """The task file's items, shuffled the protocol's way; CoreBundleError naming a bad line."""
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise CoreBundleError(f"{path}:{lineno}: not valid JSON ({e})") from None
            lacking = [k for k in _REQUIRED_KEYS[task.kind] if k not in item]
            if lacking:
                raise CoreBundleError(f"{path}:{lineno}: a {task.kind} item needs {', '.join(lacking)}")
            items.append(item)
    if not items:
        raise CoreBundleError(f"{path} holds no items")
    random.Random(SHUFFLE_SEED).shuffle(items)
    return items


def evaluate_core(
    model,
    tokenizer,
    bundle_dir: str | Path,
    *,
    device: str | torch.device,
    batch_size: int = 32,
    max_per_task: int | None = None,
    progress: bool = True,
    tasks: Sequence[str] | None = None,
    max_len: int | None = None,
) -> CoreResult:
    """CORE of `model` (forward(idx[B,S]) -> .logits[B,S,V]) over the bundle's task files.

    max_per_task: items per task (None or 0: all). tasks: a subset of CORE task names (default all).
    max_len: longest sequence fed to the model (default model.cfg.max_seq_len). Runs the model in eval mode
    (no MoE router load counted), so this may run in the middle of training.
    """
    from nmoe.train.inference import eval_mode

    bundle = check_bundle(bundle_dir)
    selected = _select(tasks)
    files = {t.name: find_task_file(bundle, t) for t in selected}
    missing = [t.name for t in CORE_TASKS if find_task_file(bundle, t) is None]
    if not any(files.values()):
        raise CoreBundleError(f"CORE bundle {bundle} holds none of the CORE task files. {BUNDLE_HINT}")
    max_len = max_len or model.cfg.max_seq_len
    results: dict[str, TaskScore] = {}
    with eval_mode(model):
        for task in selected:
            if files[task.name] is None:
                continue
            items = load_items(files[task.name], task)
            n = min(len(items), max_per_task) if max_per_task else len(items)
            requests = []
            for i in range(n):
                shots = [items[j] for j in fewshot_indices(i, len(items), task.fewshot)]
                requests += [crop(r, max_len) for r in item_requests(task, items[i], shots, tokenizer, i)]
            bar = _progress_bar(len(requests), task.name, progress)
            scores = score_requests(model, requests, tokenizer.bos_id, device, batch_size, bar)
            if bar is not None:
                bar.close()
            accuracy = task_accuracy(task, items, requests, scores)
            results[task.name] = TaskScore(accuracy, (accuracy - task.baseline) / (1.0 - task.baseline), n)
    score = sum(s.centered for s in results.values()) / len(results)
    return CoreResult(score, len(results), results, missing)


def _select(names: Sequence[str] | None) -> list[CoreTask]:
    if not names:
        return list(CORE_TASKS)
    known = {t.name: t for t in CORE_TASKS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown CORE task(s) {unknown}; known: {', '.join(known)}")
    return [known[n] for n in names]


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", leave=False, dynamic_ncols=True, file=sys.stderr)


# ---------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nmoe-eval",
        description="CORE evaluation (DCLM's 22 in-context-learning tasks) of an nmoe checkpoint.",
        epilog="example: uv run nmoe-eval runs/checkpoints/tiny --bundle ../shared/eval/core --max-per-task 100",
    )
    p.add_argument("checkpoint", help="a step_XXXXXXXX checkpoint directory or a run's checkpoint folder (its latest)")
    p.add_argument("--bundle", help="CORE bundle directory (default: the run's eval.core_bundle)")
    p.add_argument("--max-per-task", type=int, default=0, help="items per task (0: all)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward")
    p.add_argument("--tasks", help="comma-separated subset of task names (default: all 22)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: cuda if available)")
    p.add_argument("--tokenizer", help="tokenizer file (default: the run's data.tokenizer)")
    p.add_argument("--json", help="also write the result as JSON to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nmoe.train.inference import LoadError, load_model, pick_device

    if args.max_per_task < 0 or args.batch_size < 1:
        return _usage("--max-per-task must be >= 0 and --batch-size >= 1")
    try:
        device = pick_device(args.device)
        cfg, model, tok = load_model(args.checkpoint, device, args.tokenizer)
        bundle = args.bundle or cfg.eval.core_bundle
        if not bundle:
            return _usage("no CORE bundle: pass --bundle DIR (e.g. ../shared/eval/core)")
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
        result = evaluate_core(
            model, tok, bundle, device=device, batch_size=args.batch_size, max_per_task=args.max_per_task, tasks=tasks
        )
    except (LoadError, CoreBundleError, ValueError) as e:
        return _usage(str(e))
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(result_dict(result), indent=1) + "\n")
    return 0


def result_dict(result: CoreResult) -> dict:
    """JSON form: score, n_tasks, coverage, missing and per-task accuracy / centered / n."""
    return {
        "score": result.score,
        "n_tasks": result.n_tasks,
        "coverage": result.coverage,
        "missing": result.missing,
        "tasks": {name: dataclasses.asdict(s) for name, s in result.tasks.items()},
    }


def _usage(message: str) -> int:
    print(f"nmoe-eval: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
