"""The web service: the FastAPI app (classify, generate, complete, the page), request batching, uploads.

    app = create_app(checkpoint.load(folder))      # serve.py runs it with uvicorn

Endpoints (OpenAPI docs at /docs):
    POST /classify   an image upload (multipart field "image": PNG/JPEG/..., any size, grey or colour)
                     or JSON {"tokens": "<IMG> <Z_017> ..."} -> probabilities per class, prediction
    POST /generate   JSON {"count", "temperature", "top_k", "top_p", "seed", "digit", "cfg"} -> images
                     (base64 PNG), their token sequences and the model's own label
    POST /complete   multipart: "image" plus form fields "fraction", "count", sampling settings ->
                     the first `fraction` of the image's tokens continued `count` times
    GET  /healthz    the checkpoint's facts; GET / the page (static/), GET /static/... its files

Model calls run in one worker thread, never on the event loop. Concurrent requests are collected for
a short window and run as one batched call: N clients asking for a digit each cost about one batched
decoding pass, not N. Every bad input gets a 4xx with a one-line JSON {"detail": "..."}.
"""
import asyncio
import base64
import io
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Optional

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from imagegpt.decoding import DEFAULT_GUIDANCE, DRAW_TEMPERATURE, generate
from imagegpt.errors import UserError
from imagegpt.metrics import class_probs
from imagegpt.sources import read_image

# ----------------------------------------------------------------------------- model operations

def decode_rows(ck, prompts, temperature, top_k, top_p, generator, scale=1.0):
    """Continue each prompt until <EOS> (or the block size) -> dicts with ids, pred, prob. A prompt
    that states a class ('<CLS_d> <IMG> ...') is guided by `scale` against the same prompt with the
    class unstated; for the others the unconditional prompt is the prompt itself (no guidance)."""
    v = ck.vocab
    uncond = None if scale == 1 else [[v.unk_id] + p[1:] if v.is_conditioned(p) else p for p in prompts]
    rows = generate(ck.model, prompts, v, ck.model.config.block_size, temperature=temperature, top_k=top_k or None,
                    top_p=top_p, generator=generator, batch_size=256, uncond=uncond, cfg_scale=scale,
                    image_len=ck.codebook.seq_len)
    drawn = [i for i, r in enumerate(rows) if v.is_conditioned(r["ids"])]
    if drawn:   # a drawing states its class first and has no <CLS>: the model's own reading of the image
        probs = class_probs(ck.model, [v.prefix_ids(v.image_codes(rows[i]["ids"])) for i in drawn], v)
        for i, p in zip(drawn, probs):
            rows[i]["pred"], rows[i]["prob"] = int(p.argmax()), p.max().item()
    return rows


def pixels(ids, ck):
    """Any token-id sequence -> uint8 image (H, W, C) through the checkpoint's codebook."""
    img = ck.codebook.decode_ids(ids, ck.vocab)
    return (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def conditional(ck):
    """Can this checkpoint draw a chosen class? (Trained with class-conditioned sequences.)"""
    return bool(ck.settings.get("cond_fraction"))


STATIC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")   # the page
MAX_PIXELS = 4096 * 4096          # decoded size limit for an upload (a decompression bomb stops here)
MAX_TOKENS_CHARS = 40_000
NO_CONDITIONING = "class-conditional sampling needs a model trained with conditioning"


# ----------------------------------------------------------------------------- requests and responses

class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: Optional[float] = Field(None, ge=0, le=5, description=f"0 = greedy; default 1, or {DRAW_TEMPERATURE} "
                                                                       f"when drawing a chosen digit")
    top_k: int = Field(0, ge=0, le=100_000, description="keep the k most likely tokens; 0 = off")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling; 1 = off")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1,
                                description="reproducible result: the request is then decoded on its own")
    digit: Optional[int] = Field(None, ge=0, description="class to draw (needs a class-conditional model)")
    cfg: Optional[float] = Field(None, ge=0, le=20, description="guidance scale (needs a class-conditional model)")


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
    label: Optional[int] = Field(description="the label token the model wrote (None if it wrote none)")
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
    """Uploaded bytes, named 'upload' in error messages (data.read_image prefixes its path)."""

    def __str__(self):
        return "upload"

    __repr__ = __str__


