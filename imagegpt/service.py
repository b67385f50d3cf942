"""The web service: the FastAPI app (classify, generate, complete, the page), request batching, uploads.

    app = create_app(checkpoint.load(folder))      # serve.py runs it with uvicorn

Endpoints (OpenAPI docs at /docs):
    POST /classify   an image upload (multipart field "image": PNG/JPEG/..., any size, grey or colour)
                     or JSON {"tokens": "<IMG> <Z_017> ..."} -> probabilities per class, prediction
    POST /generate   JSON {"count", "temperature", "top_k", "top_p", "seed", "class", "guidance"} -> images
                     (base64 PNG), their token sequences and the model's own label
    POST /complete   multipart: "image" plus form fields "fraction", "count", sampling settings ->
                     the first `fraction` of the image's tokens continued `count` times
    GET  /healthz    the checkpoint's facts; GET / the page (static/), GET /static/... its files

Model calls run in one worker thread, never on the event loop. Concurrent requests are collected for
a short window and run as one batched call: N clients asking for a drawing each cost about one batched
decoding pass, not N. Every bad input gets a 4xx with a one-line JSON {"detail": "..."}.
"""
import asyncio
import base64
import io
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Optional, Union

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from imagegpt import drawing
from imagegpt.errors import UserError
from imagegpt.metrics import class_probs
from imagegpt.sources import read_image

# ----------------------------------------------------------------------------- model operations

def decode_rows(ck, prompts, temperature, top_k, top_p, generator, scale=1.0):
    """Draw from each prompt (imagegpt.drawing) -> dicts with ids, pred, prob."""
    return drawing.draw(ck.model, ck.vocab, ck.codebook.seq_len, prompts, ck.model.config.block_size, scale,
                        batch_size=256, temperature=temperature, top_k=top_k or None, top_p=top_p, generator=generator)


def pixels(ids, ck):
    """Any token-id sequence -> uint8 image (H, W, C) through the checkpoint's codebook."""
    img = ck.codebook.decode_ids(ids, ck.vocab)
    return (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


STATIC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")   # the page
MAX_PIXELS = 4096 * 4096          # decoded size limit for an upload (a decompression bomb stops here)
MAX_TOKENS_CHARS = 40_000
NO_CONDITIONING = "class-conditional sampling needs a model trained with conditioning"


# ----------------------------------------------------------------------------- requests and responses

class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: Optional[float] = Field(None, ge=0, le=5, description=f"0 = greedy; default 1, or {drawing.TEMPERATURE} "
                                                                       f"when drawing a chosen class")
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


# ----------------------------------------------------------------------------- batching

class Batcher:
    """Collects concurrent jobs for `window` seconds, then runs jobs with equal keys as one call of
    run(key, items) -> results (one per item) in the model thread. A job with key None runs alone;
    window None turns batching off (every job alone, in arrival order)."""

    def __init__(self, run, executor, window, max_rows):
        self.run, self.executor, self.window, self.max_rows = run, executor, window, max_rows
        self.queue = None
        self.task = None

    def start(self):
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop())

    async def stop(self):
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass

    async def submit(self, key, items):
        """-> (results for items, rows in the call they shared)"""
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((key, items, fut))
        return await fut

    async def _loop(self):
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            if self.window is not None:
                if self.window > 0:
                    await asyncio.sleep(self.window)
                while not self.queue.empty():
                    jobs.append(self.queue.get_nowait())
            for group in self._groups(jobs):
                items = [it for _, its, _ in group for it in its]
                try:
                    results = await loop.run_in_executor(self.executor, self.run, group[0][0], items)
                except Exception as e:  # reaches the waiting requests, never ends the loop
                    for *_, fut in group:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                at = 0
                for _, its, fut in group:
                    if not fut.done():
                        fut.set_result((results[at:at + len(its)], len(items)))
                    at += len(its)

    def _groups(self, jobs):
        """Jobs with equal keys together, up to max_rows items a group (a bigger job goes alone)."""
        if self.window is None:
            return [[j] for j in jobs]
        groups, open_ = [], {}
        for job in jobs:
            key, items, _ = job
            g = open_.get(key) if key is not None else None
            if g is None or sum(len(j[1]) for j in g) + len(items) > self.max_rows:
                g = []
                groups.append(g)
                if key is not None:
                    open_[key] = g
            g.append(job)
        return groups


# ----------------------------------------------------------------------------- uploads

class Upload(io.BytesIO):
    """Uploaded bytes, named 'upload' in error messages (sources.read_image prefixes its path)."""

    def __str__(self):
        return "upload"

    __repr__ = __str__


