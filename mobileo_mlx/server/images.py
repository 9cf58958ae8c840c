"""Image requests (generations and edits) as a sequence of units the scheduler interleaves
with chat decoding: the conditioning, then one unit per denoising step, then one per decode.

All of a request's images are denoised before any is decoded, so the DiT and the decoder
are never needed at once: with ``release`` the DiT is freed before the first decode and the
decoder after the last (what keeps the whole server within its memory budget; the next image
request loads them again).
"""

from __future__ import annotations

import io
from typing import Iterator

from .jobs import ImageJob, ImagesDone

# Response formats and the Pillow format that writes each.
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode(picture, output_format: str) -> bytes:
    """A PIL picture as the bytes of an image file, in memory."""
    buffer = io.BytesIO()
    picture.save(buffer, format=OUTPUT_FORMATS[output_format])
    return buffer.getvalue()


def work(model, job: ImageJob, release: bool) -> Iterator[None]:
    """``job``'s units; after the last one ``job.result`` holds the encoded images. Closing
    the generator between units abandons the job (nothing of it is kept)."""
    spec = job.spec
    conditioning = model.conditioning(spec.prompt, spec.source)
    job.conditioned = True
    spec.source = None
    yield
    latents = []
    for seed in spec.seeds:
        last = None
        for last in model.generate_latents(conditioning, steps=spec.steps, guidance=spec.guidance, size=spec.size,
                                           seed=seed, scheduler=spec.scheduler):
            yield
        latents.append(last.latents)
    if release:
        model.release("dit")
    images = []
    for latent in latents:
        images.append(encode(model.decode(latent)[0], spec.output_format))
        yield
    if release:
        model.release("vae")
    job.result = ImagesDone(images, list(spec.seeds))
