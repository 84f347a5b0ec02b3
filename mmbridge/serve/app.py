"""The FastAPI app behind ``mmbridge serve``: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``,
``GET /``, a chat page (``static/index.html``, plain HTML and JS), and ``GET /examples/{name}``, the page's example
images and their questions (``static/examples/``, written by ``tests/serve_examples.py``).

:func:`create_app` wires the rooms together: a request body is read under its size limit, validated
(:mod:`~mmbridge.serve.protocol`, :mod:`~mmbridge.serve.conversation`), its images are loaded under the
server's policy (:mod:`~mmbridge.serve.images`), its prompt is built off the event loop
(:mod:`~mmbridge.serve.prepare`) and the job is queued for the next batch
(:mod:`~mmbridge.serve.batching`, :mod:`~mmbridge.serve.engine`). An answer is its text, followed by the images
the engine's ``answer_images`` hook drew for it, if any (:mod:`~mmbridge.serve.outputs`). Every refusal is a 4xx
with OpenAI's error body; nothing a request does stops the server from answering the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from importlib import resources
from typing import Any, AsyncIterator, Awaitable, Callable

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send
from torch import nn

from mmbridge.generate import default_eos_ids
from mmbridge.serve.batching import BatchScheduler, Finished, Job, TextDelta
from mmbridge.serve.conversation import Conversation, parse_messages
from mmbridge.serve.engine import Engine
from mmbridge.serve.errors import APIError, invalid
from mmbridge.serve.images import ImageLoader
from mmbridge.serve.outputs import AnswerImages, ImageOptions, message_content
from mmbridge.serve.prepare import (check_image_count, check_request, completion_budget, encode_prompt,
                                    image_options_of, sampling_of)
from mmbridge.serve.protocol import (AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
                                     Choice, ChunkChoice, Delta, ModelCard, ModelList, Usage, completion_id, now,
                                     param_path, parse_request)
from mmbridge.serve.settings import ServeSettings

logger = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# the page loads nothing from elsewhere and talks only to this server; its one script and style are inline, its
# images are the user's (data: URLs), the model's (data: URLs) and the examples (this server)
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'; img-src 'self' data: blob:; "
                                           "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                                           "form-action 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
EXAMPLE_TYPES = {".png": "image/png", ".json": "application/json"}


def create_app(model: nn.Module, settings: ServeSettings, answer_images: AnswerImages | None = None) -> FastAPI:
    """An OpenAI-compatible app serving ``model`` under ``settings.served_model_name``.

    ``answer_images`` is the hook for models that answer with images: called once per finished row with a
    :class:`~mmbridge.serve.outputs.FinishedRow`, it returns that row's PIL images, which the answer carries after
    its text as OpenAI image content parts (:mod:`~mmbridge.serve.outputs`). ``None``: text answers only.
    """
    settings.validate()
    server = Server(model, settings, answer_images)
    app = FastAPI(title="mmbridge", lifespan=server.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_api_route("/", web_page(), methods=["GET"], include_in_schema=False)
    app.add_api_route("/examples/{name}", example_files(), methods=["GET"], include_in_schema=False)
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", server.model_card, methods=["GET"])
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    return app


def web_page() -> Callable[[], Awaitable[HTMLResponse]]:
    """The ``GET /`` route: the package's ``static/index.html``, read once."""
    html = (resources.files("mmbridge.serve") / "static" / "index.html").read_text(encoding="utf-8")

    async def page() -> HTMLResponse:
        """``GET /``: a page to ask the served model about an image (streamed answer)."""
        return HTMLResponse(html, headers=PAGE_HEADERS)

    return page