def decode_upload(data, size, channels):
    """Uploaded image bytes (any format Pillow reads, any size) -> uint8 (H, W, C) converted and resized
    exactly as the training images (sources.read_image). HTTPException 413 for an image over MAX_PIXELS
    (a decompression bomb), 400 for anything that is not a readable image."""
    from PIL import Image, UnidentifiedImageError
    if not data:
        raise HTTPException(400, "the image upload is empty")
    try:
        with Image.open(Upload(data)) as im:
            w, h = im.size
    except Image.DecompressionBombError as e:
        raise HTTPException(413, f"image too large to decode ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise HTTPException(400, f"not a readable image ({one_line(e)})") from None
    if w * h > MAX_PIXELS:
        raise HTTPException(413, f"image is {w}x{h} = {w * h} pixels; the limit is {MAX_PIXELS}")
    try:
        return np.array(read_image(Upload(data), size, channels))  # a writable copy for torch
    except UserError as e:
        raise HTTPException(400, one_line(e)) from None


def one_line(e):
    """An error's text on one line (its lines joined; the spaces inside a line, as in a class name, kept)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text[:300] or type(e).__name__


def png_base64(img):
    """uint8 (H, W, C) -> base64 PNG text."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


async def read_form(request, model_cls):
    """A multipart request -> (image bytes, validated settings); unknown fields are 422."""
    try:
        form = await request.form(max_files=1, max_fields=20)
    except HTTPException:
        raise
    except Exception as e:  # a broken multipart body
        raise HTTPException(400, f"cannot read the multipart form ({one_line(e)})") from None
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise HTTPException(422, 'the form needs a file field "image"')
    data = await upload.read()
    fields = {k: v for k, v in form.multi_items() if k != "image"}
    try:
        settings = model_cls.model_validate(fields)
    except ValidationError as e:
        raise HTTPException(422, validation_line(e.errors())) from None
    return data, settings


def validation_line(errors):
    """Pydantic errors -> one line: 'count: Input should be less than or equal to 64; ...'."""
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- the app

class Worker:
    """The checkpoint behind the service: its one model thread, where every model call runs (never on
    the event loop), and two batchers that merge concurrent requests into one call. /classify merges
    whatever is waiting without waiting for more (its call takes about a millisecond, less than any
    window would); decoding waits `window` seconds for company, since one pass takes long."""

    def __init__(self, ck, window, max_rows, batching):
        self.ck, self.batching = ck, batching
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.seeds = np.random.default_rng(secrets.randbits(64))
        self.classifier = Batcher(self.run_classify, self.executor, 0 if batching else None, max_rows)
        self.decoder = Batcher(self.run_decode, self.executor, window if batching else None, max_rows)

    @asynccontextmanager
    async def running(self, app):
        self.classifier.start()
        self.decoder.start()
        yield
        await self.classifier.stop()
        await self.decoder.stop()
        self.executor.shutdown(wait=True)

    def run_classify(self, key, items):
        """items: token-id prefixes or uint8 images (H, W, C), tokenised here together -> (prefix, probs)."""
        prefixes = list(items)
        at = [i for i, x in enumerate(items) if isinstance(x, np.ndarray)]
        if at:
            for i, p in zip(at, self.ck.encode_images(np.stack([items[i] for i in at]))):
                prefixes[i] = p
        return list(zip(prefixes, class_probs(self.ck.model, prefixes, self.ck.vocab, batch_size=256).tolist()))

    def run_decode(self, key, items):
        """items: (prompt, settings); one call shares one group's settings (see decode_settings)."""
        temperature, top_k, top_p, seed, scale = items[0][1]
        seed = int(seed if seed is not None else self.seeds.integers(2**62))
        gen = torch.Generator(device=self.ck.model.device).manual_seed(seed)
        rows = decode_rows(self.ck, [p for p, _ in items], temperature, top_k, top_p, gen, scale)
        return [self.sample_of(r) for r in rows]

    def sample_of(self, r):
        label, complete = drawing.outcome(r["ids"], self.ck.vocab, self.ck.codebook.seq_len)
        return Sample(image_png=png_base64(pixels(r["ids"], self.ck)), tokens=self.ck.vocab.decode(r["ids"]),
                      label=label, prediction=r["pred"], probability=r["prob"], well_formed=complete)

    async def classify(self, item):
        """-> ((prefix, probabilities), rows in the call it shared)"""
        (one,), rows = await self.classifier.submit("classify", [item])
        return one, rows

    async def encode(self, image):
        """uint8 (H, W, C) -> its classification prefix, tokenised in the model thread."""
        return (await asyncio.get_running_loop().run_in_executor(self.executor, self.ck.encode_images, image[None]))[0]

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

    async def decode(self, prompts, s, label):
        """Draw from the prompts with the request's sampling settings -> (samples, rows in the call).
        Requests with equal settings share a call; a seeded one decodes alone."""
        scale = (drawing.GUIDANCE if s.guidance is None else s.guidance) if label is not None else 1.0
        temperature = s.temperature if s.temperature is not None else drawing.TEMPERATURE if label is not None else 1.0
        settings = (temperature, s.top_k, s.top_p, s.seed, scale)
        return await self.decoder.submit(None if s.seed is not None else settings, [(p, settings) for p in prompts])


def create_app(ck, window=0.01, max_rows=64, batching=True, max_upload=4 << 20, static_dir=STATIC):
    """The FastAPI app around a loaded model. window: seconds to collect concurrent requests into one
    model call (batching=False: every request is its own call); max_upload: bytes per request body."""
    worker = Worker(ck, window, max_rows, batching)
    app = FastAPI(title="imagegpt-tokens", lifespan=worker.running,
                  description="Classify, complete and generate images with a GPT over codebook tokens.")
    app.add_middleware(BodyLimit, max_bytes=max_upload)
    add_error_handlers(app)
    add_routes(app, worker, static_dir)
    return app


def add_error_handlers(app):
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


CLASSIFY_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary"}}}},
    "application/json": {"schema": ClassifyTokens.model_json_schema()}}}}
