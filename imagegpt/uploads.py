"""Request bodies: their size limit and read deadline (ASGI middleware: 413, 408), multipart forms,
uploaded images decoded exactly as the training images (400 for what is not an image, 413 for a
decompression bomb), and the one-line error texts every answer of the service uses."""
import asyncio
import io
import json

import numpy as np
from fastapi import HTTPException
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from imagegpt.errors import UserError
from imagegpt.sources import read_image

MAX_PIXELS = 4096 * 4096          # decoded size limit for an upload (a decompression bomb stops here)


class Upload(io.BytesIO):
    """Uploaded bytes, named 'upload' in error messages (sources.read_image prefixes its path)."""

    def __str__(self):
        return "upload"

    __repr__ = __str__


def decode_upload(data, size, channels):
    """Uploaded image bytes (any format Pillow reads, any size) -> uint8 (H, W, C) converted and resized
    exactly as the training images (sources.read_image). HTTPException 413 for an image over MAX_PIXELS
    (a decompression bomb), 400 for anything that is not a readable image."""
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


class BodyLimit:
    """ASGI middleware: a request body over max_bytes gets 413 before the app reads any of it, and one that
    has not fully arrived after `timeout` seconds (a stalled upload) gets 408. Either way the connection
    closes; the body is read on the event loop, so a slow client holds no thread and no place in the queue."""

    def __init__(self, app, max_bytes, timeout):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._answer(send, 413, f"request body over the limit of {self.max_bytes} bytes")
        chunks, total, more = [], 0, True
        try:
            async with asyncio.timeout(self.timeout):
                while more:  # read (at most max_bytes of) the body, then hand it on
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    chunks.append(msg.get("body", b""))
                    total += len(chunks[-1])
                    if total > self.max_bytes:
                        return await self._answer(send, 413, f"request body over the limit of {self.max_bytes} bytes")
                    more = msg.get("more_body", False)
        except TimeoutError:
            return await self._answer(send, 408, f"the request body did not arrive within {self.timeout:g} s")
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _answer(send, status, detail):
        line = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(line)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": line})
