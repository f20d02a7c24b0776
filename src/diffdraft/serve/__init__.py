"""`diffdraft serve`: an OpenAI-compatible HTTP server over a loaded pipeline.

    from diffdraft.serve import ServerSettings, create_app, run
    run(diffdraft.load(), ServerSettings(model_name="smollm2"), host="127.0.0.1", port=8000)

app.py holds the routes, protocol.py the request and response shapes, worker.py the
generation worker and its queue, metrics.py the Prometheus counters, stops.py stop strings.
The server sits on top of diffdraft.api; nothing below it knows of HTTP.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from diffdraft.config import DraftConfig
from diffdraft.errors import DiffdraftError
from diffdraft.serve.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app", "run"]


def run(pipeline, settings: ServerSettings, draft: DraftConfig | None = None, host: str = "127.0.0.1",
        port: int = 8000, log_level: str = "info") -> None:
    """Serve until stopped: Ctrl-C or SIGTERM finish the requests under way, then return; a second Ctrl-C stops
    at once. The HTTP server runs on a thread of its own, and the calling thread -- the one that loaded the
    model -- runs the generation loop, so that torch's thread pool belongs to that one thread (docs/design.md,
    "Serving": a loop on a second thread would start a second pool, and OpenMP then stops spinning between
    parallel regions; decoding ran 1.5 to 2 times slower)."""
    import uvicorn

    app = create_app(pipeline, settings, draft, loop_on_caller=True)
    worker = app.state.worker
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))

    def serve_http() -> None:
        try:
            server.run()
        except SystemExit:  # uvicorn's way of saying it could not start; its log line says why
            pass
        finally:
            worker.close()  # (the app closes it on a clean shutdown; here also when the server could not start)

    http = threading.Thread(target=serve_http, name="diffdraft-http", daemon=True)
    with _stop_signals(server):
        http.start()
        worker.run_here()
        http.join()
    if not server.started:
        raise DiffdraftError(f"could not serve on http://{host}:{port}: the ERROR line above says why")


@contextmanager
def _stop_signals(server):
    """While serving from the main thread: SIGINT and SIGTERM ask `server` to finish and stop (what uvicorn does
    itself when it runs on the main thread); a second SIGINT goes to the handler that was there before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def stop(sig, frame):
        if sig == signal.SIGINT and server.should_exit:
            server.force_exit = True
            handler = before[signal.SIGINT]
            if callable(handler):
                handler(sig, frame)  # (diffdraft.interrupts' raises KeyboardInterrupt when it is safe to)
            elif handler == signal.SIG_DFL:
                raise KeyboardInterrupt
            return
        server.should_exit = True

    for sig in before:
        signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
