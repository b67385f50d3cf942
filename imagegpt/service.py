"""The web service: the FastAPI app (classify, generate, complete, the page, probes and metrics) and the
model worker behind it.

    app = create_app(checkpoint.load(folder), ServiceConfig(), api_key=None)   # serve.py runs it

Endpoints (OpenAPI docs at /docs):
    POST /classify   an image upload (multipart field "image": PNG/JPEG/..., any size, grey or colour)
                     or JSON {"tokens": "<IMG> <Z_017> ..."} -> probabilities per class, prediction
    POST /generate   JSON {"count", "temperature", "top_k", "top_p", "seed", "class", "guidance"} -> images
                     (base64 PNG), their token sequences and the model's own label
    POST /complete   multipart: "image" plus form fields "fraction", "count", sampling settings ->
                     the first `fraction` of the image's tokens continued `count` times
    GET  /healthz    the checkpoint's facts, at once whatever the load (liveness)
    GET  /readyz     200 while the service takes work, 503 while its queue is full or it drains
    GET  /metrics    Prometheus text (imagegpt.telemetry)
    GET  /           the page (static/), GET /static/... its files

Model calls run in one worker thread, never on the event loop. Requests are admitted into a queue
bounded in drawings and images, with a deadline each, and waiting requests are merged into batched
calls (imagegpt.admission); past the bound a request gets 503 with Retry-After at once. With a key,
API calls need it (imagegpt.access). Every bad input gets a 4xx with a one-line JSON {"detail": "..."}
(bodies and uploads: imagegpt.uploads).
"""
import base64
import io
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Optional, Union

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from imagegpt import draw_settings, drawing
from imagegpt.access import KeyCheck, client_of
from imagegpt.admission import Admission, Batcher, Expired, Gone, Refused
from imagegpt.errors import UserError
from imagegpt.metrics import class_probs
from imagegpt.service_config import ServiceConfig
from imagegpt.settings import changed
from imagegpt.telemetry import Metrics, RequestMetrics
from imagegpt.uploads import MAX_PIXELS, BodyLimit, decode_upload, one_line, read_form, validation_line  # noqa: F401

# ----------------------------------------------------------------------------- model operations

def decode_rows(ck, prompts, settings):
    """Draw from each prompt (imagegpt.drawing) as `settings` (DrawSettings) say -> dicts with ids, pred, prob."""
    return drawing.draw(ck, prompts, settings)


def pixels(ids, ck):
    """Any token-id sequence -> uint8 image (H, W, C) through the checkpoint's codebook."""
    img = ck.codebook.decode_ids(ids, ck.vocab)
    return (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


STATIC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")   # the page
MAX_TOKENS_CHARS = 40_000
NO_CONDITIONING = "class-conditional sampling needs a model trained with conditioning"
BATCH_ROWS = 256   # rows decoded together


# ----------------------------------------------------------------------------- requests and responses

class Sampling(BaseModel):
    """The drawing settings of a request (its fields are those of DrawSettings, within the service's bounds)."""
    model_config = ConfigDict(extra="forbid")
    temperature: Optional[float] = Field(None, ge=0, le=5, description=f"0 = greedy; default 1, or "
                                                                       f"{draw_settings.TEMPERATURE} when drawing a chosen class")
    top_k: int = Field(0, ge=0, le=100_000, description="keep the k most likely tokens; 0 = off")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling; 1 = off")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1,
                                description="reproducible result: the request is then decoded on its own")
    label: Optional[Union[int, str]] = Field(None, validation_alias=AliasChoices("class", "digit"),
                                             description="class to draw, its name or index (needs a class-conditional "
                                                         "model); 'digit' is the older name")
    guidance: Optional[float] = Field(None, ge=0, le=20, validation_alias=AliasChoices("guidance", "cfg"),
                                      description="guidance scale (needs a class-conditional model); 'cfg' is the "
                                                  "older name")

    def settings(self, for_a_class):
        """The request's DrawSettings: what it gave over the defaults of its drawing (a chosen class or not;
        guidance only applies to a chosen class); an unseeded request gets its seed where it is decoded."""
        given = {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed,
                 "guidance": self.guidance if for_a_class else None}
        base = replace(draw_settings.defaults(for_a_class), batch_size=BATCH_ROWS)
        return draw_settings.made(given, for_a_class, where="", base=base)


class GenerateRequest(Sampling):
    count: int = Field(4, ge=1, le=64, description="number of images")


class CompleteForm(Sampling):
    fraction: float = Field(0.5, gt=0, lt=1, description="share of the image's tokens (raster order) kept")
    count: int = Field(4, ge=1, le=16, description="completions")


