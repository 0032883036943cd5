"""lcdfast as an lm-evaluation-harness model (the `lm-eval` extra): every harness task under any method.

    lm = LcdfastLM(lcdfast.load(), method="acd", amateur_layer=24)
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"], task_manager=task_manager())

or `lm_eval --model lcdfast --model_args pretrained=DIR,method=dola,dola_layers=low` once this module is imported.
Requests are tokenized as the harness's own HF model does (context and continuation split on the tokens of
their concatenation, no BOS unless `add_bos_token`) and scored through Engine.score_tokens, so `loglikelihood`
is the scoring API's log-likelihood under the method and `is_greedy` says whether each continuation token is
the method's own top choice. With several methods (`methods=[...]`, `use(i)`) one forward pass scores a
request for all of them and the others' results wait in memory for their turn.

The shipped task configs (lcdfast/tasks/*.yaml) read local files: `task_manager(data_dir)` fills in the data
directory (default: $LCDFAST_DATA, else ../shared/data) and indexes them ahead of the harness's own tasks, so
`lambada_openai` runs offline on ../shared/data/lambada/test.jsonl."""

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

from .errors import LcdError

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: the harness would otherwise ask the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import normalize_gen_kwargs
    from lm_eval.tasks import TaskManager
except ImportError:
    raise LcdError("lm-eval is not installed: pip install -e '.[lm-eval]'") from None

from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn

from . import parallel
from .evaluate import GENERATE_ONLY, SCORE_ONLY, TASK_DEFAULTS, MethodSpec, console, report

TASKS_DIR = Path(__file__).parent / "tasks"
DATA_MARK = "LCDFAST_DATA_DIR"  # where the shipped configs name the data directory
SAMPLING = ("temperature", "top_p", "top_k")  # generation options a task may set (with do_sample)


def data_dir(path: str | Path | None = None) -> Path:
    """The evaluation data directory: `path`, else $LCDFAST_DATA, else ../shared/data from the working directory
    or from the source checkout."""
    if path is not None or os.environ.get("LCDFAST_DATA"):
        return Path(path if path is not None else os.environ["LCDFAST_DATA"]).resolve()
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root.parent / "shared" / "data").is_dir():
            return (root.parent / "shared" / "data").resolve()
    return (Path.cwd().parent / "shared" / "data").resolve()


def shipped_tasks(data: Path) -> dict[str, list[Path]]:
    """{task name: the data files its shipped config reads} for every config in lcdfast/tasks."""
    out = {}
    for config in sorted(TASKS_DIR.glob("*.yaml")):
        text = config.read_text(encoding="utf-8")
        name = re.search(r"^task: *(\S+)", text, re.M).group(1)
        out[name] = [data / rel for rel in re.findall(rf"{DATA_MARK}/([^\s\"']+)", text)]
    return out


def task_manager(data: str | Path | None = None, include_path: list[str | Path] | None = None,
                 tasks: list[str] | None = None) -> TaskManager:
    """The harness's TaskManager with lcdfast's task configs (their data directory filled in) and then
    `include_path`'s ahead of the harness's own: a shipped or included task overrides a built-in of its name.
    When every one of `tasks` is shipped or included, the harness's own ~15k configs are not indexed (~7 s)."""
    from .convert import lcdfast_home

    data = data_dir(data)
    rendered = lcdfast_home() / "lm-eval-tasks" / hashlib.sha256(str(data).encode()).hexdigest()[:16]
    rendered.mkdir(parents=True, exist_ok=True)
    for config in [*TASKS_DIR.glob("*.yaml"), *TASKS_DIR.glob("*.py")]:  # configs and their !function modules
        quoted = str(data).replace("\\", "\\\\").replace('"', '\\"')  # inside the configs' double quotes
        text = config.read_text(encoding="utf-8").replace(DATA_MARK, quoted)
        target = rendered / config.name
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            partial = target.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(text, encoding="utf-8")
            partial.replace(target)  # whole or not at all: another process may be reading it
    for path in include_path or []:
        if not Path(path).is_dir():
            raise LcdError(f"--include-path: {path} is not a directory")
    paths = [str(rendered), *map(str, include_path or [])]
    if tasks:
        ours = TaskManager(include_path=paths, include_defaults=False)
        if all(t in ours.all_tasks or ours.match_tasks([t]) for t in tasks):
            return ours
    return TaskManager(include_path=paths)


