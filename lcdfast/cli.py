"""`lcdfast` command line: parses, validates, calls the library, prints. Errors: one line, exit code 2; Ctrl-C
exits 130 and SIGTERM 143, each with one line, after the same cleanup.

Only the standard library is imported before main() runs: torch, numpy and rich load inside it, so Ctrl-C during
those imports is an interruption like any other."""

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import LcdError


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--quantize", default=None,
                   help="weight-only quantization at load: int8 | int8:G | int4 | int4:G (G = 32, 64, 128, 256); "
                        "gguf: a GGUF conversion's own blocks (default: as stored); a suffix +a8 (gguf+a8, int8+a8) "
                        "quantizes the activations to int8 too (faster with csrc, not exact)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step with torch.compile (CUDA graphs on a GPU); default: when it pays off")
    p.add_argument("--exit-heads", default=None,
                   help="safetensors file of per-layer exit heads: a lens from fit-lens or heads from train-heads")
    p.add_argument("--csrc", action="store_true",
                   help="build (once, needs a C++ compiler and ninja) and use the C++ ops in csrc/ (= LCDFAST_CSRC=1)")


def layer_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a layer index or auto") from None


def add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="greedy", help="greedy | sample | acd | dola | cd")
    p.add_argument("--amateur-layer", type=layer_arg, default=None,
                   help="ACD amateur layer, or auto (the exit heads' file's choice; see README) (default N // 2)")
    p.add_argument("--contrast-special", action="store_true",
                   help="contrast special tokens too (EOS, end of turn); default: they keep the expert's probability")
    p.add_argument("--dola-layers", default=None, help="DoLa candidates: low | high | i,j,k (default high)")
    p.add_argument("--dola-batch-mode", action="store_true", help="one DoLa layer for the whole batch")
    p.add_argument("--alpha", type=float, default=0.1, help="plausibility threshold (relative to the top token)")
    p.add_argument("--beta", type=float, default=None, help="CD's beta form: (1+beta) z_e - beta z_a")
    p.add_argument("--amateur-model", default=None, help="CD's amateur checkpoint directory")
    p.add_argument("--amateur-temperature", type=float, default=1.0)
    p.add_argument("--exit-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the final norm before early-exit heads (default: ACD yes, DoLa no)")


