"""`diffdraft serve`: an OpenAI-compatible HTTP server over a loaded pipeline.

    from diffdraft.serve import ServerSettings, create_app, run
    run(diffdraft.load(), ServerSettings(model_name="smollm2"), host="127.0.0.1", port=8000)

app.py holds the routes, protocol.py the request and response shapes, worker.py the
generation worker and its queue, metrics.py the Prometheus counters, stops.py stop strings.
The server sits on top of diffdraft.api; nothing below it knows of HTTP.
"""

from __future__ import annotations

from diffdraft.config import DraftConfig
from diffdraft.serve.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app", "run"]


def run(pipeline, settings: ServerSettings, draft: DraftConfig | None = None, host: str = "127.0.0.1",
        port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    uvicorn.run(create_app(pipeline, settings, draft), host=host, port=port, log_level=log_level)