def check_tasks(tasks: list[str], manager: TaskManager, data: str | Path | None = None) -> None:
    """LcdError naming the first task the harness doesn't know, or a shipped task whose data file is missing."""
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known and not manager.match_tasks([task]):
            raise LcdError(f"--tasks: '{task}' is not a task of lm-eval's or lcdfast's (lm_eval ls tasks; "
                           "--include-path DIR for your own configs)")
    files = shipped_tasks(data_dir(data))
    for task in tasks:
        entry = manager.task_index.get(task)
        if entry is None or "lm-eval-tasks" not in Path(entry.yaml_path or "").parts:
            continue  # not (or no longer: an --include-path config overrides it) a shipped task
        missing = next((f for f in files.get(task, []) if not f.is_file()), None)
        if missing is not None:
            raise LcdError(f"{task}: data file {missing} not found (give --data-dir DIR, or set LCDFAST_DATA)")


@register_model("lcdfast")
class LcdfastLM(TemplateLM):
    """An Engine under one method at a time; `methods` lists engine options (score_config's and decode_config's
    names; each call uses what applies) and `use(i)` picks one. Keyword options make a single method.
    Scored requests are kept for the other methods: set the engine's amateur or exit heads before, not after."""

    def __init__(self, engine=None, pretrained: str | None = None, methods: list[dict] | None = None,
                 batch_size: int | str = 8, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 seed: int = 0, dtype: str = "float32", device: str = "cpu", **options) -> None:
        super().__init__()
        if engine is None:
            from .api import load

            engine = load(pretrained, dtype=dtype, device=device)
        elif pretrained is not None:
            raise LcdError("LcdfastLM: give an engine or pretrained, not both")
        if methods is not None and options:
            raise LcdError(f"LcdfastLM: give methods=[...] or one method's options, not both ({sorted(options)})")
        self.engine, self.methods = engine, list(methods or [options])
        if batch_size == "auto":
            batch_size = 8
        self.batch_size, self.max_gen_toks, self.seed = int(batch_size), int(max_gen_toks), int(seed)
        self.add_bos_token = add_bos_token  # None: as the tokenizer does (HFLM's default)
        self.active = 0
        self.scored: dict[tuple, tuple[float, bool]] = {}  # (method index, context ids, continuation ids) -> result
        self.said: set[str] = set()
        configs = []
        for i in range(len(self.methods)):  # each method's options checked before the harness starts
            configs.append(self.engine.score_config(**self.score_options(i)))
            self.engine.decode_config(**self.generate_options(i))
        self._rank, self._world_size = parallel.rank(), parallel.world()
        self.room = self.engine.score_limit(configs)  # context + continuation tokens a scored row may hold
        bos = self.engine.tokenizer.bos_token_id
        self.bos_text = None if bos is None else self.engine.tokenizer.decode([bos], skip_special_tokens=False)

    def use(self, index: int) -> "LcdfastLM":
        """Evaluate with methods[index] from now on."""
        if not 0 <= index < len(self.methods):
            raise LcdError(f"LcdfastLM.use: {index} outside 0..{len(self.methods) - 1}")
        self.active = index
        return self

    def options(self, i: int, drop: set[str]) -> dict:
        """methods[i] over the harness's defaults (TASK_DEFAULTS["lm-eval"]), less the options in `drop`."""
        opts = {"method": "greedy", **self.methods[i]}
        opts = {**TASK_DEFAULTS["lm-eval"].get(opts["method"], {}), **opts}
        return {k: v for k, v in opts.items() if k not in drop}

    def score_options(self, i: int) -> dict:
        return self.options(i, GENERATE_ONLY)

    def generate_options(self, i: int) -> dict:
        return self.options(i, SCORE_ONLY)

    # ---- what the harness asks of a model ----------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = self.engine.tokenizer.eos_token_ids
        return eos[0] if eos else self.engine.eos_ids[0]

    @property
    def prefix_token_id(self) -> int:  # the context of an empty-context request: BOS where there is one, as HFLM
        bos = self.engine.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:  # the harness's: tokens fed, the last continuation token never is
        return self.room - 1

    @property
    def tokenizer_name(self) -> str:
        return str(self.engine.model_dir).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As HFLM: `add_special_tokens`, else add_bos_token, else the tokenizer's own rule (no second BOS before
        a string that starts with the BOS text)."""
        add = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if add is None:
            add = not (self.bos_text and string.startswith(self.bos_text))
        return self.engine.tokenizer.encode(string, add_special_tokens=add)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.engine.tokenizer.decode(tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not add_generation_prompt:
            raise LcdError("lm-eval: chat templates here always end with the assistant's turn "
                           "(add_generation_prompt=False is not supported)")
        return self.engine.tokenizer.apply_chat_template(chat_history)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of each (_, context ids, continuation ids) under the active method; the
        context is cut from the left to fit max_length, as the harness's HF model does."""
        rows, room = [], self.room
        for _, context, continuation in requests:
            if len(continuation) >= room:
                raise LcdError(f"lm-eval: a continuation of {len(continuation)} tokens leaves no room for its context "
                               f"in {room}")
            rows.append((tuple(context[-(room - len(continuation)):]), tuple(continuation)))
        todo = list(dict.fromkeys(r for r in rows if (self.active, *r) not in self.scored))
        todo.sort(key=lambda r: -len(r[0]) - len(r[1]))  # similar lengths share a batch: little padding
        step = 8 * self.batch_size
        label = f"scoring ({len(self.methods)} method{'s' if len(self.methods) > 1 else ''} at once)"
        total, job = len(todo), None
        if self.world_size > 1:  # data parallel: each rank holds the harness's share; rank 0 shows the whole job's
            total, job = parallel.all_reduce_int(len(todo)), parallel.new_job("lm-eval")
        with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                      disable=disable_tqdm or not total or not parallel.is_main()) as progress:
            bar = progress.add_task(label, total=total)
            for start in range(0, len(todo), step):
                chunk = todo[start:start + step]
                per_method = self.engine.score_tokens([list(c) for c, _ in chunk], [list(t) for _, t in chunk],
                                                      [self.score_options(i) for i in range(len(self.methods))],
                                                      self.batch_size, greedy=True)
                for i, results in enumerate(per_method):
                    for row, result in zip(chunk, results):
                        self.scored[(i, *row)] = result
                if job is None:
                    progress.advance(bar, len(chunk))
                else:
                    done = parallel.add_done(job, len(chunk))
                    progress.update(bar, completed=done)  # (rank 0's bar alone is shown)
            if job is not None and parallel.is_main():
                parallel.wait_done(job, total, lambda done: progress.update(bar, completed=done))
        return [self.scored[(self.active, *r)] for r in rows]

    # data parallel (torchrun): the harness shares the requests out by rank and gathers the metrics to rank 0
    @property
    def device(self):
        return self.engine.model.device

    def all_gather(self, tensor):
        import torch
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        import torch.distributed as dist

        parts = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, parts, dst=dst)
        return parts

    def barrier(self) -> None:
        parallel.barrier()

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over the harness's disjoint rolling windows of max_length tokens."""
        windows, owner = [], []
        for i, (text, *_) in enumerate(r.args for r in requests):
            ids = self.tok_encode(text)
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    ids, self.prefix_token_id, self.max_length, 1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += ll
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context continued under the active method until one of the task's `until` strings (cut off) or
        EOS or `max_gen_toks`; requests with the same settings are batched, longest first. A task's sampling
        (do_sample, temperature, top_p, top_k) applies to greedy only: a contrast method decodes as configured."""
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, r in enumerate(requests):
            context, kwargs = r.args
            kwargs = dict(normalize_gen_kwargs(dict(kwargs or {}), self.max_gen_toks))  # the aliases, as HFLM
            until = [u for u in kwargs.pop("until") if isinstance(u, str) and u]
            max_gen = int(kwargs.pop("max_gen_toks"))
            opts = self.generate_options(self.active)
            sampled = bool(kwargs.pop("do_sample"))
            picked = {k: kwargs.pop(k) for k in SAMPLING if k in kwargs}
            if not sampled:
                picked.pop("temperature", None)  # 0.0: greedy
            if sampled and opts.get("method", "greedy") == "greedy":
                opts = {**opts, "method": "sample", **picked}
            elif sampled:
                self._say(f"the task samples ({picked}); {opts.get('method')} decodes as configured")
            for key in kwargs:
                self._say(f"generation option '{key}' of the task is not used")
            room = self.engine.max_seq_len - max_gen  # for the context
            if room < 1:
                raise LcdError(f"lm-eval: max_gen_toks {max_gen} leaves no room for a context in {room + max_gen}")
            ids = self.tok_encode(context)[-room:] or [self.prefix_token_id]
            key = (tuple(until), max_gen, json.dumps(opts, sort_keys=True))
            groups.setdefault(key, []).append(i)
            settings.append((ids, opts))
        out = [""] * len(requests)
        for (until, max_gen, _), members in groups.items():
            members.sort(key=lambda i: -len(settings[i][0]))
            gens = self.engine.generate([settings[i][0] for i in members], max_new_tokens=max_gen, seed=self.seed,
                                        stop=list(until), batch_size=self.batch_size,
                                        **settings[members[0]][1])
            for i, g in zip(members, gens):
                out[i] = g.text
        return out

    def _say(self, text: str) -> None:
        if text not in self.said:
            self.said.add(text)
            print(f"lcdfast: {text}", file=sys.stderr, flush=True)


def metrics_of(results: dict) -> dict:
    """{task: {metric: value}} from simple_evaluate's results: "acc,none" -> "acc", "exact_match,flexible-extract"
    -> "exact_match[flexible-extract]"; names, aliases and "N/A" stderrs left out."""
    out = {}
    for task, values in results.items():
        row = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if filt and isinstance(value, int | float):
                row[metric if filt == "none" else f"{metric}[{filt}]"] = value
        out[task] = row
    return out


def run_tasks(engine, tasks: list[str], out_dir: str | Path, methods: list[MethodSpec], limit: int | None = None,
              batch_size: int = 8, include_path: list[str] | None = None, data: str | Path | None = None,
              num_fewshot: int | None = None, manager: TaskManager | None = None) -> dict:
    """`tasks` through the harness under every method (one engine; loglikelihood requests scored for all methods
    in one pass); each method's whole harness output in out_dir/lm-eval-<method>.json, the metrics in
    out_dir/summary.json under "lm-eval" and as a table. `manager`: task_manager(data, include_path)'s, if made."""
    import lm_eval

    manager = manager or task_manager(data, include_path)
    check_tasks(tasks, manager, data)
    lm = LcdfastLM(engine, methods=[{"method": spec.method, **spec.options} for spec in methods],
                   batch_size=batch_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, items = {}, {}
    for i, spec in enumerate(methods):
        t0 = time.perf_counter()
        try:
            result = lm_eval.simple_evaluate(model=lm.use(i), tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                             task_manager=manager, bootstrap_iters=0, log_samples=False)
        except OverflowError:  # a perplexity of log-likelihoods far below any real one
            raise LcdError(f"methods: '{spec.name}': a perplexity overflowed (a relative-top mask scores -1000 outside "
                           "its set; leave /rt at 0 for the harness)") from None
        if not parallel.is_main():  # the harness returns the gathered results on rank 0 alone
            continue
        name = re.sub(r"[^A-Za-z0-9.=+-]", "_", spec.name)
        (out / f"lm-eval-{name}.json").write_text(
            json.dumps(result, indent=2, default=lm_utils.handle_non_serializable) + "\n", encoding="utf-8")
        rows[spec.name] = {**metrics_of(result["results"]), "seconds": time.perf_counter() - t0,
                           "options": lm.options(i, set())}
        items = {task: n["effective"] for task, n in result.get("n-samples", {}).items()}
    summary = {"task": "lm-eval", "data": "lm-eval", "tasks": tasks, "items": sum(items.values()),
               "items_per_task": items, "methods": rows, "notes": []}
    if parallel.is_main():
        report(summary, out_dir)
    return summary