def example_files() -> Callable[[str], Awaitable[Response]]:
    """The ``GET /examples/{name}`` route: the files of the package's ``static/examples``, read once."""
    folder = resources.files("mmbridge.serve") / "static" / "examples"
    entries = folder.iterdir() if folder.is_dir() else []
    files = {entry.name: entry.read_bytes() for entry in entries
             if entry.is_file() and os.path.splitext(entry.name)[1] in EXAMPLE_TYPES}

    async def example(name: str) -> Response:
        """``GET /examples/{name}``: an example image of the page, or ``examples.json`` (each image's question)."""
        if name not in files:
            raise APIError(404, f"GET /examples/{name}: there is no such example file", code="not_found")
        media_type = EXAMPLE_TYPES[os.path.splitext(name)[1]]
        return Response(files[name], media_type=media_type, headers={"X-Content-Type-Options": "nosniff"})

    return example


class Server:
    """The state of one serving process: model, processor, tokenizer lock, scheduler, image loader."""

    def __init__(self, model: nn.Module, settings: ServeSettings, answer_images: AnswerImages | None = None) -> None:
        self.model, self.settings = model, settings
        self.processor = model.processor()
        self.lock = threading.Lock()  # the tokenizer, shared by prompt building and the generation thread
        self.engine = Engine(model, self.processor.pad_token_id, default_eos_ids(model), self.lock, answer_images)
        self.max_prompt_tokens = settings.max_prompt_tokens or self.processor.max_length
        self.context_length = _context_length(model)
        self.created = now()
        self.scheduler: BatchScheduler | None = None
        self.images = ImageLoader(settings)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Start the scheduler (and the remote-image client) with the app; stop them with it."""
        self.scheduler = BatchScheduler(self.engine.run_group, self.settings.max_batch,
                                        self.settings.batch_wait_ms / 1000, self.settings.max_queued)
        self.scheduler.start()
        client = httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=self.settings.image_timeout_s) \
            if self.settings.allow_remote_images else None
        self.images = ImageLoader(self.settings, client)
        try:
            yield
        finally:
            await self.scheduler.stop()
            if client is not None:
                await client.aclose()

    # -- routes --------------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        """``GET /health``: ok, the model's name, queued requests and the scheduler's counters."""
        stats = self.scheduler.stats if self.scheduler else None
        return {"status": "ok", "model": self.settings.served_model_name,
                "queued": len(self.scheduler.pending) if self.scheduler else 0,
                **(vars(stats) if stats else {})}

    async def models(self) -> dict[str, Any]:
        """``GET /v1/models``: the one served model."""
        return ModelList(data=[self._card()]).model_dump()

    async def model_card(self, model_id: str) -> dict[str, Any]:
        """``GET /v1/models/{id}``: the served model, or a 404 like OpenAI's."""
        if model_id != self.settings.served_model_name:
            raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return self._card().model_dump()

    async def chat_completions(self, request: Request) -> Response:
        """``POST /v1/chat/completions``: validate, load images, build the prompt, queue; answer or stream."""
        chat = parse_request(await read_body(request, self.settings.max_body_bytes))
        check_request(chat, self.settings)
        image_options = image_options_of(chat, self.settings, self.model.output_modalities)
        conversation = parse_messages(chat.messages, self.model.config.image_token)
        check_image_count(conversation, self.settings)
        images = [await self.images.load(ref) for ref in conversation.images]
        job = await self._job(chat, conversation, images, image_options)
        self.scheduler.submit(job)
        reply = {"id": completion_id(), "created": now(), "model": self.settings.served_model_name}
        if chat.stream:
            usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return JobStream(job, stream_events(job, reply, usage))
        return JSONResponse(await complete(job, reply))

    # -- helpers -------------------------------------------------------------------------------
    def _card(self) -> ModelCard:
        return ModelCard(id=self.settings.served_model_name, created=self.created)

    async def _job(self, chat: ChatCompletionRequest, conversation: Conversation, images: list[Image.Image],
                   image_options: ImageOptions) -> Job:
        example = await asyncio.to_thread(self._encode, conversation, images)
        prompt_tokens = len(example["input_ids"])
        max_tokens = completion_budget(chat, prompt_tokens, self.settings, self.max_prompt_tokens,
                                       self.context_length)
        return Job(example=example, sampling=sampling_of(chat), max_tokens=max_tokens, stop=chat.stop,
                   prompt_tokens=prompt_tokens, loop=asyncio.get_running_loop(), image_options=image_options)

    def _encode(self, conversation: Conversation, images: list[Image.Image]) -> dict[str, Any]:
        with self.lock:
            return encode_prompt(self.processor, conversation, images)