def build_parser() -> argparse.ArgumentParser:
    from .evaluate import METHOD_SYNTAX

    parser = argparse.ArgumentParser(prog="lcdfast", description="Fast layer-contrastive decoding")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text")
    g.add_argument("prompt", nargs="*")
    add_model_args(g)
    g.add_argument("--prompts-file", default=None,
                   help="a batch job: JSONL of {\"prompt\": ..., \"id\": ...} (or one prompt per line in a text file)")
    g.add_argument("--out", default=None, help="the batch job's JSONL records (resumes what is already there)")
    g.add_argument("--tp", type=int, default=1,
                   help="split the model over N ranks (tensor parallel; launch with torchrun --nproc-per-node N)")
    add_method_args(g)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--do-sample", action="store_true", help="sample from the method's distribution")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="apply the checkpoint's chat template")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")

    lens = sub.add_parser("lens", help="top token and probability at every layer (logit lens)")
    lens.add_argument("prompt")
    add_model_args(lens)
    lens.add_argument("--last", type=int, default=6, help="how many final positions to show")
    lens.add_argument("--exit-norm", action=argparse.BooleanOptionalAction, default=True)
    lens.add_argument("--json", action="store_true")

    f = sub.add_parser("fit-lens", help="fit a lens per layer (affine translators for the shared head)")
    add_model_args(f)
    f.add_argument("--data", nargs="+", required=True, help="JSONL/JSON/CSV (a text field) or plain text files")
    f.add_argument("--layers", default="all", help="all | i,j,.. (default all)")
    f.add_argument("--tokens", type=int, default=200_000, help="tokens to fit on (default 200000)")
    f.add_argument("--refine-steps", type=int, default=0,
                   help="then refine by the tuned-lens objective (KL from the final layer) for S steps")
    f.add_argument("--out", default="lens.safetensors")

    h = sub.add_parser("train-heads", help="train an exit head per layer (the ACD paper's multi-exit heads)")
    add_model_args(h)
    h.add_argument("--data", nargs="+", required=True, help="JSONL/JSON/CSV (a text field) or plain text files")
    h.add_argument("--layers", required=True, help="i,j,..")
    h.add_argument("--tokens", type=int, default=100_000, help="tokens of training data (default 100000)")
    h.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one pass over the tokens)")
    h.add_argument("--tokens-per-step", type=int, default=2048)
    h.add_argument("--lr", type=float, default=1e-4)
    h.add_argument("--out", default="heads.safetensors")

    q = sub.add_parser("quantize", help="float checkpoint directory -> quantized checkpoint directory")
    q.add_argument("model_dir")
    q.add_argument("out_dir")
    q.add_argument("--mode", required=True, help="int8 | int8:G | int4 | int4:G (G = 32, 64, 128, 256)")

    c = sub.add_parser("convert", help="GGUF file -> checkpoint directory")
    c.add_argument("gguf")
    c.add_argument("out_dir")

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching (the serve extra)")
    add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=16, help="rows decoded together per group (default 16)")
    s.add_argument("--max-seq-len", type=int, default=2048, help="context per request: prompt + new tokens")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before 503 (default 64)")
    s.add_argument("--max-groups", type=int, default=4,
                   help="groups of different options decoding at once, each with its own caches (default 4)")
    s.add_argument("--api-key", default=None, help="required as 'Authorization: Bearer KEY' (or $LCDFAST_API_KEY)")
    s.add_argument("--heads", action="append", default=[], metavar="NAME=FILE",
                   help="exit heads a request may name as exit_heads (repeatable)")
    s.add_argument("--amateur-model", default=None, help="CD's amateur checkpoint directory")
    s.add_argument("--model-id", default=None, help="the model's name in the API (default: the directory's)")
    s.add_argument("--compile-after", type=int, default=32,
                   help="eager steps of a (config, batch size) before its graph is compiled (default 32; 0: at once)")

    b = sub.add_parser("bench", help="speed against transformers; `bench serve`: the server under load "
                       "(needs a source checkout: bench/)")
    b.add_argument("args", nargs=argparse.REMAINDER)

    e = sub.add_parser("eval", help="evaluation: open-ended | truthfulqa | factor | gsm8k | strategyqa | lm-eval")
    tasks = e.add_subparsers(dest="task", required=True)
    for task, default in (("open-ended", "greedy,top-p=0.95,acd,dola"), ("truthfulqa", "greedy,acd,dola"),
                          ("factor", "greedy,acd,dola"), ("gsm8k", "greedy,acd,dola:low,dola:high"),
                          ("strategyqa", "greedy,acd,dola:low,dola:high"), ("lm-eval", "greedy,acd,dola:low")):
        t = tasks.add_parser(task)
        if task == "lm-eval":
            t.add_argument("--tasks", required=True, help="lm-evaluation-harness task names, comma-separated "
                           "(shipped offline: lambada_openai, wikinews_rolling)")
            t.add_argument("--include-path", action="append", default=[], help="a directory of your own task configs")
            t.add_argument("--data-dir", default=None, help="the shipped tasks' data (default $LCDFAST_DATA, else "
                           "../shared/data)")
            t.add_argument("--num-fewshot", type=int, default=None)
        else:
            t.add_argument("data", nargs="?", help="the data file from shared/data (jsonl, json or csv)")
            t.add_argument("--prompts", "--data", dest="data_option", default=None, help="the same, as an option")
        t.add_argument("--methods", default=default, help=METHOD_SYNTAX)
        t.add_argument("--limit", type=int, default=None, help="first N items only")
        t.add_argument("--out", default="runs/eval", help="output directory (resumes what is already there)")
        t.add_argument("--batch-size", type=int, default=8)
        t.add_argument("--amateur-model", default=None, help="CD's amateur checkpoint directory")
        add_model_args(t)
        if task in ("open-ended", "gsm8k", "strategyqa"):
            t.add_argument("--max-new-tokens", type=int, default=128 if task == "open-ended" else 256)
            t.add_argument("--seed", type=int, default=0)
        if task == "open-ended":
            t.add_argument("--no-mauve", action="store_true")
        if task == "factor":
            t.add_argument("--prefix-column", default=None, help="default: full_prefix for news, else DoLa's")
    return parser


