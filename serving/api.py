"""The HTTP server: OpenAI's /v1/models, /v1/completions and /v1/chat/completions on FastAPI.

Every request resolves its sub-model (`budgets.Family`), is tokenized here, and runs on the scheduler thread
(`engine.Engine`), whose events come back through an asyncio queue; streaming answers are server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .budgets import BudgetError, Family, Resolved, architecture_info
from .engine import Engine, EngineError, Failed, Finished, Job
from .protocol import APIError, ChatRequest, CompletionRequest, completion_body, error_body, new_id, usage
from .sampling import SamplingParams

logger = logging.getLogger("serving")
ROUTES = "GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health"


class Server:
    """What the routes share: the family of sub-models, the tokenizer, the engine and the defaults."""

    def __init__(self, model, tokenizer, name: str, engine: Engine, context: int | None = None,
                 default_max_tokens: int = 256, latency=None):
        self.model, self.tokenizer, self.engine = model, tokenizer, engine
        self.family = Family(model, name, context, latency)
        self.context = self.family.context
        self.default_max_tokens = default_max_tokens
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))

    # ---- turning a request into a job ----
    def prompt_ids(self, request: CompletionRequest | ChatRequest) -> list[int]:
        if isinstance(request, ChatRequest):
            return self._chat_ids(request)
        if isinstance(request.prompt, str):
            return list(self.tokenizer(request.prompt)["input_ids"])
        bad = [t for t in request.prompt if not 0 <= t < self.model.config.vocab_size]
        if bad:
            raise APIError(400, f"prompt token ids {bad[:5]} are outside the vocabulary [0, "
                           f"{self.model.config.vocab_size})", param="prompt")
        return list(request.prompt)

    def _chat_ids(self, request: ChatRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions with a prompt",
                           param="messages", code="no_chat_template")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as err:  # noqa: BLE001 - a template may refuse a conversation (roles out of order...)
            raise APIError(400, f"the chat template refused these messages: {err}", param="messages") from None
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)

    def sampling(self, request, prompt_len: int) -> SamplingParams:
        asked = request.max_completion_tokens if isinstance(request, ChatRequest) else None
        asked = asked or request.max_tokens
        param = "messages" if isinstance(request, ChatRequest) else "prompt"
        room = self.context - prompt_len
        if room <= 0 or (asked is not None and asked > room):
            wanted = f" plus max_tokens {asked}" if asked is not None else ""
            raise APIError(400, f"the prompt has {prompt_len} tokens{wanted}: more than the model's context of "
                           f"{self.context} tokens; shorten the prompt" + (" or lower max_tokens" if asked else ""),
                           param=param, code="context_length_exceeded")
        return SamplingParams(
            max_tokens=asked if asked is not None else min(self.default_max_tokens, room),
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            stop=tuple(request.stop or ()), seed=request.seed, ignore_eos=request.ignore_eos)

    def job(self, request, resolved: Resolved, sink) -> Job:
        ids = self.prompt_ids(request)
        return Job(ids, resolved.arch, self.sampling(request, len(ids)), sink, self.tokenizer, self.eos_ids)

    async def resolve(self, request) -> Resolved:
        # off the event loop: a tps: budget may measure decode speeds the first time it is asked
        return await run_in_threadpool(self.family.resolve, request.model, request.budget)


class _Events:
    """The engine's events for one job, delivered to the event loop (the sink runs on the scheduler thread)."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutting down): nobody is listening
            pass


def _engine_error(err: EngineError) -> APIError:
    return APIError(err.status, err.message, code=err.code, type=err.type)


async def _answer(server: Server, request, chat: bool):
    resolved = await server.resolve(request)
    events = _Events()
    job = server.job(request, resolved, events)
    try:
        server.engine.submit(job)
    except EngineError as err:
        raise _engine_error(err) from None
    extra = {"llamaflex": {"budget": resolved.budget, "architecture": architecture_info(resolved.arch,
                                                                                         server.model.config)}}
    headers = {"x-llamaflex-architecture": f"{resolved.arch.hidden}/{resolved.arch.heads}/{resolved.arch.mlp}/"
                                           f"{resolved.arch.depth}"}
    rid = new_id("chatcmpl" if chat else "cmpl")
    try:
        first = await events.queue.get()  # before answering 200: a queue timeout is still a clean 503
    except asyncio.CancelledError:
        job.cancelled.set()
        raise
    if isinstance(first, Failed):
        raise _engine_error(first.error)
    if request.stream:
        return StreamingResponse(_stream(server, request, job, events, first, rid, resolved, extra, chat),
                                 media_type="text/event-stream", headers=headers)
    return JSONResponse(await _collect(request, job, events, first, rid, resolved, extra, chat), headers=headers)