class ClassifyTokens(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: str = Field(..., min_length=1, max_length=MAX_TOKENS_CHARS,
                        description="'<IMG> <Z_017> ... </IMG>' (a <CLS> is added when missing)")


class ClassifyResponse(BaseModel):
    prediction: int
    label: str = Field(description="class name of the prediction")
    probability: float
    probabilities: list[float] = Field(description="one per class, in class order")
    classes: list[str]
    tokens: str = Field(description="the sequence the model read")
    image_png: str = Field(description="base64 PNG: the input as the model sees it (decoded tokens)")
    batch_rows: int = Field(description="rows in the batched model call this request shared")


class Sample(BaseModel):
    image_png: str = Field(description="base64 PNG of the decoded tokens")
    tokens: str
    label: Optional[int] = Field(description="the class the image states, or the label token the model wrote "
                                             "(None unless it is a complete image)")
    prediction: Optional[int] = Field(description="argmax of the model's label probabilities at <CLS>")
    probability: Optional[float]
    well_formed: bool = Field(description="'<IMG>', every code, '</IMG> <CLS> <CLS_y> <EOS>'")


class GenerateResponse(BaseModel):
    samples: list[Sample]
    classes: list[str]
    batch_rows: int = Field(description="rows in the batched decoding call this request shared")


class CompleteResponse(GenerateResponse):
    input_png: str = Field(description="base64 PNG: the uploaded image as the model sees it")
    given_png: str = Field(description="base64 PNG: the part kept as the prompt")
    kept: int = Field(description="image tokens kept")
    total: int = Field(description="image tokens in a whole image")


class Health(BaseModel):
    status: str
    checkpoint: str
    classes: list[str]
    image_size: list[int]
    channels: int
    vocab_size: int
    block_size: int
    parameters: int
    device: str
    conditional: bool
    guidance: float = Field(description="the guidance scale of a drawing of a chosen class unless asked")
    temperature: float = Field(description="the temperature of a drawing of a chosen class unless asked")
    batching: bool
    key_required: bool = Field(description="API calls need the header Authorization: Bearer <key>")


class Ready(BaseModel):
    ready: bool = Field(description="a request gets in now (503 while the queue is full or the service drains)")
    draining: bool = Field(description="the service was told to stop: it finishes what it admitted, takes nothing new")
    queue_rows: int = Field(description="drawings and images admitted and not yet answered")
    max_queue: int


# ----------------------------------------------------------------------------- answers

def png_base64(img):
    """uint8 (H, W, C) -> base64 PNG text."""
    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- the app

class Worker:
    """The checkpoint behind the service: its one model thread, where every model call runs (never on
    the event loop), the admission that bounds what waits for it, and two batchers that merge waiting
    requests into one call. Reading images (/classify, and the image of /complete) merges whatever is
    waiting without waiting for more (its call takes about a millisecond, less than any window would);
    drawing waits `window` seconds for company, since one pass takes long."""

    def __init__(self, ck, cfg, metrics):
        self.ck, self.batching = ck, cfg.batching
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.seeds = np.random.default_rng(secrets.randbits(64))
        self.admission = Admission(cfg.max_queue, cfg.max_client_queue, cfg.deadline_s, metrics)
        self.reader = Batcher("read", self.run_classify, self.executor, 0 if cfg.batching else None, cfg.max_batch,
                              self.admission)
        self.drawer = Batcher("draw", self.run_decode, self.executor, cfg.window, cfg.max_batch, self.admission)

    @asynccontextmanager
    async def running(self, app):
        self.reader.start()
        self.drawer.start()
        yield
        await self.reader.stop()
        await self.drawer.stop()
        self.executor.shutdown(wait=True)      # a model call under way finishes

    def ticket(self, request, rows):
        """Admission for a request of `rows` drawings and images (503 Refused when there is no room)."""
        try:
            deadline = self.admission.deadline(request.headers.get("x-deadline-ms"))
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return self.admission.ticket(client_of(request.scope), rows, deadline, request.receive)

    def run_classify(self, key, items):
        """items: token-id prefixes or uint8 images (H, W, C), tokenised here together -> (prefix, probs)."""
        prefixes = list(items)
        at = [i for i, x in enumerate(items) if isinstance(x, np.ndarray)]
        if at:
            for i, p in zip(at, self.ck.encode_images(np.stack([items[i] for i in at]))):
                prefixes[i] = p
        return list(zip(prefixes, class_probs(self.ck, prefixes, batch_size=BATCH_ROWS).tolist()))

    def run_decode(self, key, items):
        """items: (prompt, DrawSettings); one call shares one group's settings (see decode). key None: a
        seeded request, decoded alone; the others' calls are seeded here."""
        settings = items[0][1]
        if key is not None:
            settings = replace(settings, seed=int(self.seeds.integers(2**62)))
        rows = decode_rows(self.ck, [p for p, _ in items], settings)
        return [self.sample_of(r) for r in rows]

    def sample_of(self, r):
        label, complete = drawing.outcome(self.ck, r["ids"])
        return Sample(image_png=png_base64(pixels(r["ids"], self.ck)), tokens=self.ck.vocab.decode(r["ids"]),
                      label=label, prediction=r["pred"], probability=r["prob"], well_formed=complete)

    async def classify(self, ticket, item):
        """-> ((prefix, probabilities), rows in the call it shared)"""
        (one,), rows = await self.reader.submit(ticket, "classify", [item])
        return one, rows

    def asked_class(self, s):
        """The class a request asks for (None: any), checked against the model."""
        if s.label is None and s.guidance is None:
            return None
        if not self.ck.conditional:
            raise HTTPException(422, NO_CONDITIONING)
        if s.label is None:
            return None
        try:
            return self.ck.class_index(s.label)
        except UserError as e:
            raise HTTPException(422, one_line(e)) from None

    async def decode(self, ticket, prompts, s, label):
        """Draw from the prompts with the request's drawing settings -> (samples, rows in the call).
        Requests with equal settings share a call; a seeded one decodes alone."""
        try:
            settings = s.settings(for_a_class=label is not None)
        except UserError as e:
            raise HTTPException(422, one_line(e)) from None
        return await self.drawer.submit(ticket, None if s.seed is not None else settings,
                                        [(p, settings) for p in prompts])


def create_app(ck, cfg=None, api_key=None, static_dir=STATIC, **settings):
    """The FastAPI app around a loaded model: cfg a ServiceConfig (or its defaults), with flat settings
    changed by keyword (create_app(ck, max_queue=128)); api_key: the key API calls need (None: open).
    app.state holds the admission (its drain), the metrics and the settings."""
    cfg = changed(cfg or ServiceConfig(), **settings).check()
    metrics = Metrics()
    worker = Worker(ck, cfg, metrics)
    app = FastAPI(title="imagegpt-tokens", lifespan=worker.running,
                  description="Classify, complete and generate images with a GPT over codebook tokens.")
    app.state.admission, app.state.metrics, app.state.config = worker.admission, metrics, cfg
    app.add_middleware(BodyLimit, max_bytes=cfg.max_upload, timeout=cfg.body_timeout_s)
    app.add_middleware(KeyCheck, key=api_key)               # before the body is read
    app.add_middleware(RequestMetrics, metrics=metrics)     # outermost: counts every answer
    add_error_handlers(app, worker.admission)
    add_probes(app, worker, static_dir, api_key is not None)
    add_model_routes(app, worker)
    return app


def add_error_handlers(app, admission):
    """Every error is one line of JSON {"detail": ...} with its status, and the server carries on."""
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return JSONResponse({"detail": one_line(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, exc):  # a bug: still one line of JSON, and the server carries on
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}: {one_line(exc)})"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return JSONResponse({"detail": validation_line(jsonable_encoder(exc.errors()))}, status_code=422)

    @app.exception_handler(Refused)
    async def refused(request, exc):       # at once; while draining the connection closes too
        headers = {"Retry-After": str(exc.retry_after)}
        if not admission.accepting:
            headers["Connection"] = "close"
        return JSONResponse({"detail": str(exc)}, status_code=503, headers=headers)

    @app.exception_handler(Expired)
    async def expired(request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=504)

    @app.exception_handler(Gone)
    async def gone(request, exc):          # nobody reads it; counted as 499 (nginx's "client closed request")
        return JSONResponse({"detail": "the client disconnected"}, status_code=499)


CLASSIFY_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary"}}}},
    "application/json": {"schema": ClassifyTokens.model_json_schema()}}}}