COMPLETE_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image"],
    "properties": {"image": {"type": "string", "format": "binary"}, **CompleteForm.model_json_schema()["properties"]}}}}}}


def add_routes(app, worker, static_dir):
    ck = worker.ck
    vocab, names, book, model = ck.vocab, ck.class_names, ck.codebook, ck.model
    size, channels = tuple(book.image_size), book.channels

    @app.get("/healthz", response_model=Health)
    async def healthz():
        return Health(status="ok", checkpoint=str(ck.folder), classes=names, image_size=list(size),
                      channels=channels, vocab_size=len(vocab), block_size=model.config.block_size,
                      parameters=model.num_params(), device=str(model.device),
                      conditional=ck.conditional, guidance=drawing.GUIDANCE, temperature=drawing.TEMPERATURE,
                      batching=worker.batching)

    @app.post("/classify", response_model=ClassifyResponse, openapi_extra=CLASSIFY_DOC)
    async def classify(request: Request):
        kind = content_type(request)
        if kind == "multipart/form-data":
            data, _ = await read_form(request, EmptyForm)
            item = await run_in_threadpool(decode_upload, data, size, channels)
        elif kind == "application/json":
            try:
                body = ClassifyTokens.model_validate_json(await request.body())
            except ValidationError as e:
                raise HTTPException(422, validation_line(e.errors())) from None
            item = tokens_prefix(vocab, body.tokens)
        else:
            raise HTTPException(415, "send an image as multipart/form-data (field \"image\") "
                                     "or JSON {\"tokens\": \"...\"}")
        (prefix, probs), rows = await worker.classify(item)
        c = int(np.argmax(probs))
        return ClassifyResponse(prediction=c, label=names[c], probability=probs[c], probabilities=probs,
                                classes=names, tokens=vocab.decode(prefix), batch_rows=rows,
                                image_png=png_base64(pixels(prefix, ck)))

    @app.post("/generate", response_model=GenerateResponse)
    async def generate(body: GenerateRequest):
        label = worker.asked_class(body)
        samples, rows = await worker.decode([drawing.prompt(vocab, label)] * body.count, body, label)
        return GenerateResponse(samples=samples, classes=names, batch_rows=rows)

    @app.post("/complete", response_model=CompleteResponse, openapi_extra=COMPLETE_DOC)
    async def complete(request: Request):
        if content_type(request) != "multipart/form-data":
            raise HTTPException(415, "send the image as multipart/form-data (field \"image\", "
                                     "settings as form fields)")
        data, s = await read_form(request, CompleteForm)
        label = worker.asked_class(s)
        img = await run_in_threadpool(decode_upload, data, size, channels)
        prefix = await worker.encode(img)
        codes = prefix[1:-2]
        keep = len(drawing.kept(vocab, codes, s.fraction))
        prompt = drawing.prompt(vocab, label, codes[:keep])
        if len(prompt) >= model.config.block_size:
            raise HTTPException(422, f"the kept {keep} tokens fill the model's block size "
                                     f"{model.config.block_size}; lower the fraction")
        samples, rows = await worker.decode([prompt] * s.count, s, label)
        return CompleteResponse(samples=samples, classes=names, batch_rows=rows, kept=keep, total=len(codes),
                                input_png=png_base64(pixels(prefix, ck)),
                                given_png=png_base64(pixels(prompt, ck)))

    @app.get("/", include_in_schema=False)
    async def page():     # the page of static/ (the same page hf_export.py --web exports, run by this service)
        return FileResponse(os.path.join(static_dir, "index.html"))

    app.mount("/static", StaticFiles(directory=static_dir), name="static")


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


class BodyLimit:
    """ASGI middleware: a request body over max_bytes gets 413 before the app reads any of it."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        chunks, total, more = [], 0, True
        while more:  # read (at most max_bytes of) the body, then hand it on
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            total += len(chunks[-1])
            if total > self.max_bytes:
                return await self._too_large(send)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send):
        line = f'{{"detail": "request body over the limit of {self.max_bytes} bytes"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(line)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": line})