async def _collect(request, job, events, event, rid, resolved, extra, chat) -> dict:
    text, ids = [], []
    try:
        while not isinstance(event, Finished):
            if isinstance(event, Failed):
                raise _engine_error(event.error)
            text.append(event.text)
            ids += [event.token_id] if event.token_id >= 0 else []
            event = await events.queue.get()
    finally:
        job.cancelled.set()  # (a no-op once finished) the client went away: stop generating
    _log(job, resolved, event)
    body = completion_body(rid, resolved.name, "".join(text), event.reason, extra, chat,
                           token_ids=ids if request.return_token_ids else None)
    body["usage"] = usage(event.prompt_tokens, event.completion_tokens)
    return body


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _stream(server, request, job, events, event, rid, resolved, extra, chat):
    try:
        if chat:
            yield _sse(completion_body(rid, resolved.name, "", None, extra, chat, chunk=True, role=True))
        while not isinstance(event, (Finished, Failed)):
            if event.text or request.return_token_ids:
                ids = [event.token_id] if request.return_token_ids and event.token_id >= 0 else None
                yield _sse(completion_body(rid, resolved.name, event.text, None, extra, chat, chunk=True,
                                           token_ids=ids))
            event = await events.queue.get()
        if isinstance(event, Failed):
            err = event.error
            yield _sse(error_body(err.message, err.type, None, err.code))
            return
        _log(job, resolved, event)
        yield _sse(completion_body(rid, resolved.name, None if chat else "", event.reason, extra, chat, chunk=True))
        if request.stream_options is not None and request.stream_options.include_usage:
            final = completion_body(rid, resolved.name, None, None, extra, chat, chunk=True)
            final.update(choices=[], usage=usage(event.prompt_tokens, event.completion_tokens))
            yield _sse(final)
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()


def _log(job: Job, resolved: Resolved, done: Finished) -> None:
    took = time.monotonic() - job.created
    first = (job.first_token_at or time.monotonic()) - job.created
    logger.info("request %d %s [%s]: %d prompt + %d completion tokens (%s) in %.2fs, first token %.3fs", job.id,
                resolved.name, resolved.arch.note or "", done.prompt_tokens, done.completion_tokens, done.reason,
                took, first)


# ---- errors ----
def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        e = next(e for e in errors if e.get("type") == "json_invalid")
        where = e["loc"][1] if len(e["loc"]) > 1 else "?"
        reason = (e.get("ctx") or {}).get("error", e.get("msg"))
        return f"the request body is not valid JSON ({reason} at character {where}): send a JSON object", None
    seen, parts = set(), []
    for e in errors:
        loc = [str(p) for p in e["loc"] if p != "body"]
        loc = [p for p in loc if p not in ("str", "list[int]", "list[str]", "float", "list[TextPart]")]
        name = ".".join(loc) or "body"
        if name in seen:
            continue
        seen.add(name)
        got = "" if e.get("type") == "missing" else f" (got {e.get('input')!r})"
        parts.append(f"{name}: {e['msg'].removeprefix('Value error, ')}{got}")
    first = ".".join(str(p) for p in errors[0]["loc"] if p != "body") if errors else None
    return "invalid request: " + "; ".join(parts[:4]), first or None


def _install_error_handlers(app: FastAPI) -> None:
    def answer(status: int, body: dict) -> JSONResponse:
        return JSONResponse(body, status_code=status)

    @app.exception_handler(APIError)
    async def _api(_request: Request, err: APIError):
        return answer(err.status, err.body())

    @app.exception_handler(BudgetError)
    async def _budget(_request: Request, err: BudgetError):
        return answer(err.status, error_body(err.message, "invalid_request_error", err.param, err.code))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, err: RequestValidationError):
        message, param = _validation_message(err)
        return answer(400, error_body(message, "invalid_request_error", param, "invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {err.detail}; this server answers {ROUTES}"
        return answer(err.status_code, error_body(message, "invalid_request_error", None, str(err.status_code)))

    @app.exception_handler(Exception)
    async def _internal(_request: Request, err: Exception):
        logger.exception("request failed")
        return answer(500, error_body(f"internal error: {type(err).__name__}: {err}", "server_error", None,
                                      "internal_error"))


def create_app(server: Server) -> FastAPI:
    """The FastAPI app of `server`; its lifespan starts and stops the engine's thread."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        server.engine.start()
        logger.info("serving %s: %s", server.family.name, ", ".join(m["id"] for m in server.family.models()))
        yield
        server.engine.close()

    app = FastAPI(title="LlamaFlex", lifespan=lifespan)
    app.state.server = server
    _install_error_handlers(app)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": server.family.models()}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        return server.family.describe(server.family.resolve(model_id).budget)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        return await _answer(server, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        return await _answer(server, request, chat=True)

    @app.get("/health")
    async def health():
        return {"status": "ok", **server.engine.load()}

    return app


__all__ = ["Server", "create_app"]
