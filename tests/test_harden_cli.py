"""Hardening of the CLI's edges (issue #18): tokenizer and chat-template files, argv that is not UTF-8, Ctrl-C and
SIGTERM, and streaming with stop strings. Every bad input is one line on stderr and exit code 2."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import save_tiny_tokenizer
from test_cli import assert_one_line_error, run

import lcdfast
from lcdfast import cli, tokenizer
from lcdfast.errors import LcdError
from lcdfast.tokenizer import Tokenizer

# ---- tokenizer and chat-template files

LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
DEFAULT = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages[0].content }}"}]


DOUBLING = "{% set ns = namespace(x='a') %}{% for i in range(45) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}"


@pytest.mark.parametrize("change, needles", [
    ({"bos_token": 5}, ["tokenizer_config.json: bos_token 5", "must be a string"]),
    ({"pad_token": "\ud800"}, ["tokenizer_config.json: pad_token '\\ud800' is not valid Unicode"]),
    ({"eos_token": {"content": "a\udfff"}}, ["tokenizer_config.json: eos_token", "not valid Unicode"]),
    ({"eos_token": {"content": ["x"]}}, ["eos_token"]),
    ({"add_bos_token": "yes"}, ["add_bos_token 'yes'", "true, false or null"]),
    ({"chat_template": [{"name": "tool_use", "template": "T"}]}, ["chat_template: no template named 'default'"]),
    ({"chat_template": [{"name": "default"}]}, ["chat_template[0]", "'template'"]),
    ({"chat_template": [5]}, ["chat_template[0]"]),
    ({"chat_template": {"x": 1}}, ["chat_template", "must be a string"]),
    ({"chat_template": "{{ 1 / 0 }}"}, ["chat_template: the chat template failed", "ZeroDivisionError"]),
    ({"chat_template": "{% for i in range(10**9) %}x{% endfor %}"}, ["chat_template", "Range too big"]),
    ({"chat_template": "{{ '{:{}}'.format('x', '2000000000') }}"}, ["format: a format width in"]),
    ({"chat_template": "{{ ('a\\n' * 100000)|indent('x' * 3000) }}"}, ["do_indent would build"]),
    ({"chat_template": "{{ ('a ' * 100000)|wordwrap(1, wrapstring='x' * 300000) }}"}, ["do_wordwrap would build"]),
    ({"chat_template": "{{ (['x' * 1000000] * 300)|tojson }}"}, ["* would build 300000300"]),
    ({"chat_template": "{{ 'a'|indent(10**10) }}"}, ["do_indent: an argument is over 100000"]),
    ({"chat_template": "{{ 'a'.ljust(10**10) }}"}, ["ljust: an argument is over 100000"]),
    ({"chat_template": "{{ '{:>10000000000}'.format(1) }}"}, ["format: a format width in"]),
    ({"chat_template": "{{ '%10000000000s' % 'a' }}"}, ["%: a format width in"]),
    ({"chat_template": "{{ range(100000)|join(',' * 100000) }}"}, ["do_join would build"]),
    ({"chat_template": "{{ ('a' * 10**6).replace('a', 'bb') }}"}, ["replace would build 2000000"]),
    ({"chat_template": "{{ ('a' * 900000) + ('b' * 900000) }}"}, ["+ would build 1800000"]),
    ({"chat_template": LOOP}, ["chat_template", "still running after 0.2s"]),
    ({"chat_template": "{{ 'x' * 10**9 }}"}, ["chat_template", "* would build 1000000000"]),
    ({"chat_template": "{{ 7 ** (10 ** 9) }}"}, ["chat_template", "too large"]),
    ({"chat_template": "{% if %}"}, ["chat_template", "TemplateSyntaxError"]),
    ({"chat_template": "{{ raise_exception('no system role') }}"}, ["chat_template: no system role"]),
    ({"chat_template": "{% if false %}x{% endif %}"}, ["chat_template: the chat template rendered an empty prompt"]),
    ({"chat_template": None}, ["chat_template.jinja: not valid UTF-8"]),
])
def test_bad_tokenizer_files(change, needles, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer, "TEMPLATE_SECONDS", 0.2)
    monkeypatch.setattr(tokenizer, "TEMPLATE_MEMORY", 16 << 20)
    save_tiny_tokenizer(tmp_path)
    path = tmp_path / "tokenizer_config.json"
    cfg = {**json.loads(path.read_text()), **change}
    if change.get("chat_template", 0) is None:
        del cfg["chat_template"]
        (tmp_path / "chat_template.jinja").write_bytes(b"\xff\xfe{{ messages }}")
    path.write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with pytest.raises(LcdError) as e:
        Tokenizer.load(tmp_path).apply_chat_template("hi")
    assert time.perf_counter() - t0 < 5
    message = str(e.value)
    assert "\n" not in message and str(tmp_path) in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def test_a_template_growing_memory_is_stopped(tmp_path, monkeypatch):
    """A string doubled in a loop: stopped once the process has grown by TEMPLATE_MEMORY (the clock set far off,
    so the memory bound is what stops it; memory freed earlier and reused first can delay it a little)."""
    monkeypatch.setattr(tokenizer, "TEMPLATE_SECONDS", 30.0)
    monkeypatch.setattr(tokenizer, "TEMPLATE_MEMORY", 64 << 20)
    save_tiny_tokenizer(tmp_path)
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": DOUBLING}))
    with pytest.raises(LcdError, match="chat_template: the chat template failed .*grew memory by over 64 MiB"):
        Tokenizer.load(tmp_path).apply_chat_template("hi")


@pytest.mark.parametrize("template, expected", [
    ("{{ '{}'.format(123456) }}", "123456"), ("{{ 'id %d' % 123456 }}", "id 123456"),
    ("{{ (7 * 1000000)|string }}", "7000000"), ("{{ 'cutoff 20231231: {}'.format('x') }}", "cutoff 20231231: x"),
    ("{{ '%-8s|' % 'ab' }}{{ '{:>4}'.format(1) }}", "ab      |   1"),
    ("{{ ['a', 'b']|join(', ') }} {{ 'a-b'|replace('-', '+') }} {{ 'x'|center(5) }}.", "a, b a+b   x  ."),
])
def test_ordinary_template_operations_pass_the_guards(template, expected, tmp_path):
    save_tiny_tokenizer(tmp_path)
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": template}))
    assert Tokenizer.load(tmp_path).apply_chat_template("hi") == expected


def test_chat_template_list_picks_default_and_empty_vocabulary(tmp_path):
    save_tiny_tokenizer(tmp_path)
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": DEFAULT}))
    assert Tokenizer.load(tmp_path).apply_chat_template("hi") == "Dhi"
    tok = json.loads((tmp_path / "tokenizer.json").read_text())
    tok["model"].update(vocab={}, merges=[])
    tok["added_tokens"] = []
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(LcdError, match="tokenizer.json: empty vocabulary"):
        Tokenizer.load(tmp_path)
    path.write_text("[1, 2]")
    with pytest.raises(LcdError, match="tokenizer_config.json: holds a list, expected a JSON object"):
        Tokenizer.load(tmp_path)


def test_generate_chat_with_a_broken_template(tiny_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir("llama-tied-gqa")[0], model)
    path = model / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": "{{ 1 // 0 }}"}))
    code, out, err = run(capsys, "generate", "--model", model, "hi", "--chat", "--max-new-tokens", 2)
    assert_one_line_error(code, err, "tokenizer_config.json: chat_template", "ZeroDivisionError")
    assert out == ""
    code, out, err = run(capsys, "generate", "--model", model, "hi", "--max-new-tokens", 2)  # plain prompts still work
    assert code == 0 and out.startswith("hi"), err


# ---- argv that is not UTF-8 (Python hands it over as lone surrogates)

BAD = os.fsdecode(b"\xff\xfe")


@pytest.mark.parametrize("argv, needle", [
    (["generate", BAD], "prompt: b'\\xff\\xfe' is not valid UTF-8"),
    (["generate", BAD, "--json"], "prompt"),
    (["generate", "fine", BAD, "--chat"], "prompt"),
    (["generate", "fine", "--stop", BAD], "--stop: b'\\xff\\xfe'"),
    (["lens", BAD], "prompt"),
])
def test_argv_not_utf8(argv, needle, tmp_path, capsys):
    code, out, err = run(capsys, *argv, "--model", tmp_path)  # refused before the model is read
    assert_one_line_error(code, err, needle)
    assert out == ""


def test_tokenizer_refuses_lone_surrogates(tmp_path):
    save_tiny_tokenizer(tmp_path)
    with pytest.raises(LcdError, match="not valid Unicode"):  # what the API's callers get
        Tokenizer.load(tmp_path).encode(BAD)


def test_argv_bytes_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lcdfast.cli", "generate", b"\xff\xfe", "--json", "--model",
                           str(tmp_path)], capture_output=True)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and proc.stdout == b"" and err.count("\n") == 1, err
    assert "prompt: b'\\xff\\xfe' is not valid UTF-8" in err


# ---- signals

def test_cli_imports_no_torch_before_main():
    code = "import sys, lcdfast.cli; sys.exit('torch' in sys.modules or 'numpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    assert lcdfast.LcdError is LcdError and lcdfast.load.__module__ == "lcdfast.api"  # names load on first use


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_while_torch_imports(sig, code, word, tmp_path):
    """Ctrl-C (or SIGTERM) while `import torch` runs inside main: one line, exit 130 (143), no traceback."""
    start = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "  # not inherited SIG_IGN
             "runpy.run_module('lcdfast.cli', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-c", start, "generate", "x", "--model",
                             str(tmp_path)], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # -X importtime: a line as each module finishes; a torch submodule: torch is importing
        if line.startswith("import time:") and line.split("|")[-1].strip().startswith("torch."):
            break
    proc.send_signal(sig)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == code, rest
    assert [line for line in rest.splitlines() if not line.startswith("import time:")] == [f"lcdfast: {word}"]


def test_sigterm_runs_cleanup_and_restores_the_handler(monkeypatch, capsys):
    cleaned = []

    def convert(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except BaseException:  # what convert_gguf does with its temp dir
            cleaned.append(True)
            raise

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "cmd_convert", convert)
    assert cli.main(["convert", "a.gguf", "out"]) == 143
    assert cleaned == [True] and capsys.readouterr().err == "lcdfast: terminated\n"
    assert signal.getsignal(signal.SIGTERM) == before


# ---- streaming never shows what a stop string removes

def test_releasable():
    assert tokenizer.releasable("The ans", ["answer"]) == (4, False)
    assert tokenizer.releasable("The answer is", ["answer"]) == (4, True)
    assert tokenizer.releasable("a b c", ["c", "b"]) == (2, True)
    assert tokenizer.releasable("abc", []) == (3, False)
    assert tokenizer.releasable("xaa", ["aab"]) == (1, False)


def test_stream_holds_back_the_stop_string(tiny_dir, capsys):
    path, _ = tiny_dir("gpt2")
    engine = lcdfast.load(path)
    full = engine.generate("The quick", max_new_tokens=16)[0].text
    for stop in (full[4:9], full[4:9] + "\x00never"):  # one that comes, one whose start only comes
        want = engine.generate("The quick", max_new_tokens=16, stop=[stop])[0].text
        code, out, err = run(capsys, "generate", "--model", path, "The quick", "--max-new-tokens", 16, "--stop", stop)
        assert code == 0, err
        assert out == "The quick" + want + "\n" and stop not in out[len("The quick"):]


def test_api_stream_equals_the_text(tiny_dir):
    path, _ = tiny_dir("gpt2")
    engine = lcdfast.load(path)
    full = engine.generate("The quick", max_new_tokens=16)[0].text
    for stop in ([full[4:9]], [full[4:9] + "\x00never"], []):
        pieces: list[str] = []
        want = engine.generate("The quick", max_new_tokens=16, stop=stop, stream=lambda row, t, p=pieces: p.append(t))
        assert "".join(pieces) == want[0].text
