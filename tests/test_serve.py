"""`lcdfast serve`: the OpenAI-compatible server in-process (uvicorn on a daemon thread, 127.0.0.1 only) and once
as a subprocess for the SIGTERM drain. Every reply is checked against a separate engine's Engine.generate."""

import contextlib
import json
import math
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest
import torch
from conftest import TEXT

import lcdfast
from lcdfast import heads
from lcdfast.batching import MAX_GRAPHS, Request
from lcdfast.serve import NEG_INF_LOGPROB, make_server

MODEL_ID = "tiny"
PROMPT = "The quick brown fox"
SEQ = 256  # the servers' context (the tiny model's positions)
ERROR_KEYS = {"message", "type", "param", "code"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, every: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return bool(condition())


@dataclass
class Live:
    port: int
    http: object  # uvicorn.Server
    batcher: object  # lcdfast.batching.Batcher
    engine: object

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def routes(self):  # the serve.Server behind the app's routes (max_body, api_key, ...)
        return self.http.config.app.routes[0].endpoint.__self__

    def client(self, api_key: str = "x") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)


@contextlib.contextmanager
def running(model_dir, **kwargs):
    """A server on a free port of 127.0.0.1 with its own engine, stopped (and its batcher drained) afterwards."""
    engine = lcdfast.load(model_dir, compile=False)
    settings = {"compiled": False, "max_batch": 4, "max_seq_len": SEQ, "model_id": MODEL_ID} | kwargs
    http, batcher = make_server(engine, port=free_port(), **settings)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: http.started or not thread.is_alive(), 60) and http.started, "server did not start"
        yield Live(http.config.port, http, batcher, engine)
    finally:
        http.should_exit = True
        thread.join(30)
        batcher.stop(30)
        assert not thread.is_alive() and batcher.stopped


class Reference:
    """Engine.generate on an engine of its own (never a server's), one prompt at a time, memoized."""

    def __init__(self, engine) -> None:
        self.engine, self.cache = engine, {}

    def __call__(self, prompt: str, max_tokens: int, seed: int = 0, chat: bool = False, stop=None, **options):
        key = (prompt, max_tokens, seed, chat, tuple(stop or ()), json.dumps(options, sort_keys=True))
        if key not in self.cache:
            self.cache[key] = self.engine.generate(prompt, max_new_tokens=max_tokens, seed=seed, chat=chat,
                                                   stop=stop, **options)[0]
        return self.cache[key]


def finish(generation) -> str:
    return "length" if generation.finish_reason == "length" else "stop"


@pytest.fixture(scope="module")
def model_dir(tiny_dir):
    return tiny_dir("llama-untied")[0]


@pytest.fixture(scope="module")
def ref(model_dir):
    return Reference(lcdfast.load(model_dir, compile=False))


