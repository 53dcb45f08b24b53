"""`dostream serve`: the OpenAI-compatible endpoint (FastAPI + uvicorn) that records every exchange.

    server = Server(ServeConfig(...))   the parts, built once (`serve/server.py`)
    app = build_app(server)             the ASGI app over it: lifespan, errors, the metrics
                                        middleware, the one router (`serve/routes.py`)
    serve(cfg)                          both, then uvicorn until interrupted

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}` (`serve/protocol.py`).
"""

from __future__ import annotations

from dostream.serve.config import ServeConfig
from dostream.serve.routes import build_app
from dostream.serve.server import Server

__all__ = ["ServeConfig", "Server", "build_app", "serve"]


def serve(cfg: ServeConfig, *, env_key: str | None, log_level: str = "info") -> None:
    """Load the model, open the store and serve until interrupted."""
    import uvicorn

    server = Server(cfg, env_key=env_key)
    if not server.auth.configured():
        server.store.close()
        raise ValueError(
            "no API key: set DOSTREAM_API_KEY, or make one with `dostream serve keys add --store "
            f"{cfg.store}`; dostream serve never runs unguarded"
        )
    uvicorn.run(build_app(server), host=cfg.host, port=cfg.port, log_level=log_level, timeout_graceful_shutdown=30)