COMPLETE_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image"],
    "properties": {"image": {"type": "string", "format": "binary"}, **CompleteForm.model_json_schema()["properties"]}}}}}}


def add_probes(app, worker, static_dir, key_required):
    """The routes that call no model: /healthz, /readyz, /metrics, and the page with its static files."""
    ck, admission, metrics = worker.ck, worker.admission, app.state.metrics
    vocab, names, book, model = ck.vocab, ck.class_names, ck.codebook, ck.model

    @app.get("/healthz", response_model=Health)
    async def healthz():        # liveness: no model, no lock, no key
        return Health(status="ok" if admission.accepting else "draining", checkpoint=str(ck.folder), classes=names,
                      image_size=list(book.image_size), channels=book.channels, vocab_size=len(vocab),
                      block_size=model.config.block_size, parameters=model.num_params(), device=str(model.device),
                      conditional=ck.conditional, guidance=draw_settings.GUIDANCE,
                      temperature=draw_settings.TEMPERATURE,
                      batching=worker.batching, key_required=key_required)

    @app.get("/readyz", response_model=Ready, responses={503: {"model": Ready}})
    async def readyz():         # readiness: does a request get in now?
        ready = admission.ready()
        body = Ready(ready=ready, draining=not admission.accepting, queue_rows=admission.rows,
                     max_queue=admission.max_rows)
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503,
                            headers={} if ready else {"Retry-After": str(admission.retry_after())})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request):
        body, kind = metrics.text(request.headers.get("accept"))
        return Response(body, media_type=kind)

    @app.get("/", include_in_schema=False)
    async def page():     # the page of static/ (the same page hf_export.py --web exports, run by this service)
        return FileResponse(os.path.join(static_dir, "index.html"))

    app.mount("/static", StaticFiles(directory=static_dir), name="static")


