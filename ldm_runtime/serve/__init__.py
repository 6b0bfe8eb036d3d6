"""``ldm serve``: an HTTP server over one bundle (OpenAI Images and AUTOMATIC1111 APIs, health, metrics).

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus_client); ``import ldm_runtime`` never
imports this package. ``core`` is the wire-neutral service, ``app`` the ASGI app over it.
"""
