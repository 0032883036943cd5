"""`lcdfast serve`: an OpenAI-compatible HTTP API (starlette on uvicorn: the `serve` extra) over batching.Batcher.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health. The contrast options are
extra body fields with the CLI's names. Bad requests get 400 (401, 404, 413, 503) and an OpenAI-style JSON body
{"error": {"message", "type", "param", "code"}} naming the field.
"""

import asyncio
import json
import math
import secrets
import time

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .batching import COMPILE_AFTER, Batcher, QueueFull, Request
from .errors import LcdError
from .generate import METHODS

# the contrast options a request may set, with the JSON types each takes (None: null allowed)
OPTIONS = {"method": (str,), "amateur_layer": (int, str, None), "dola_layers": (str, list, None), "alpha": (float,),
           "beta": (float, None), "repetition_penalty": (float,), "top_k": (int,), "min_tokens_to_keep": (int,),
           "amateur_temperature": (float,), "exit_norm": (bool, None), "contrast_special": (bool,),
           "exit_heads": (str, None), "do_sample": (bool, None)}
# the contrast options only some methods read: given to another, a request is refused rather than silently run
TAKEN_BY = {"amateur_layer": ("acd",), "dola_layers": ("dola",), "alpha": ("acd", "dola", "cd"),
            "min_tokens_to_keep": ("acd", "dola", "cd"), "beta": ("cd",), "amateur_temperature": ("cd",),
            "exit_norm": ("acd", "dola"), "exit_heads": ("acd", "dola"), "contrast_special": ("acd", "cd")}
# OpenAI fields taken as they are or ignored (user, metadata, ...), and those accepted only at their no-op value
COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options", "logprobs",
          "user", "metadata", "store", "service_tier", "parallel_tool_calls"}
NO_OP = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "best_of": (1,),
         "echo": (False,), "suffix": ("",), "tools": ([],), "tool_choice": ("none",),
         "response_format": ({"type": "text"},)}
COMPLETIONS = COMMON | {"prompt"}
CHAT = COMMON | {"messages", "top_logprobs", "max_completion_tokens"}
MAX_STOPS = 16
DISCONNECT_POLL_S = 0.2  # how often a whole (unstreamed) reply checks that its client is still there
NEG_INF_LOGPROB = -9999.0  # JSON has no -inf: tokens outside the method's plausible set


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def typed(body: dict, name: str, kinds: tuple, default=None):
    """body[name] if its JSON type is one of `kinds` (float: any number; None: null), else an ApiError naming it."""
    if name not in body:
        return default
    value = body[name]
    ok = any(value is None if k is None else
             isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) if k is float else
             isinstance(value, int) and not isinstance(value, bool) if k is int else isinstance(value, k)
             for k in kinds)
    if not ok:
        names = {None: "null", float: "number", int: "integer", str: "string", bool: "boolean", list: "array",
                 dict: "object"}
        raise ApiError(400, f"{name}: {json.dumps(value)[:60]} must be {' or '.join(names[k] for k in kinds)}", name)
    return default if value is None else value


