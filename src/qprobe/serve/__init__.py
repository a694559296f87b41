"""`qprobe serve`: the best-of-k Q-probe policy behind an OpenAI-compatible HTTP API.

    models.py   what is served: one sampling model and its probes as model ids `{base}:{probe}`
    batcher.py  the request queue: requests that arrive together share one `sample` call
    app.py      the Starlette routes, request checking, OpenAI-style errors, SSE streaming

Starlette and uvicorn are the `serve` extra (`pip install qprobe[serve]`); this package imports
them only when a server is built. See docs/serve.md.
"""
