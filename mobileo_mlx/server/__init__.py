"""``mobileo-mlx serve``: an OpenAI-compatible HTTP server for one Mobile-O model.

One model is loaded once and shared by every request; all its MLX work runs on one worker
thread, fed through a bounded queue. The pieces:

* :mod:`.app`: the ASGI app (FastAPI on uvicorn): routes, OpenAI's errors, the API key, the
  body limit, one log line per request; :func:`.app.serve` runs it until SIGINT / SIGTERM;
* :mod:`.openai_api`: OpenAI's request and response shapes, checked and turned into jobs;
* :mod:`.scheduler`: the worker thread, the queue, cancellation, what stays in memory;
* :mod:`.batching`: chat answers decoding together (continuous batching on mlx-lm);
* :mod:`.images`: image generations and edits, a denoising step at a time;
* :mod:`.jobs` and :mod:`.settings`: what they share.

FastAPI, uvicorn and python-multipart come with the ``server`` extra
(``pip install "mobileo-mlx[server]"``); only :mod:`.app` needs them.
"""

EXTRA_MODULES = ("fastapi", "starlette", "uvicorn", "multipart", "python_multipart", "anyio", "pydantic")