@pytest.fixture(scope="module")
def server(model_dir):
    with running(model_dir, max_groups=4, max_queue=64) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def web(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def call(client, chat: bool, prompt: str, max_tokens: int, stream: bool, **kwargs) -> tuple[str, str, object]:
    """One request through the openai client -> (text, finish_reason, usage); a stream's deltas joined."""
    if chat:
        make, args = client.chat.completions.create, {"messages": [{"role": "user", "content": prompt}]}
    else:
        make, args = client.completions.create, {"prompt": prompt}
    if stream:
        kwargs["stream_options"] = {"include_usage": True}
    reply = make(model=MODEL_ID, max_tokens=max_tokens, stream=stream, **args, **kwargs)
    if not stream:
        assert reply.model == MODEL_ID and len(reply.choices) == 1
        choice = reply.choices[0]
        return (choice.message.content if chat else choice.text), choice.finish_reason, reply.usage
    chunks = list(reply)
    with_choices = [c for c in chunks if c.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # include_usage: the usage chunk is last
    texts = [(c.choices[0].delta.content if chat else c.choices[0].text) or "" for c in with_choices]
    reasons = [c.choices[0].finish_reason for c in with_choices]
    assert all(r is None for r in reasons[:-1]) and reasons[-1] is not None, reasons
    assert len({c.id for c in chunks}) == 1
    if chat:
        assert with_choices[0].choices[0].delta.role == "assistant"
    return "".join(texts), reasons[-1], chunks[-1].usage


def check(got: tuple[str, str, object], expected) -> None:
    text, reason, usage = got
    assert text == expected.text
    assert reason == finish(expected)
    assert usage.completion_tokens == len(expected.token_ids)
    assert usage.prompt_tokens == expected.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


# (what the request sends, what Engine.generate is given)
METHODS = {
    "default": ({}, {}),
    "greedy": ({"extra_body": {"method": "greedy"}}, {"method": "greedy"}),
    "temperature-0": ({"temperature": 0}, {}),
    "acd": ({"extra_body": {"method": "acd", "amateur_layer": 2, "alpha": 0.2}},
            {"method": "acd", "amateur_layer": 2, "alpha": 0.2}),
    "dola": ({"extra_body": {"method": "dola", "dola_layers": "low"}}, {"method": "dola", "dola_layers": "low"}),
    "dola-list": ({"extra_body": {"method": "dola", "dola_layers": [0, 2, 4]}},
                  {"method": "dola", "dola_layers": [0, 2, 4]}),
    "sample": ({"temperature": 0.8, "seed": 7}, {"method": "sample", "temperature": 0.8, "seed": 7}),
    "sample-top-p": ({"temperature": 1.0, "top_p": 0.9, "seed": 3},
                     {"method": "sample", "temperature": 1.0, "top_p": 0.9, "seed": 3}),
    "acd-sample": ({"temperature": 0.7, "seed": 5, "extra_body": {"method": "acd", "amateur_layer": 2}},
                   {"method": "acd", "amateur_layer": 2, "do_sample": True, "temperature": 0.7, "seed": 5}),
    "repetition-penalty": ({"extra_body": {"repetition_penalty": 1.3}}, {"repetition_penalty": 1.3}),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("method", list(METHODS))
def test_openai_client_matches_generate(method, chat, stream, client, ref):
    body, options = METHODS[method]
    options = dict(options)
    seed = options.pop("seed", 0)
    expected = ref(PROMPT, 24, seed=seed, chat=chat, **options)
    check(call(client, chat, PROMPT, 24, stream, **body), expected)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_stop_string_cuts_the_text(chat, stream, client, ref):
    full = ref(PROMPT, 40, chat=chat)
    found = [m for m in re.finditer(r"[A-Za-z]{3,}", full.text) if m.start() > 0]
    assert found, f"no stop string candidate in {full.text!r}"
    stop = found[0].group()[:3]
    expected = ref(PROMPT, 40, chat=chat, stop=[stop])
    assert expected.finish_reason == "stop" and expected.text == full.text[:full.text.find(stop)]
    text, reason, usage = call(client, chat, PROMPT, 40, stream, stop=[stop, "never-there"])
    check((text, reason, usage), expected)
    assert stop not in text
    # a single string too
    check(call(client, chat, PROMPT, 40, stream, stop=stop), expected)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_eos_finishes_with_stop(chat, stream, client, ref):
    candidates = ["The fox", "The tokens", "The improve", "brown 0123456789", "hi", "Layers improve"]
    ended = [p for p in candidates if ref(p, 40, chat=chat).finish_reason == "eos"]
    assert ended, "no candidate prompt ends with EOS within 40 tokens"
    expected = ref(ended[0], 40, chat=chat)
    assert len(expected.token_ids) < 40
    check(call(client, chat, ended[0], 40, stream), expected)


def test_whole_context_and_default_max_tokens(client, web, ref):
    """max_tokens up to the context's room is accepted; completions default to 16 tokens, chat to the room."""
    room = SEQ - len(ref.engine.encode_prompt("Layers improve"))
    check(call(client, False, "Layers improve", room, False), ref("Layers improve", room))
    r = web.post("/v1/completions", json={"prompt": PROMPT})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == len(ref(PROMPT, 16).token_ids)
    assert r.json()["choices"][0]["text"] == ref(PROMPT, 16).text
    r = web.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Layers improve"}]})
    assert r.status_code == 200, r.text
    chat_room = SEQ - len(ref.engine.encode_prompt("Layers improve", chat=True))
    expected = ref("Layers improve", chat_room, chat=True)
    assert r.json()["choices"][0]["message"]["content"] == expected.text
    assert r.json()["usage"]["completion_tokens"] == len(expected.token_ids)


def test_chat_messages_forms(web, ref):
    """System turns, developer (= system) turns and text content parts render as Engine's chat template does."""
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The fox"},
             {"role": "assistant", "content": "jumps"}, {"role": "user", "content": "Layers"}]
    ids = ref.engine.encode_prompt(turns, chat=True)
    given = [turns[0] | {"role": "developer"}, turns[1] | {"content": [{"type": "text", "text": "The "},
                                                                       {"type": "text", "text": "fox"}]}, *turns[2:]]
    r = web.post("/v1/chat/completions", json={"messages": given, "max_tokens": 12})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    with torch.inference_mode():  # the text of greedy decoding from exactly those ids
        from lcdfast.generate import generate_ids

        out, _, _, _ = generate_ids(ref.engine.model, [ids], ref.engine.decode_config(), 12, ref.engine.eos_ids)
    expected = ref.engine.tokenizer.decode([t for t in out[0] if t not in ref.engine.eos_ids])
    assert r.json()["choices"][0]["message"]["content"] == expected


# ---- plain HTTP: the SSE format, /health, /v1/models


def sse_events(web, path: str, body: dict) -> list[str]:
    with web.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw[:400]
    assert events[-1] == "data: [DONE]"
    return [e[len("data: "):] for e in events]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_sse_format(chat, web, ref):
    body = {"max_tokens": 20, "stream": True}
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": PROMPT}]
    else:
        path, body["prompt"] = "/v1/completions", PROMPT
    expected = ref(PROMPT, 20, chat=chat)
    events = sse_events(web, path, body)
    chunks = [json.loads(e) for e in events[:-1]]
    kind = "chat.completion.chunk" if chat else "text_completion"
    assert all(c["object"] == kind and c["model"] == MODEL_ID for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-" if chat else "cmpl-")
    if chat:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == finish(expected)
    assert last["usage"] == {"prompt_tokens": expected.prompt_tokens, "completion_tokens": len(expected.token_ids),
                             "total_tokens": expected.prompt_tokens + len(expected.token_ids)}
    assert all(c["choices"][0]["finish_reason"] is None and "usage" not in c for c in chunks[:-1])
    texts = [c["choices"][0]["delta"]["content"] if chat else c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == expected.text
    assert len(chunks) > 2  # it streamed, not one chunk at the end

    # include_usage: one more chunk, no choices, the usage
    events = sse_events(web, path, body | {"stream_options": {"include_usage": True}})
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == last["usage"]


def test_health_and_models(server, web):
    r = web.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "busy": 0}
    r = web.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [MODEL_ID]
    assert body["data"][0]["object"] == "model" and isinstance(body["data"][0]["created"], int)
    with server.client() as c:
        assert [m.id for m in c.models.list()] == [MODEL_ID]


def test_dola_layers_reported(web, ref):
    r = web.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 10, "method": "dola", "dola_layers": "low"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["dola_layers"] == ref(PROMPT, 10, method="dola", dola_layers="low").dola_layers


# ---- concurrency


MIXED = [  # (prompt, body, Engine.generate options)
    ("The quick brown fox", {}, {}),
    ("Layers", {}, {}),
    ("Contrastive decoding scores tokens by how much", {}, {}),
    ("The fox", {"extra_body": {"method": "acd", "amateur_layer": 2, "alpha": 0.2}},
     {"method": "acd", "amateur_layer": 2, "alpha": 0.2}),
    ("0123456789 layer by layer", {"extra_body": {"method": "acd", "amateur_layer": 2, "alpha": 0.2}},
     {"method": "acd", "amateur_layer": 2, "alpha": 0.2}),
    ("Layers improve", {"extra_body": {"method": "dola", "dola_layers": "low"}},
     {"method": "dola", "dola_layers": "low"}),
    ("The lazy dog", {"temperature": 0.9, "seed": 11}, {"method": "sample", "temperature": 0.9, "seed": 11}),
    ("The quick", {"temperature": 0.9, "seed": 12}, {"method": "sample", "temperature": 0.9, "seed": 12}),
    ("gradually", {"extra_body": {"repetition_penalty": 1.3}}, {"repetition_penalty": 1.3}),
]


def test_concurrent_streams_match_alone(server, client, ref):
    n_tokens = 48
    expected = []
    for k, (prompt, _, options) in enumerate(MIXED):  # odd ones through chat
        options = dict(options)
        seed = options.pop("seed", 0)
        expected.append(ref(prompt, n_tokens, seed=seed, chat=k % 2 == 1, **options))
    barrier = threading.Barrier(len(MIXED))
    most, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            most[0] = max(most[0], server.batcher.busy)
            time.sleep(0.002)

    def one(k: int):
        prompt, body, _ = MIXED[k]
        barrier.wait()
        return call(client, k % 2 == 1, prompt, n_tokens, True, **body)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(len(MIXED)) as pool:
        results = list(pool.map(one, range(len(MIXED))))
    done.set()
    watcher.join()
    for got, want in zip(results, expected):
        check(got, want)
    assert most[0] >= 2, "the requests never overlapped: the test checked nothing about batching"
    assert wait_for(lambda: server.batcher.busy == 0 and not server.batcher.groups, 10)


# ---- bad requests

DROP = object()
COMPLETION = {"prompt": "The fox", "max_tokens": 4}
CHAT = {"messages": [{"role": "user", "content": "The fox"}], "max_tokens": 4}
BAD = [  # (id, path, changes to a good body, status, param)
    ("unknown-method", "c", {"method": "nope"}, 400, "method"),
    ("unknown-method-chat", "chat", {"method": "nope"}, 400, "method"),
    ("alpha-string", "c", {"alpha": "x"}, 400, "alpha"),
    ("alpha-out-of-range", "c", {"method": "acd", "alpha": 2.0}, 400, "alpha"),
    ("max-tokens-string", "c", {"max_tokens": "5"}, 400, "max_tokens"),
    ("max-tokens-zero", "c", {"max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-float", "c", {"max_tokens": 5.5}, 400, "max_tokens"),
    ("temperature-bool", "c", {"temperature": True}, 400, "temperature"),
    ("temperature-negative", "c", {"temperature": -1}, 400, "temperature"),
    ("top-p-zero", "c", {"top_p": 0}, 400, "top_p"),
    ("amateur-layer-out-of-range", "c", {"method": "acd", "amateur_layer": 99}, 400, "amateur_layer"),
    ("amateur-layer-word", "c", {"method": "acd", "amateur_layer": "middle"}, 400, "amateur_layer"),
    ("dola-layers-strings", "c", {"method": "dola", "dola_layers": ["a"]}, 400, "dola_layers"),
    ("repetition-penalty-zero", "c", {"repetition_penalty": 0}, 400, "repetition_penalty"),
    ("unknown-field", "c", {"bogus": 1}, 400, "bogus"),
    ("messages-in-completions", "c", {"messages": CHAT["messages"]}, 400, "messages"),
    ("prompt-in-chat", "chat", {"prompt": "x"}, 400, "prompt"),
    ("presence-penalty", "c", {"presence_penalty": 1}, 400, "presence_penalty"),
    ("frequency-penalty", "chat", {"frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("n-2", "c", {"n": 2}, 400, "n"),
    ("n-2-chat", "chat", {"n": 2}, 400, "n"),
    ("echo", "c", {"echo": True}, 400, "echo"),
    ("logit-bias", "c", {"logit_bias": {"5": 1}}, 400, "logit_bias"),
    ("best-of", "c", {"best_of": 3}, 400, "best_of"),
    ("tools", "chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("context-overflow", "c", {"max_tokens": SEQ}, 400, "max_tokens"),
    ("context-overflow-chat", "chat", {"max_tokens": SEQ}, 400, "max_tokens"),
    ("context-overflow-chat-completion-tokens", "chat", {"max_completion_tokens": SEQ}, 400,
     "max_completion_tokens"),
    ("prompt-too-long", "c", {"prompt": "#" * 600}, 400, "prompt"),
    ("prompt-too-long-chat", "chat", {"messages": [{"role": "user", "content": "#" * 600}]}, 400, "messages"),
    ("prompt-missing", "c", {"prompt": DROP}, 400, "prompt"),
    ("prompt-number", "c", {"prompt": 5}, 400, "prompt"),
    ("prompt-two", "c", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("prompt-empty", "c", {"prompt": ""}, 400, "prompt"),
    ("messages-empty", "chat", {"messages": []}, 400, "messages"),
    ("messages-missing", "chat", {"messages": DROP}, 400, "messages"),
    ("messages-string", "chat", {"messages": "hi"}, 400, "messages"),
    ("message-bad-role", "chat", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    ("message-no-content", "chat", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("message-number-content", "chat", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ("message-image-part", "chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages"),
    ("message-not-object", "chat", {"messages": ["hi"]}, 400, "messages"),
    ("wrong-model", "c", {"model": "gpt-4"}, 404, "model"),
    ("wrong-model-chat", "chat", {"model": "gpt-4"}, 404, "model"),
    ("unknown-exit-heads", "c", {"exit_heads": "lens"}, 400, "exit_heads"),
    ("logprobs-6", "c", {"logprobs": 6}, 400, "logprobs"),
    ("logprobs-negative", "c", {"logprobs": -1}, 400, "logprobs"),
    ("chat-logprobs-number", "chat", {"logprobs": 3}, 400, "logprobs"),
    ("chat-top-logprobs-21", "chat", {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("top-logprobs-without-logprobs", "chat", {"top_logprobs": 2}, 400, "top_logprobs"),
    ("cd-without-amateur", "c", {"method": "cd"}, 400, "method"),
    ("seed-negative", "c", {"seed": -1}, 400, "seed"),
    ("seed-huge", "c", {"seed": 2**63}, 400, "seed"),
    ("stop-empty", "c", {"stop": ""}, 400, "stop"),
    ("stop-number", "c", {"stop": [1]}, 400, "stop"),
    ("stop-too-many", "c", {"stop": [f"s{k}" for k in range(17)]}, 400, "stop"),
    ("stream-string", "c", {"stream": "yes"}, 400, "stream"),
    ("alpha-with-greedy", "c", {"alpha": 0.2}, 400, "alpha"),
    ("amateur-layer-with-dola", "chat", {"method": "dola", "amateur_layer": 2}, 400, "amateur_layer"),
    ("dola-layers-with-acd", "c", {"method": "acd", "dola_layers": "low"}, 400, "dola_layers"),
    ("beta-with-acd", "c", {"method": "acd", "beta": 0.5}, 400, "beta"),
    ("contrast-special-with-dola", "c", {"method": "dola", "contrast_special": True}, 400, "contrast_special"),
    ("amateur-layer-when-sampling", "c", {"temperature": 0.7, "amateur_layer": 2}, 400, "amateur_layer"),
]


@pytest.mark.parametrize("path, changes, status, param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request(path, changes, status, param, web):
    body = dict(COMPLETION if path == "c" else CHAT)
    for k, v in changes.items():
        if v is DROP:
            del body[k]
        else:
            body[k] = v
    r = web.post("/v1/completions" if path == "c" else "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS and error["code"] is None
    assert error["param"] == param, error
    assert isinstance(error["message"], str) and param in error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_no_op_fields_at_their_neutral_value(web, ref):
    body = COMPLETION | {"presence_penalty": 0, "frequency_penalty": 0.0, "n": 1, "echo": False, "best_of": 1,
                         "logit_bias": {}, "suffix": "", "user": "u", "metadata": {"a": "b"}, "model": MODEL_ID,
                         "seed": None, "temperature": None, "stop": None, "logprobs": None}
    r = web.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == ref("The fox", 4).text
    body = CHAT | {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "store": False,
                   "parallel_tool_calls": True, "max_completion_tokens": None}
    r = web.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == ref("The fox", 4, chat=True).text


def test_openai_client_raises_with_param(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_ID, prompt="x", max_tokens=4, extra_body={"method": "nope"})
    assert e.value.status_code == 400 and e.value.param == "method"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}], max_tokens=4)
    assert e.value.param == "model"


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"", b"[1, 2]", b'"text"', b"null"],
                         ids=["broken", "not-utf8", "empty", "array", "string", "null"])
def test_body_not_a_json_object(content, web):
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = web.post(path, content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert set(error) == ERROR_KEYS and error["param"] is None and error["message"].startswith("body:")


def test_body_too_large(server, web):
    routes = server.routes
    assert routes.max_body == 1 << 20
    try:
        routes.max_body = 2000
        big = json.dumps({"prompt": "#" * 3000, "max_tokens": 4}).encode()
        r = web.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert set(r.json()["error"]) == ERROR_KEYS

        def chunked():  # no content-length: the size is counted as the body arrives
            for k in range(0, len(big), 500):
                yield big[k:k + 500]

        r = web.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers
        assert r.status_code == 413, r.text
        assert set(r.json()["error"]) == ERROR_KEYS
        # under the limit it is read (and then refused for its length in tokens)
        r = web.post("/v1/completions", json={"prompt": "#" * 1500, "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    finally:
        routes.max_body = 1 << 20
    r = web.post("/v1/completions", content=b"{" + b" " * ((1 << 20) + 10) + b"}",
                 headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_unknown_route_and_wrong_method(web):
    for method, path, status in [("GET", "/nope", 404), ("POST", "/v1/nope", 404), ("GET", "/v1", 404),
                                 ("GET", "/v1/completions", 405), ("GET", "/v1/chat/completions", 405),
                                 ("POST", "/health", 405), ("DELETE", "/v1/models", 405)]:
        r = web.request(method, path)
        assert r.status_code == status, (method, path, r.text)
        error = r.json()["error"]
        assert set(error) == ERROR_KEYS and path in error["message"]


def test_server_still_serves_after_errors(server, client, ref):
    assert server.batcher.busy == 0
    check(call(client, False, PROMPT, 8, False), ref(PROMPT, 8))


# ---- API key


def test_api_key(model_dir, ref):
    with running(model_dir, api_key="k") as live, httpx.Client(base_url=live.url, timeout=60) as web:
        assert web.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k"}, {"Authorization": "Bearer kk"},
                        {"Authorization": "Basic k"}):
            r = web.get("/v1/models", headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error"]["type"] == "authentication_error" and set(r.json()["error"]) == ERROR_KEYS
            for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
                r = web.post(path, json=body, headers=headers)
                assert r.status_code == 401, (path, headers, r.text)
            r = web.post("/v1/completions", content=b"{not json", headers=headers)
            assert r.status_code == 401  # the key is checked before the body is read
        ok = {"Authorization": "Bearer k"}
        r = web.get("/v1/models", headers=ok)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL_ID
        r = web.post("/v1/completions", json=COMPLETION, headers=ok)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref("The fox", 4).text
        with live.client("k") as c:
            check(call(c, True, PROMPT, 6, True), ref(PROMPT, 6, chat=True))
        with live.client("wrong") as c, pytest.raises(openai.AuthenticationError):
            c.models.list()


# ---- exit heads by name


def test_exit_heads_from_the_allow_list(model_dir, ref, tmp_path):
    """A request names one of the server's --heads; it decodes as Engine.generate given that file."""
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": TEXT}) + "\n" for _ in range(8)))
    fit = heads.fit_lens(ref.engine, [data], (2, ref.engine.n_layers), max_tokens=800, progress=False)
    lens = heads.save_exit_heads(tmp_path / "lens.safetensors", ref.engine.model, "lens", fit["tensors"], fit["info"])
    options = {"method": "acd", "amateur_layer": 2, "alpha": 0.2}
    with running(model_dir, exit_heads={"lens": str(lens)}) as live, live.client() as c:
        with_lens = call(c, False, PROMPT, 16, False, extra_body=options | {"exit_heads": "lens"})
        check(with_lens, ref(PROMPT, 16, exit_heads=str(lens), **options))
        check(call(c, True, PROMPT, 16, True, extra_body=options | {"exit_heads": "lens"}),
              ref(PROMPT, 16, chat=True, exit_heads=str(lens), **options))
        check(call(c, False, PROMPT, 16, False, extra_body=options), ref(PROMPT, 16, **options))
        r = httpx.post(f"{live.url}/v1/completions", json={"prompt": PROMPT, "exit_heads": str(lens), **options})
        assert r.status_code == 400 and r.json()["error"]["param"] == "exit_heads"  # a path is never taken
        assert "lens" in r.json()["error"]["message"]


# ---- disconnects


@pytest.fixture
def submitted(server, monkeypatch):
    """The batcher's requests from now on, each with the events the loop emitted to it."""
    seen = []
    original = server.batcher.submit

    def submit(request):
        events, emit = [], request.emit

        def record(event):
            events.append(event)
            emit(event)

        request.emit = record
        seen.append((request, events))
        original(request)

    monkeypatch.setattr(server.batcher, "submit", submit)
    return seen


def test_disconnect_mid_stream_frees_the_row(server, web, client, ref, submitted):
    body = {"prompt": "The fox", "max_tokens": 240, "stream": True}
    assert len(ref.engine.encode_prompt("The fox")) + 240 <= SEQ
    with web.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        got = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[6:]))
                if len(got) == 2:
                    break
        assert all(c["choices"][0]["finish_reason"] is None for c in got)
    assert wait_for(lambda: server.batcher.busy == 0, 10), "the disconnected stream's row was not freed"
    (request, events), = submitted
    assert request.cancelled
    assert not any(e.get("done") for e in events), "it ran to the end: the disconnect freed nothing"
    assert wait_for(lambda: not server.batcher.groups, 5)
    check(call(client, False, PROMPT, 12, True), ref(PROMPT, 12))
    check(call(client, True, PROMPT, 12, False), ref(PROMPT, 12, chat=True))


def test_disconnect_while_waiting_for_a_whole_reply(server, web, client, ref, submitted, monkeypatch):
    step_for = server.batcher.step_for

    def slowed(dc, batch):  # 240 steps take over a second however fast the machine: the client leaves first
        step = step_for(dc, batch)
        return lambda *args: (time.sleep(0.005), step(*args))[1]

    monkeypatch.setattr(server.batcher, "step_for", slowed)
    with pytest.raises(httpx.ReadTimeout):
        web.post("/v1/completions", json={"prompt": "The fox", "max_tokens": 240}, timeout=0.3)
    assert wait_for(lambda: server.batcher.busy == 0, 10), "the abandoned request's row was not freed"
    (request, events), = submitted
    assert request.cancelled and not any(e.get("done") for e in events)
    check(call(client, False, "Layers improve", 12, False), ref("Layers improve", 12))


# ---- queue full


def test_queue_full_is_503(model_dir, ref):
    expected = ref(PROMPT, 200)
    with running(model_dir, max_batch=1, max_queue=1, max_groups=1) as live, \
            httpx.Client(base_url=live.url, timeout=120, limits=httpx.Limits(max_connections=20)) as web:
        barrier = threading.Barrier(6)

        def one(_):
            barrier.wait()
            return web.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 200})

        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(one, range(6)))
        busy = [r for r in replies if r.status_code == 503]
        ok = [r for r in replies if r.status_code != 503]
        assert busy, [r.status_code for r in replies]
        assert ok
        for r in busy:
            assert r.headers["retry-after"] == "1"
            error = r.json()["error"]
            assert set(error) == ERROR_KEYS and error["type"] == "server_busy"
        for r in ok:
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == expected.text
            assert r.json()["usage"]["completion_tokens"] == len(expected.token_ids)
        assert wait_for(lambda: live.batcher.busy == 0, 10)
        for _ in range(3):  # one at a time never finds the queue full
            r = web.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref(PROMPT, 8).text
        assert len(live.batcher.spare["model"]) <= 1


# ---- logprobs


def model_logprobs(tiny_dir, ids: list[int]) -> torch.Tensor:
    """The transformers model's log-softmax over its next-token logits at every position of `ids`."""
    hf = tiny_dir("llama-untied")[1]
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_logprobs_greedy(stream, client, ref, tiny_dir):
    expected = ref(PROMPT, 12, chat=True)
    reply = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=12, logprobs=True, top_logprobs=5, stream=stream)
    if stream:
        content, text = [], ""
        for chunk in reply:
            if chunk.choices and chunk.choices[0].logprobs is not None:
                content += chunk.choices[0].logprobs.content or []
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
    else:
        content, text = reply.choices[0].logprobs.content, reply.choices[0].message.content
    assert text == expected.text
    ids = [t for t in expected.token_ids if t not in ref.engine.eos_ids]
    assert len(content) == len(ids)
    prompt = ref.engine.encode_prompt(PROMPT, chat=True)
    logp = model_logprobs(tiny_dir, prompt + ids)
    tok = ref.engine.tokenizer
    for k, (entry, token) in enumerate(zip(content, ids)):
        row = logp[len(prompt) + k - 1]
        assert len(entry.top_logprobs) == 5
        assert entry.token == tok.decode([token], skip_special_tokens=False) == entry.top_logprobs[0].token
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob == entry.top_logprobs[0].logprob == max(t.logprob for t in entry.top_logprobs)
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-3)
        assert values == pytest.approx(row.topk(5).values.tolist(), abs=1e-3)


def test_chat_logprobs_without_alternatives(web, ref):
    r = web.post("/v1/chat/completions", json=CHAT | {"max_tokens": 6, "logprobs": True})
    assert r.status_code == 200
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"] and all(e["top_logprobs"] == [] for e in content)
    r = web.post("/v1/chat/completions", json=CHAT | {"max_tokens": 6, "logprobs": False})
    assert r.json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("method", ["greedy", "acd", "dola", "repetition-penalty"])
def test_completions_logprobs(method, client, ref):
    body, options = METHODS[method]
    expected = ref(PROMPT, 16, **options)
    reply = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=16, logprobs=3, **body)
    choice = reply.choices[0]
    assert choice.text == expected.text
    lp = choice.logprobs
    n = len([t for t in expected.token_ids if t not in ref.engine.eos_ids])
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    tok = ref.engine.tokenizer
    ids = [t for t in expected.token_ids if t not in ref.engine.eos_ids]
    assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in ids]
    assert lp.text_offset == [sum(len(s) for s in lp.tokens[:k]) for k in range(n)]
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3  # (tokens that decode alike share a key)
        assert all(v <= 0 and (math.isfinite(v) or v == NEG_INF_LOGPROB) for v in top.values())
        assert chosen <= 0 and (math.isfinite(chosen) or chosen == NEG_INF_LOGPROB)
        assert chosen == max(top.values())  # argmax decoding picks the distribution's best token


def test_dola_logprobs_clamped(web, ref):
    """DoLa's tokens outside the plausible set score -inf: -9999.0 in JSON, never -inf or NaN."""
    options = {"method": "dola", "dola_layers": "low", "alpha": 0.95}
    r = web.post("/v1/chat/completions", json=CHAT | {"max_tokens": 8, "logprobs": True, "top_logprobs": 20} | options)
    assert r.status_code == 200
    json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert r.json()["choices"][0]["message"]["content"] == ref("The fox", 8, chat=True, **options).text
    values = [t["logprob"] for e in content for t in e["top_logprobs"]]
    assert all(v <= 0 and (math.isfinite(v) and v >= NEG_INF_LOGPROB) for v in values)
    assert NEG_INF_LOGPROB in values  # alpha 0.95 leaves fewer than 20 plausible
    for e in content:
        assert e["logprob"] == e["top_logprobs"][0]["logprob"] > NEG_INF_LOGPROB


def test_acd_logprobs_are_a_distribution(web, ref):
    """ACD's scores are a full distribution (p_e off the plausible set): its top 20 are all finite."""
    options = {"method": "acd", "amateur_layer": 2, "alpha": 0.5}
    r = web.post("/v1/chat/completions", json=CHAT | {"max_tokens": 8, "logprobs": True, "top_logprobs": 20} | options)
    assert r.status_code == 200
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert r.json()["choices"][0]["message"]["content"] == ref("The fox", 8, chat=True, **options).text
    for e in content:
        assert len(e["top_logprobs"]) == 20 and all(NEG_INF_LOGPROB < t["logprob"] <= 0 for t in e["top_logprobs"])
        assert e["logprob"] == e["top_logprobs"][0]["logprob"]


# ---- state stays flat


def test_many_mixed_requests_leave_nothing_behind(server, client, web, ref):
    batcher = server.batcher
    bodies = [({}, {}), *[METHODS[m] for m in ("acd", "dola", "sample", "repetition-penalty")]]
    prompts = ["The fox", PROMPT, "Layers improve", "0123"]
    jobs = [(k, prompts[k % 4], *bodies[k % 5]) for k in range(50)]
    before = batcher.served

    def one(job):
        k, prompt, body, options = job
        if k % 7 == 3:  # a stream abandoned after its first chunk
            extra = body.get("extra_body", {}) | {k2: v for k2, v in body.items() if k2 != "extra_body"}
            with web.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 100, "stream": True,
                                                             **extra}) as r:
                assert r.status_code == 200
                next(r.iter_lines())
            return None
        return call(client, k % 2 == 0, prompt, 10, k % 3 == 0, **body)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, jobs))
    for (k, prompt, _, options), got in zip(jobs, results):
        if got is not None:
            options = dict(options)
            seed = options.pop("seed", 0)
            check(got, ref(prompt, 10, seed=seed, chat=k % 2 == 0, **options))
    assert wait_for(lambda: batcher.busy == 0 and not batcher.groups, 10), (batcher.busy, len(batcher.groups))
    assert not batcher.pending
    assert len(batcher.spare["model"]) <= batcher.max_groups
    assert batcher.spare["amateur"] == []
    assert before + 43 <= batcher.served <= before + 50
    assert web.get("/health").json() == {"status": "ok", "busy": 0}


# ---- compiled steps


def test_compiled_server(model_dir, ref):
    """Each (config, batch size) decodes eagerly for compile_after steps, then through the compiled graph."""
    with running(model_dir, compiled=True, compile_after=3) as live, live.client() as c:
        compiled_step, calls = live.engine._step, [0]

        def counted(*args):
            calls[0] += 1
            return compiled_step(*args)

        live.engine._step = counted
        check(call(c, False, PROMPT, 8, False), ref(PROMPT, 8))
        assert calls[0] == 8 - 1 - 3  # the prefill's token, 3 eager steps, then compiled
        check(call(c, True, "Layers improve", 8, True), ref("Layers improve", 8, chat=True))
        assert calls[0] == 4 + 7
        limits = []  # Dynamo's settings are per thread: the loop's allows a graph per (config, batch)
        done = threading.Event()
        request = Request(ref.engine.encode_prompt(PROMPT), ref.engine.decode_config(), 2, lambda e: (
            limits.append(torch._dynamo.config.recompile_limit), e.get("done") and done.set()))
        live.batcher.submit(request)
        assert done.wait(30) and min(limits) > MAX_GRAPHS


# ---- SIGTERM drains


def test_sigterm_drains_in_flight_request(model_dir, ref, tmp_path):
    """SIGTERM: the listening socket closes, the running request finishes in full, the process exits 143 (uvicorn
    re-raises the signal after its drain; the CLI answers SIGTERM with 143 and one line)."""
    port = free_port()
    log = tmp_path / "serve.log"
    expected = ref(PROMPT, 200)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lcdfast.cli", "serve", "--model", str(model_dir), "--port",
                                 str(port), "--no-compile", "--max-seq-len", str(SEQ), "--model-id", MODEL_ID],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def health():
            try:
                return httpx.get(f"{url}/health", timeout=2).json()
            except httpx.TransportError:
                assert proc.poll() is None, log.read_text()
                return None

        assert wait_for(lambda: health() is not None, 60, every=0.1), log.read_text()
        result = {}

        def post():
            result["reply"] = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 200},
                                         timeout=60)

        thread = threading.Thread(target=post, daemon=True)
        thread.start()
        assert wait_for(lambda: (health() or {}).get("busy", 0) > 0, 30, every=0.005), "the request never ran"
        proc.send_signal(signal.SIGTERM)
        thread.join(60)
        reply = result["reply"]
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == expected.text
        assert reply.json()["usage"]["completion_tokens"] == len(expected.token_ids) == 200
        assert proc.wait(30) == 143, log.read_text()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)
        text = log.read_text()
        assert "lcdfast: serving tiny on" in text and "lcdfast: terminated" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