def add_model_routes(app, worker):
    """The routes that call the model: /classify, /generate, /complete."""
    ck = worker.ck
    vocab, names, model = ck.vocab, ck.class_names, ck.model
    size, channels = tuple(ck.codebook.image_size), ck.codebook.channels

    @app.post("/classify", response_model=ClassifyResponse, openapi_extra=CLASSIFY_DOC)
    async def classify(request: Request):
        kind = content_type(request)
        if kind == "multipart/form-data":
            data, _ = await read_form(request, EmptyForm)
        elif kind == "application/json":
            try:
                body = ClassifyTokens.model_validate_json(await request.body())
            except ValidationError as e:
                raise HTTPException(422, validation_line(e.errors())) from None
            item = tokens_prefix(vocab, body.tokens)
        else:
            raise HTTPException(415, "send an image as multipart/form-data (field \"image\") "
                                     "or JSON {\"tokens\": \"...\"}")
        async with worker.ticket(request, 1) as t:
            if kind == "multipart/form-data":
                item = await run_in_threadpool(decode_upload, data, size, channels)
            (prefix, probs), rows = await worker.classify(t, item)
        c = int(np.argmax(probs))
        return ClassifyResponse(prediction=c, label=names[c], probability=probs[c], probabilities=probs,
                                classes=names, tokens=vocab.decode(prefix), batch_rows=rows,
                                image_png=png_base64(pixels(prefix, ck)))

    @app.post("/generate", response_model=GenerateResponse)
    async def generate(body: GenerateRequest, request: Request):
        label = worker.asked_class(body)
        async with worker.ticket(request, body.count) as t:
            samples, rows = await worker.decode(t, [drawing.prompt(vocab, label)] * body.count, body, label)
        return GenerateResponse(samples=samples, classes=names, batch_rows=rows)

    @app.post("/complete", response_model=CompleteResponse, openapi_extra=COMPLETE_DOC)
    async def complete(request: Request):
        if content_type(request) != "multipart/form-data":
            raise HTTPException(415, "send the image as multipart/form-data (field \"image\", "
                                     "settings as form fields)")
        data, s = await read_form(request, CompleteForm)
        label = worker.asked_class(s)
        async with worker.ticket(request, s.count + 1) as t:     # the image read, then its drawings
            img = await run_in_threadpool(decode_upload, data, size, channels)
            (prefix, _), _ = await worker.classify(t, img)
            codes = prefix[1:-2]
            keep = len(drawing.kept(vocab, codes, s.fraction))
            prompt = drawing.prompt(vocab, label, codes[:keep])
            if len(prompt) >= model.config.block_size:
                raise HTTPException(422, f"the kept {keep} tokens fill the model's block size "
                                         f"{model.config.block_size}; lower the fraction")
            samples, rows = await worker.decode(t, [prompt] * s.count, s, label)
        return CompleteResponse(samples=samples, classes=names, batch_rows=rows, kept=keep, total=len(codes),
                                input_png=png_base64(pixels(prefix, ck)),
                                given_png=png_base64(pixels(prompt, ck)))


def content_type(request):
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def tokens_prefix(vocab, text):
    """Tokens typed by a client -> the classification prefix '<IMG> ... </IMG> <CLS>' (422 if unknown)."""
    try:
        ids = vocab.parse(text, "tokens")
    except UserError as e:
        raise HTTPException(422, one_line(e)) from None
    if vocab.cls_id in ids:
        return ids[:ids.index(vocab.cls_id) + 1]
    return ids + ([] if vocab.img_end_id in ids else [vocab.img_end_id]) + [vocab.cls_id]


class EmptyForm(BaseModel):
    """/classify takes no form fields besides the image."""
    model_config = ConfigDict(extra="forbid")