def _context_length(model: nn.Module) -> int | None:
    """Positions a decoder-only LLM can hold (prompt + answer), if its config says; ``None`` otherwise."""
    if model.llm.is_encoder_decoder:
        return None
    return getattr(getattr(model.llm, "config", None), "max_position_embeddings", None)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(total, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body is {size} bytes or more; this server takes at most {limit} "
                         f"(--max-body-bytes)", code="request_too_large")


# -- answers --------------------------------------------------------------------------------------
async def complete(job: Job, reply: dict[str, Any]) -> dict[str, Any]:
    """Wait for the job's whole answer; a ``chat.completion`` object."""
    parts: list[str] = []
    try:
        while True:
            event = await job.next_event()
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, Finished):
                usage = Usage(prompt_tokens=job.prompt_tokens, completion_tokens=event.completion_tokens,
                              total_tokens=job.prompt_tokens + event.completion_tokens)
                content = message_content("".join(parts), event.images)
                choice = Choice(message=AssistantMessage(content=content), finish_reason=event.reason)
                return ChatCompletion(**reply, choices=[choice], usage=usage).model_dump()
            else:
                raise event.error
    finally:
        job.cancelled = True  # a no-op once finished; frees the row if this request was cancelled


async def stream_events(job: Job, reply: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk with the role, one per text delta, one per answer image (its ``content`` a
    one-part list), one with the finish reason, ``[DONE]``."""
    yield _sse(ChatCompletionChunk(**reply, choices=[ChunkChoice(delta=Delta(role="assistant", content=""))]))
    while True:
        event = await job.next_event()
        if isinstance(event, TextDelta):
            yield _sse(ChatCompletionChunk(**reply, choices=[ChunkChoice(delta=Delta(content=event.text))]))
        elif isinstance(event, Finished):
            for part in event.images:
                yield _sse(ChatCompletionChunk(**reply, choices=[ChunkChoice(delta=Delta(content=[part]))]))
            yield _sse(ChatCompletionChunk(**reply, choices=[ChunkChoice(delta=Delta(), finish_reason=event.reason)]))
            if include_usage:
                usage = Usage(prompt_tokens=job.prompt_tokens, completion_tokens=event.completion_tokens,
                              total_tokens=job.prompt_tokens + event.completion_tokens)
                yield _sse(ChatCompletionChunk(**reply, choices=[], usage=usage))
            break
        else:
            yield _sse(event.error.body())
            break
    yield "data: [DONE]\n\n"


def _sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump(exclude_none=True) if isinstance(payload, BaseModel) else payload
    if isinstance(payload, ChatCompletionChunk):
        for choice in data["choices"]:
            choice.setdefault("finish_reason", None)  # OpenAI sends it on every chunk
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class JobStream(StreamingResponse):
    """An event stream that cancels its job however it ends (finished, client gone, error)."""

    def __init__(self, job: Job, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self.job = job

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            self.job.cancelled = True


# -- errors ---------------------------------------------------------------------------------------
async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    message = f"{request.method} {request.url.path}: {error.detail}"
    return JSONResponse(APIError(error.status_code, message, code=code).body(), status_code=error.status_code)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    detail = error.errors()[0]
    return JSONResponse(invalid(param_path(detail["loc"][1:]), detail["msg"]).body(), status_code=400)


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("internal error on %s %s", request.method, request.url.path)
    body = APIError(500, f"internal error: {type(error).__name__}", code="internal_error",
                    error_type="server_error").body()
    return JSONResponse(body, status_code=500)