@contextlib.contextmanager
def compile_status(engine, label: str, loads: bool = False) -> Iterator[None]:
    """A status line with elapsed time on stderr while a decode step compiles or loads (`loads`: from the file it
    was saved in; a spinner on a terminal), then how long it took (unless compiling failed: the engine has said so
    and decodes eagerly)."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console, t0 = Console(stderr=True), time.perf_counter()
    text = f"loading the compiled decode step ({label})" if loads else \
        f"compiling the decode step ({label}; saved for later runs)"
    if console.is_terminal:
        columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            progress.add_task(text, total=None)
            yield
    else:
        print(f"lcdfast: {text} ...", file=sys.stderr, flush=True)
        yield
    if not engine.compile_failed:
        print(f"lcdfast: {'loaded' if loads else 'compiled'} the decode step ({label}) in "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)


def load_engine(args):
    from . import kernels
    from .api import load

    if getattr(args, "csrc", False):
        kernels.enable()  # one line on stderr, and the torch path, if they can't be built
    engine = load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, tp=getattr(args, "tp", 1))
    if getattr(args, "exit_heads", None):
        engine.set_exit_heads(args.exit_heads)
    if getattr(args, "amateur_model", None):
        engine.set_amateur(args.amateur_model)
    if args.compile:
        engine.enable_compile()
    elif args.compile is False:
        engine.compile_mode = "off"
    engine.compile_status = lambda label, loads=False: compile_status(engine, label, loads)
    return engine


def cmd_generate(args) -> None:
    if bool(args.prompt) == bool(args.prompts_file):
        raise LcdError("generate: give prompts or --prompts-file FILE, not both" if args.prompt else
                       "generate: give a prompt (or --prompts-file FILE --out FILE.jsonl)")
    if bool(args.prompts_file) != bool(args.out):
        raise LcdError("--prompts-file and --out go together (a batch job: prompts in, JSONL records out)")
    if args.prompts_file and not Path(args.prompts_file).is_file():
        raise LcdError(f"--prompts-file: {args.prompts_file} is not a file")
    engine = load_engine(args)
    options = dict(method=args.method, do_sample=True if args.do_sample else None, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                   amateur_layer=args.amateur_layer, dola_layers=args.dola_layers,
                   dola_batch_mode=args.dola_batch_mode, alpha=args.alpha, beta=args.beta,
                   amateur_temperature=args.amateur_temperature, exit_norm=args.exit_norm,
                   contrast_special=args.contrast_special)
    engine.decode_config(**options)  # validate before any work
    if args.prompts_file:
        from . import evaluate, parallel

        t0 = time.perf_counter()
        records = evaluate.generate_file(engine, args.prompts_file, args.out, options, args.max_new_tokens, args.seed,
                                         args.stop, args.chat, args.batch_size)
        if parallel.is_main():
            print(f"wrote {args.out}: {len(records)} records, {sum(r['new_tokens'] for r in records)} new tokens "
                  f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
        return
    streaming = not args.json and len(args.prompt) == 1
    shown = []  # the prompt is printed with the first new text, so an error before it prints nothing else

    def show_prompt() -> None:
        if not shown:
            print(args.prompt[0], end="\n" if args.chat else "", flush=True)
            shown.append(True)

    def stream(row: int, text: str) -> None:
        show_prompt()
        print(text, end="", flush=True)  # never a stop string or what may begin one (the engine holds it back)

    results = engine.generate(args.prompt, max_new_tokens=args.max_new_tokens, seed=args.seed, stop=args.stop,
                              chat=args.chat, batch_size=args.batch_size, stream=stream if streaming else None,
                              **options)
    if streaming:
        show_prompt()  # no new text at all (an end-of-sequence token first)
    for r in results:
        if args.json:
            record = {"prompt": r.prompt, "text": r.text, "token_ids": r.token_ids, "new_tokens": r.new_tokens,
                      "prompt_tokens": r.prompt_tokens, "finish_reason": r.finish_reason,
                      "seconds": round(r.seconds, 4), "method": args.method, "compiled": r.stats["compiled"],
                      "compile_cache_hit": r.stats["compile_cache_hit"], "compile_loaded": r.stats["compile_loaded"],
                      **{k: round(r.stats[k], 4) for k in ("prefill_seconds", "compile_seconds", "decode_seconds")}}
            if r.dola_layers is not None:
                record["dola_layers"] = r.dola_layers
            print(json.dumps(record, ensure_ascii=False))
        elif streaming:
            print()
        else:
            print(f"{r.prompt}{r.text}\n")
    if not args.json:
        r = results[-1]
        stats = r.stats
        rate = stats["decode_steps"] / stats["decode_seconds"] if stats["decode_seconds"] > 0 else 0.0
        print(f"[{sum(x.new_tokens for x in results)} tokens, {rate * stats['batch']:.1f} tok/s decode]",
              file=sys.stderr)


def cmd_lens(args) -> None:
    from .tables import print_table

    engine = load_engine(args)
    if args.last < 1:
        raise LcdError(f"--last: {args.last} must be >= 1")
    view = engine.lens(args.prompt, last=args.last, exit_norm=args.exit_norm)
    if args.json:
        print(json.dumps(view, ensure_ascii=False))
        return
    rows, styles = [], []
    for layer, tokens, probs in zip(view["layers"], view["top_tokens"], view["top_probs"]):
        rows.append([str(layer), *(f"{repr(tok)[1:-1]} {p:.2f}" for tok, p in zip(tokens, probs))])
        styles.append(["", *("bold green" if p > 0.5 else "yellow" if p > 0.2 else "dim" for p in probs)])
    print_table(f"top next token per layer (exit norm {'on' if args.exit_norm else 'off'})",
                ["layer", *(repr(pos)[1:-1] for pos in view["positions"])], rows, styles, align="left")


def cmd_fit_lens(args) -> None:
    from .heads import fit_lens, parse_layers, save_exit_heads

    if args.tokens < 2:
        raise LcdError(f"--tokens: {args.tokens} must be >= 2")
    if args.refine_steps < 0:
        raise LcdError(f"--refine-steps: {args.refine_steps} must be >= 0")
    engine = load_engine(args)
    layers = parse_layers(args.layers, engine.n_layers, allow_final=True)
    fit = fit_lens(engine, args.data, layers, args.tokens, args.refine_steps)
    out = save_exit_heads(args.out, engine.model, "lens", fit["tensors"], fit["info"])
    info = fit["info"]
    auto = f"; automatic amateur layer {info['auto_layer']}" if "auto_layer" in info else ""
    print(f"wrote {out}: {len(layers)} lenses fitted on {info['tokens']} tokens in {info['seconds']:.1f}s{auto}")


def cmd_train_heads(args) -> None:
    from .heads import parse_layers, seconds_per_100k, train_heads

    for name in ("tokens", "tokens_per_step", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise LcdError(f"--{name.replace('_', '-')}: {value} must be >= 1")
    if not args.lr > 0:
        raise LcdError(f"--lr: {args.lr} must be > 0")
    engine = load_engine(args)
    layers = parse_layers(args.layers, engine.n_layers, allow_final=False)
    info = train_heads(engine, args.data, layers, args.out, args.tokens, args.steps, args.tokens_per_step, args.lr)
    print(f"wrote {args.out}: heads for layers {','.join(map(str, layers))}, {info['steps']} steps, loss "
          f"{info['losses'][0]:.3f} -> {info['losses'][-1]:.3f}, {info['seconds']:.1f}s "
          f"({seconds_per_100k(info):.1f}s per 100k tokens per layer)")


def cmd_convert(args) -> None:
    from .convert import convert_gguf

    t0 = time.perf_counter()
    out = convert_gguf(args.gguf, args.out_dir)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")


def cmd_quantize(args) -> None:
    from .checkpoint import quantize_checkpoint

    t0 = time.perf_counter()
    out = quantize_checkpoint(args.model_dir, args.out_dir, args.mode)
    print(f"wrote {out} ({args.mode}) in {time.perf_counter() - t0:.1f}s")


def cmd_serve(args) -> None:
    import socket

    try:
        from . import serve
    except ImportError as e:
        raise LcdError(f"serve: needs the serve extra (pip install 'lcdfast[serve]'): {e}") from None
    for name in ("max_batch", "max_seq_len", "max_queue", "max_groups"):
        if getattr(args, name) < 1:
            raise LcdError(f"--{name.replace('_', '-')}: {getattr(args, name)} must be >= 1")
    if args.compile_after < 0:
        raise LcdError(f"--compile-after: {args.compile_after} must be >= 0")
    if not 0 <= args.port <= 65535:
        raise LcdError(f"--port: {args.port} outside 0..65535")
    heads = {}
    for item in args.heads:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise LcdError(f"--heads: '{item}' must be NAME=FILE")
        heads[name] = path
    try:  # a port in use or an address not ours: one line now rather than uvicorn's log after loading the model
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        raise LcdError(f"--host {args.host} --port {args.port}: can't listen ({e.strerror or e})") from None
    if args.compile is None:
        args.compile = True  # a server's steps are many: compiling always pays off
    engine = load_engine(args)
    for path in heads.values():
        engine.read_exit_heads(path)
    http, batcher = serve.make_server(
        engine, args.host, args.port, args.max_batch, args.max_seq_len, args.max_queue, args.max_groups,
        compiled=args.compile, api_key=args.api_key or os.environ.get("LCDFAST_API_KEY") or None,
        exit_heads=heads, model_id=args.model_id, compile_after=args.compile_after)
    print(f"lcdfast: serving {args.model_id or engine.model_dir.name} on http://{args.host}:{args.port}/v1 "
          f"(batch <= {args.max_batch}, context {batcher.max_seq_len}, {'compiled' if args.compile else 'eager'})",
          file=sys.stderr, flush=True)
    try:
        http.run()
    finally:
        batcher.stop()
    print(f"lcdfast: stopped after {batcher.served} requests", file=sys.stderr)


def cmd_bench(args) -> None:
    """bench/bench.py with the given options; `bench serve ...`: bench/serve.py (the server under load)."""
    name, given = ("serve.py", args.args[1:]) if args.args[:1] == ["serve"] else ("bench.py", args.args)
    script = Path(__file__).resolve().parent.parent / "bench" / name
    if not script.is_file():
        raise LcdError(f"bench: {script} not found (run from a source checkout of lcdfast)")
    sys.argv = [str(script), *given]
    import runpy

    runpy.run_path(str(script), run_name="__main__")


def cmd_eval(args) -> None:
    from . import evaluate

    if args.task == "lm-eval":
        return eval_harness(args)
    data = args.data_option or args.data
    if data is None:
        raise LcdError("eval: give the data file (--prompts FILE.jsonl or --data FILE.csv)")
    if not Path(data).is_file():
        raise LcdError(f"data: {data} is not a file")
    if args.batch_size < 1:
        raise LcdError(f"--batch-size: {args.batch_size} must be >= 1")
    if args.compile is None and args.task == "open-ended":
        args.compile = True  # hundreds of prompts: compiling always pays off
    engine = load_engine(args)
    methods = evaluate.parse_methods(args.methods, engine.n_layers)
    evaluate.check_methods(engine, methods, args.task)
    common = dict(limit=args.limit, batch_size=args.batch_size)
    if args.task == "open-ended":
        evaluate.eval_open_ended(engine, data, args.out, methods, max_new_tokens=args.max_new_tokens,
                                 seed=args.seed, mauve=not args.no_mauve, **common)
    elif args.task in ("gsm8k", "strategyqa"):
        from .reasoning import eval_reasoning

        eval_reasoning(engine, args.task, data, args.out, methods, max_new_tokens=args.max_new_tokens,
                       seed=args.seed, **common)
    elif args.task == "truthfulqa":
        evaluate.eval_truthfulqa(engine, data, args.out, methods, **common)
    else:
        evaluate.eval_factor(engine, data, args.out, methods, prefix_column=args.prefix_column, **common)


def eval_harness(args) -> None:
    from . import evaluate, harness  # harness: LcdError with the install command if lm-eval is missing

    if args.batch_size < 1:
        raise LcdError(f"--batch-size: {args.batch_size} must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise LcdError(f"--limit: {args.limit} must be >= 1")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise LcdError(f"--tasks: '{args.tasks}' names no task")
    manager = harness.task_manager(args.data_dir, args.include_path, tasks)
    harness.check_tasks(tasks, manager, args.data_dir)
    engine = load_engine(args)
    methods = evaluate.parse_methods(args.methods, engine.n_layers)
    evaluate.check_methods(engine, methods, "lm-eval")
    harness.run_tasks(engine, tasks, args.out, methods, limit=args.limit, batch_size=args.batch_size,
                      data=args.data_dir, num_fewshot=args.num_fewshot, manager=manager)


def check_text(args: argparse.Namespace) -> None:
    """Prompts and stop strings must be UTF-8: Python hands other argv bytes over as lone surrogates, which no
    tokenizer or terminal takes."""
    for name in ("prompt", "stop"):
        values = getattr(args, name, None)
        for value in [values] if isinstance(values, str) else values or []:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                try:
                    seen = value.encode("utf-8", "surrogateescape")  # the bytes given
                except UnicodeEncodeError:
                    seen = value  # lone surrogates from a Python caller
                raise LcdError(f"{'--' * (name == 'stop')}{name}: {seen[:60]!r} is not valid UTF-8 text") from None


def run_command(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:  # its own parser takes every later argument, --help and --quick too
        args = argparse.Namespace(command=argv[0], args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    commands = {"generate": cmd_generate, "lens": cmd_lens, "convert": cmd_convert, "quantize": cmd_quantize,
                "bench": cmd_bench, "eval": cmd_eval, "fit-lens": cmd_fit_lens, "train-heads": cmd_train_heads,
                "serve": cmd_serve}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0:
        sys.stdout = open(os.devnull, "w")  # one of torchrun's ranks: rank 0 prints the results
    try:
        check_text(args)
        commands[args.command](args)
    except (LcdError, OSError) as e:  # OSError: a path that can't be read or written; its message names the path
        print(f"lcdfast: error: {' '.join(str(e).splitlines())}", file=sys.stderr)  # one line, whatever it quotes
        return 2
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so the same cleanup runs (a conversion's temp dir)."""


def terminate(signum: int, frame) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM would cut the cleanup short
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    on_main = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
    previous = signal.signal(signal.SIGTERM, terminate) if on_main else None
    try:
        return run_command(sys.argv[1:] if argv is None else argv)
    except Terminated:
        print("lcdfast: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:  # anywhere in main, torch's import included
        print("lcdfast: interrupted", file=sys.stderr)
        return 130
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