class Server:
    """The routes' state: the engine's batcher, the served model's id, the API key and limits."""

    def __init__(self, batcher: Batcher, model_id: str, api_key: str | None = None, max_body: int = 1 << 20,
                 exit_heads: dict[str, str] | None = None) -> None:
        self.batcher, self.engine, self.model_id = batcher, batcher.engine, model_id
        self.api_key, self.max_body = api_key, max_body
        self.exit_heads = exit_heads or {}  # names a request may give as exit_heads -> their files
        self.created = int(time.time())

    def app(self) -> Starlette:
        routes = [Route("/health", self.health), Route("/v1/models", self.models),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"])]
        return Starlette(routes=routes, exception_handlers={404: self.not_found, 405: self.not_allowed})

    async def not_found(self, request: HttpRequest, exc) -> Response:
        return ApiError(404, f"no route {request.url.path}", kind="not_found_error").response()

    async def not_allowed(self, request: HttpRequest, exc) -> Response:
        return ApiError(405, f"{request.method} not allowed on {request.url.path}").response()

    async def health(self, request: HttpRequest) -> Response:
        return JSONResponse({"status": "draining" if self.batcher.draining else "ok", "busy": self.batcher.busy})

    def check_key(self, request: HttpRequest) -> None:
        if self.api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", kind="authentication_error")

    async def models(self, request: HttpRequest) -> Response:
        try:
            self.check_key(request)
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "lcdfast"}]})

    async def completions(self, request: HttpRequest) -> Response:
        return await self.handle(request, chat=False)

    async def chat(self, request: HttpRequest) -> Response:
        return await self.handle(request, chat=True)

    async def read_body(self, request: HttpRequest) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise ApiError(413, f"request body of {declared} bytes exceeds {self.max_body}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise ApiError(413, f"request body exceeds {self.max_body} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"body: not JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body: must be a JSON object")
        return body

    async def handle(self, http: HttpRequest, chat: bool) -> Response:
        try:
            self.check_key(http)
            body = await self.read_body(http)
            job = await asyncio.to_thread(self.parse, body, chat)  # tokenizing and templates off the event loop
            events: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            request = Request(job["ids"], job["dc"], job["max_tokens"], lambda e: loop.call_soon_threadsafe(
                events.put_nowait, e), job["seed"], job["stop"])
            try:
                self.batcher.submit(request)
            except QueueFull as e:
                raise ApiError(503, f"server busy: {e}", kind="server_busy", headers={"Retry-After": "1"}) from None
        except ApiError as e:
            return e.response()
        reply = Reply(self, job, chat)
        if job["stream"]:
            return StreamingResponse(self.stream(reply, request, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            checked = time.monotonic()
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    event = None
                if time.monotonic() - checked >= DISCONNECT_POLL_S:  # whether tokens arrive or not
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        return Response(status_code=499)  # nobody reads it; the row is freed below
                if event is None:
                    continue
                if "error" in event:
                    return ApiError(500, event["error"], kind="server_error").response()
                reply.add(event)
                if event.get("done"):
                    return JSONResponse(reply.whole())
        finally:
            request.cancelled = True  # a no-op once done; a disconnect or cancellation frees the row

    async def stream(self, reply: "Reply", request: Request, events: asyncio.Queue):
        try:
            if reply.chat:
                yield sse(reply.chunk(first=True))
            while True:
                event = await events.get()
                if "error" in event:
                    yield sse({"error": {"message": event["error"], "type": "server_error", "param": None,
                                         "code": None}})
                    break
                yield sse(reply.chunk(event))
                if event.get("done"):
                    if reply.job["include_usage"]:
                        yield sse(reply.usage_chunk())
                    break
            yield b"data: [DONE]\n\n"
        finally:
            request.cancelled = True  # starlette cancels this generator when the client disconnects

    def parse(self, body: dict, chat: bool) -> dict:
        """A request body -> what the batcher needs (ids, DecodeConfig, limits), or an ApiError naming the field."""
        allowed = (CHAT if chat else COMPLETIONS) | set(OPTIONS) | set(NO_OP)
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(400, f"{unknown[0]}: unknown field", unknown[0])
        for name, neutral in NO_OP.items():
            if body.get(name) is not None and body[name] not in neutral:
                raise ApiError(400, f"{name}: {json.dumps(body[name])[:60]} is not supported (only "
                               f"{json.dumps(neutral[0])} or null)", name)
        model = typed(body, "model", (str, None))
        if model is not None and model != self.model_id:
            raise ApiError(404, f"model: '{model[:80]}' is not served here (this server has '{self.model_id}')",
                           "model", kind="not_found_error")
        if typed(body, "n", (int, None), 1) != 1:
            raise ApiError(400, "n: only 1 completion per request", "n")
        stream = typed(body, "stream", (bool, None), False)
        stream_options = typed(body, "stream_options", (dict, None), {})
        include_usage = typed(stream_options, "include_usage", (bool, None), False) if stream_options else False
        ids = self.prompt_ids(body, chat)
        room = self.batcher.max_seq_len - len(ids)
        if room < 1:
            raise ApiError(400, f"{'messages' if chat else 'prompt'}: {len(ids)} tokens leave no room in the "
                           f"context of {self.batcher.max_seq_len}", "messages" if chat else "prompt")
        limit_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
            else "max_tokens"
        max_tokens = typed(body, limit_name, (int, None), room if chat else min(16, room))
        if max_tokens < 1:
            raise ApiError(400, f"{limit_name}: {max_tokens} must be >= 1", limit_name)
        if max_tokens > room:
            raise ApiError(400, f"{limit_name}: {len(ids)} prompt tokens + {max_tokens} exceed the context of "
                           f"{self.batcher.max_seq_len} tokens", limit_name)
        stop = typed(body, "stop", (str, list, None), [])
        stop = [stop] if isinstance(stop, str) else stop
        if len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, f"stop: at most {MAX_STOPS} non-empty strings", "stop")
        seed = typed(body, "seed", (int, None))
        if seed is not None and not 0 <= seed < 2**63:
            raise ApiError(400, f"seed: {seed} outside 0..2**63-1", "seed")
        top_logprobs = self.logprobs_asked(body, chat)
        options = self.options(body)
        try:
            dc = self.batcher.decode_config(**options)
        except LcdError as e:
            field = str(e).split(":")[0]
            raise ApiError(400, str(e), field if field in body else None) from None
        if top_logprobs is not None:
            dc = dc.__class__(**{**dc.__dict__, "logprobs": True})
        return {"ids": ids, "dc": dc, "max_tokens": max_tokens, "stop": stop, "seed": seed, "stream": stream,
                "include_usage": include_usage, "top_logprobs": top_logprobs, "created": int(time.time()),
                "id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)}

    def prompt_ids(self, body: dict, chat: bool) -> list[int]:
        try:
            if not chat:
                prompt = typed(body, "prompt", (str, list))
                if isinstance(prompt, list):
                    if len(prompt) != 1 or not isinstance(prompt[0], str):
                        raise ApiError(400, "prompt: a string or a list of one string", "prompt")
                    prompt = prompt[0]
                if prompt is None:
                    raise ApiError(400, "prompt: required", "prompt")
                return self.engine.encode_prompt(prompt)
            messages = typed(body, "messages", (list,))
            if not messages:
                raise ApiError(400, "messages: a non-empty list of {role, content} is required", "messages")
            turns = []
            for k, m in enumerate(messages):
                role = m.get("role") if isinstance(m, dict) else None
                content = m.get("content") if isinstance(m, dict) else None
                if isinstance(content, list):  # content parts: only text
                    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                               for p in content):
                        raise ApiError(400, f"messages[{k}].content: only text parts are supported", "messages")
                    content = "".join(p["text"] for p in content)
                if role not in ("system", "developer", "user", "assistant") or not isinstance(content, str):
                    raise ApiError(400, f"messages[{k}]: needs a role (system, user, assistant) and string content",
                                   "messages")
                turns.append({"role": "system" if role == "developer" else role, "content": content})
            return self.engine.encode_prompt(turns, chat=True)
        except LcdError as e:
            raise ApiError(400, str(e), "messages" if chat else "prompt") from None

    def logprobs_asked(self, body: dict, chat: bool) -> int | None:
        """How many alternatives per token the reply lists (0: the chosen token's only); None: no logprobs."""
        if chat:
            if not typed(body, "logprobs", (bool, None), False):
                if body.get("top_logprobs") is not None:
                    raise ApiError(400, "top_logprobs: needs logprobs true", "top_logprobs")
                return None
            k = typed(body, "top_logprobs", (int, None), 0)
            if not 0 <= k <= 20:
                raise ApiError(400, f"top_logprobs: {k} outside 0..20", "top_logprobs")
            return k
        k = typed(body, "logprobs", (int, None))
        if k is not None and not 0 <= k <= 5:
            raise ApiError(400, f"logprobs: {k} outside 0..5", "logprobs")
        return k

    def options(self, body: dict) -> dict:
        """Engine.decode_config's keywords from the body: the contrast options, temperature and top_p. A request
        samples when its temperature is above 0 (or do_sample is true), else decodes by argmax."""
        options = {name: typed(body, name, kinds) for name, kinds in OPTIONS.items() if body.get(name) is not None}
        if isinstance(options.get("dola_layers"), list) and not all(
                isinstance(j, int) and not isinstance(j, bool) for j in options["dola_layers"]):
            raise ApiError(400, "dola_layers: low, high, 'i,j,k' or a list of layer indices", "dola_layers")
        if "exit_heads" in options:
            name = options["exit_heads"]
            if name and name not in self.exit_heads:
                allowed = ", ".join(sorted(self.exit_heads)) or "none"
                raise ApiError(400, f"exit_heads: '{name[:80]}' is not one of this server's ({allowed})",
                               "exit_heads")
            options["exit_heads"] = self.exit_heads.get(name, "")
        temperature = typed(body, "temperature", (float, None))
        if temperature is not None:
            options["temperature"] = temperature
            if temperature > 0 and "do_sample" not in options:
                options["do_sample"] = True
                options.setdefault("method", "sample")
        top_p = typed(body, "top_p", (float, None))
        if top_p is not None:
            options["top_p"] = top_p
        method = options.get("method", "greedy")
        for name, methods in TAKEN_BY.items():
            if name in options and method in METHODS and method not in methods:
                raise ApiError(400, f"{name}: method {method} doesn't take it (only {', '.join(methods)})", name)
        if options.get("method") == "cd" and self.engine.amateur is None:
            raise ApiError(400, "method: cd needs a server started with --amateur-model", "method")
        return options


def sse(obj: dict | bytes) -> bytes:
    return obj if isinstance(obj, bytes) else b"data: " + json.dumps(obj).encode() + b"\n\n"


class Reply:
    """One request's response bodies: the whole one, or its stream's chunks, in OpenAI's formats."""

    def __init__(self, server: Server, job: dict, chat: bool) -> None:
        self.server, self.job, self.chat = server, job, chat
        self.logprobs: list[dict] = []
        self.done: dict = {}
        self.offset = 0  # completions' text_offset

    def add(self, event: dict) -> None:
        self.logprobs += event.get("logprobs", [])
        if event.get("done"):
            self.done = event

    def head(self, kind: str) -> dict:
        return {"id": self.job["id"], "object": kind, "created": self.job["created"], "model": self.server.model_id}

    def usage(self) -> dict:
        done = self.done
        completion = len(done["token_ids"])
        return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": completion,
                "total_tokens": done["prompt_tokens"] + completion}

    def finish_reason(self) -> str:
        return "length" if self.done["finish_reason"] == "length" else "stop"

    def token_text(self, token_id: int) -> str:
        return self.server.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    def logprobs_body(self, tokens: list[dict]) -> dict | None:
        k = self.job["top_logprobs"]
        if k is None:
            return None
        finite = lambda x: x if x > NEG_INF_LOGPROB else NEG_INF_LOGPROB
        if self.chat:
            return {"content": [{"token": (s := self.token_text(t["id"])), "logprob": finite(t["logprob"]),
                                 "bytes": list(s.encode()),
                                 "top_logprobs": [{"token": (a := self.token_text(i)), "logprob": finite(v),
                                                   "bytes": list(a.encode())} for i, v in t["top"][:k]]}
                                for t in tokens]}
        texts = [self.token_text(t["id"]) for t in tokens]
        offsets = []
        for s in texts:
            offsets.append(self.offset)
            self.offset += len(s)
        return {"tokens": texts, "token_logprobs": [finite(t["logprob"]) for t in tokens],
                "top_logprobs": [self.top_dict(t["top"][:k], finite) for t in tokens],
                "text_offset": offsets}

    def top_dict(self, top: list, finite) -> dict[str, float]:
        """The legacy {text: logprob} form; of tokens that decode alike (partial UTF-8 bytes) the best one's."""
        best = {}
        for i, v in top:  # best first
            best.setdefault(self.token_text(i), finite(v))
        return best

    def extra(self) -> dict:
        layers = self.done.get("dola_layers")
        return {} if layers is None else {"dola_layers": layers}

    def whole(self) -> dict:
        choice = {"index": 0, "logprobs": self.logprobs_body(self.logprobs), "finish_reason": self.finish_reason()}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": self.done["text"]}
        else:
            choice["text"] = self.done["text"]
        return {**self.head("chat.completion" if self.chat else "text_completion"), "choices": [choice | self.extra()],
                "usage": self.usage()}

    def chunk(self, event: dict | None = None, first: bool = False) -> dict:
        """A stream chunk: the chat's opening role chunk, a text delta, or the last one (finish_reason, usage)."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        if first:
            return {**self.head(kind), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]}
        self.add(event)
        text = event["delta"] if event.get("done") else event["text"]
        choice = {"index": 0, "logprobs": self.logprobs_body(event.get("logprobs", [])), "finish_reason": None}
        if self.chat:
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        out = {**self.head(kind), "choices": [choice]}
        if event.get("done"):
            choice["finish_reason"] = self.finish_reason()
            choice.update(self.extra())
            out["usage"] = self.usage()
        return out

    def usage_chunk(self) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self.head(kind), "choices": [], "usage": self.usage()}


def make_server(engine, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16, max_seq_len: int = 2048,
                max_queue: int = 64, max_groups: int = 4, compiled: bool = True, api_key: str | None = None,
                exit_heads: dict[str, str] | None = None, model_id: str | None = None,
                compile_after: int = COMPILE_AFTER):
    """The uvicorn server (not yet running) and its started batcher. uvicorn.Server.run() serves until SIGTERM or
    Ctrl-C, which close the listening socket and wait for the running requests to finish (the drain)."""
    import uvicorn

    batcher = Batcher(engine, max_batch, max_seq_len, max_queue, max_groups, compiled, compile_after)
    routes = Server(batcher, model_id or engine.model_dir.name, api_key, exit_heads=exit_heads)
    config = uvicorn.Config(routes.app(), host=host, port=port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=None)
    batcher.start()
    return uvicorn.Server(config), batcher