def decode_upload(data, size, channels):
    """Uploaded image bytes (any format Pillow reads, any size) -> uint8 (H, W, C) converted and resized
    exactly as the training images (data.read_image). HTTPException 413 for an image over MAX_PIXELS
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
    text = " ".join(str(e).split())
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

def create_app(ck, window=0.01, max_rows=64, batching=True, max_upload=4 << 20, static_dir=STATIC):
    """The FastAPI app around a loaded model. window: seconds to collect concurrent requests into one
    model call (batching=False: every request is its own call); max_upload: bytes per request body."""
    model, vocab, book, names = ck.model, ck.vocab, ck.codebook, ck.class_names
    size, channels = tuple(book.image_size), book.channels
    device = model.device
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    seeds = np.random.default_rng(secrets.randbits(64))

    def run_classify(key, items):
        """items: token-id prefixes or uint8 images (H, W, C), tokenised here together -> (prefix, probs)."""
        prefixes = list(items)
        at = [i for i, x in enumerate(items) if isinstance(x, np.ndarray)]
        if at:
            for i, p in zip(at, ck.encode_images(np.stack([items[i] for i in at]))):
                prefixes[i] = p
        return list(zip(prefixes, class_probs(model, prefixes, vocab, batch_size=256).tolist()))

    def run_decode(key, items):
        """items: (prompt, settings); one call shares one group's settings (see decode_key)."""
        temperature, top_k, top_p, seed, scale = items[0][1]
        gen = torch.Generator(device=device).manual_seed(int(seed if seed is not None else seeds.integers(2**62)))
        rows = decode_rows(ck, [p for p, _ in items], temperature, top_k, top_p, gen, scale)
        return [sample_of(r) for r in rows]

    def sample_of(r):
        ids = r["ids"]
        if vocab.is_conditioned(ids):   # drawn as asked: the label is the stated class
            wrote = ids[0] - vocab.label_offset if vocab.is_label(ids[0]) else None
            well = vocab.is_cond_complete(ids, book.seq_len)
        else:
            well = vocab.is_complete(ids, book.seq_len)
            wrote = ids[-2] - vocab.label_offset if well else None
        return Sample(image_png=png_base64(pixels(ids, ck)), tokens=vocab.decode(ids), label=wrote,
                      prediction=r["pred"], probability=r["prob"], well_formed=well)

    # /classify merges whatever is waiting without waiting for more (its call takes about a millisecond,
    # less than any window would); decoding waits `window` for company, since one pass takes long
    classifier = Batcher(run_classify, executor, 0 if batching else None, max_rows)
    decoder = Batcher(run_decode, executor, window if batching else None, max_rows)

    @asynccontextmanager
    async def lifespan(app):
        classifier.start()
        decoder.start()
        yield
        await classifier.stop()
        await decoder.stop()
        executor.shutdown(wait=True)

    app = FastAPI(title="imagegpt-tokens", lifespan=lifespan,
                  description="Classify, complete and generate images with a GPT over codebook tokens.")
    app.add_middleware(BodyLimit, max_bytes=max_upload)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return JSONResponse({"detail": one_line(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, exc):  # a bug: still one line of JSON, and the server carries on
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}: {one_line(exc)})"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return JSONResponse({"detail": validation_line(jsonable_encoder(exc.errors()))}, status_code=422)

    def check_conditioning(s):
        if s.digit is not None or s.cfg is not None:
            if not conditional(ck):
                raise HTTPException(422, NO_CONDITIONING)
            if s.digit is not None and s.digit >= len(names):
                raise HTTPException(422, f"digit {s.digit} is not a class of this model (0..{len(names) - 1})")

    def decode_key(s):
        """Requests with equal sampling settings share a call; a seeded one decodes alone."""
        scale = (DEFAULT_GUIDANCE if s.cfg is None else s.cfg) if s.digit is not None else 1.0
        temperature = s.temperature if s.temperature is not None else DRAW_TEMPERATURE if s.digit is not None else 1.0
        settings = (temperature, s.top_k, s.top_p, s.seed, scale)
        return None if s.seed is not None else settings, settings

    async def decode(prompts, s):
        key, settings = decode_key(s)
        return await decoder.submit(key, [(p, settings) for p in prompts])

    @app.get("/healthz", response_model=Health)
    async def healthz():
        return Health(status="ok", checkpoint=str(ck.folder), classes=names, image_size=list(size),
                      channels=channels, vocab_size=len(vocab), block_size=model.config.block_size,
                      parameters=model.num_params(), device=str(device),
                      conditional=conditional(ck), batching=batching)

    classify_doc = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary"}}}},
        "application/json": {"schema": ClassifyTokens.model_json_schema()}}}}

    @app.post("/classify", response_model=ClassifyResponse, openapi_extra=classify_doc)
    async def classify(request: Request):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            data, _ = await read_form(request, EmptyForm)
            item = await run_in_threadpool(decode_upload, data, size, channels)
        elif kind == "application/json":
            try:
                body = ClassifyTokens.model_validate_json(await request.body())
            except ValidationError as e:
                raise HTTPException(422, validation_line(e.errors())) from None
            item = tokens_prefix(body.tokens)
        else:
            raise HTTPException(415, "send an image as multipart/form-data (field \"image\") "
                                     "or JSON {\"tokens\": \"...\"}")
        ((prefix, probs),), rows = await classifier.submit("classify", [item])
        c = int(np.argmax(probs))
        return ClassifyResponse(prediction=c, label=names[c], probability=probs[c], probabilities=probs,
                                classes=names, tokens=vocab.decode(prefix), batch_rows=rows,
                                image_png=png_base64(pixels(prefix, ck)))

    def tokens_prefix(text):
        try:
            ids = vocab.parse(text, "tokens")
        except UserError as e:
            raise HTTPException(422, one_line(e)) from None
        if vocab.cls_id in ids:
            ids = ids[:ids.index(vocab.cls_id) + 1]
        else:
            ids = ids + ([] if vocab.img_end_id in ids else [vocab.img_end_id]) + [vocab.cls_id]
        return ids

    @app.post("/generate", response_model=GenerateResponse)
    async def generate(body: GenerateRequest):
        check_conditioning(body)
        prompt = [vocab.img_id] if body.digit is None else vocab.cond_prompt(body.digit)
        samples, rows = await decode([prompt] * body.count, body)
        return GenerateResponse(samples=samples, classes=names, batch_rows=rows)

    complete_doc = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image"],
        "properties": {"image": {"type": "string", "format": "binary"},
                       **CompleteForm.model_json_schema()["properties"]}}}}}}

    @app.post("/complete", response_model=CompleteResponse, openapi_extra=complete_doc)
    async def complete(request: Request):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "multipart/form-data":
            raise HTTPException(415, "send the image as multipart/form-data (field \"image\", "
                                     "settings as form fields)")
        data, s = await read_form(request, CompleteForm)
        check_conditioning(s)
        img = await run_in_threadpool(decode_upload, data, size, channels)
        prefix = (await asyncio.get_running_loop().run_in_executor(executor, ck.encode_images, img[None]))[0]
        codes = prefix[1:-2]
        keep = max(1, round(s.fraction * len(codes)))
        prompt = ([vocab.img_id] if s.digit is None else vocab.cond_prompt(s.digit)) + codes[:keep]
        if len(prompt) >= model.config.block_size:
            raise HTTPException(422, f"the kept {keep} tokens fill the model's block size "
                                     f"{model.config.block_size}; lower the fraction")
        samples, rows = await decode([prompt] * s.count, s)
        return CompleteResponse(samples=samples, classes=names, batch_rows=rows, kept=keep, total=len(codes),
                                input_png=png_base64(pixels(prefix, ck)),
                                given_png=png_base64(pixels(prompt, ck)))

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(os.path.join(static_dir, "index.html"))

    app.mount("/static", StaticFiles(directory=static_dir), name="static")
    return app


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
