"""Running a server until SIGTERM or Ctrl-C, then stopping it within a second and saying so.

``medtune serve`` and ``medtune web`` share this path. Each runs a uvicorn server in a background thread (Gradio
starts its own that way; ``serve`` does the same so that both stop alike) while the main thread waits for a
signal. On SIGTERM or SIGINT the server stops taking requests and the app ends its own long ones (``serve``:
generation stops at the next token and each open request is answered 503); what is still in flight gets
:data:`GRACE_SECONDS`, and then the connections still open (a browser tab's event stream) are dropped. Left to
themselves, uvicorn waits for every connection to close and Gradio for up to five seconds
more, which is how ``medtune web`` came to take six seconds to stop; and uvicorn re-raises the signal once it
is done, so nothing after it could report the stop. The heap is frozen once the server has stopped, so that
the interpreter's exit does not take longer than the stop.
"""
from __future__ import annotations

import gc
import logging
import signal
import threading
from typing import Callable

from medtune.errors import UserError

log = logging.getLogger(__name__)

GRACE_SECONDS = 0.4  # for the requests in flight; with the closing around it, a stop takes under a second
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def wait_until_listening(server, thread: threading.Thread, what: str) -> None:
    """Return once ``server`` (a ``uvicorn.Server`` that ``thread`` runs) accepts connections; a server that
    stopped before that (a port already in use, say: uvicorn has logged why) is one error line."""
    while not server.started:
        if not thread.is_alive():
            raise UserError(f"{what} could not start (the reason is logged above)")
        thread.join(0.05)


def run_until_signalled(server, thread: threading.Thread, what: str,
                        on_stop: Callable[[], None] | None = None,
                        ready: Callable[[], None] | None = None) -> None:
    """Block until SIGTERM or SIGINT (or the server ending by itself), stop ``server`` within about a second, and
    log that ``what`` stopped. ``on_stop`` is called first, to end the app's own long requests (streams) cleanly
    rather than have uvicorn cancel them. ``ready`` (which logs the "listening" line) is called once the signals
    are caught, so whoever waits for that line may signal at once (logged earlier, a signal in between would kill
    the process outright). Call from the main thread: only it receives signals."""
    received: list[str] = []
    stop = threading.Event()

    def on_signal(number, frame) -> None:
        received.append(signal.Signals(number).name)
        stop.set()

    previous = {number: signal.signal(number, on_signal) for number in STOP_SIGNALS}
    if ready is not None:
        ready()
    try:
        while thread.is_alive() and not stop.wait(0.1):
            pass
        if on_stop is not None:
            on_stop()
        # uvicorn cancels the requests still running after the grace, then stops; forced only if that hangs
        server.config.timeout_graceful_shutdown = GRACE_SECONDS
        server.should_exit = True
        thread.join(2 * GRACE_SECONDS)
        server.force_exit = True
        thread.join(GRACE_SECONDS)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    log.info("%s stopped%s", what, f" ({received[0]})" if received else "")
    # The process ends next. Its final garbage collections would walk every object torch and transformers made
    # (over a second with a model loaded, on a 2-core CPU); they skip frozen objects, whose memory goes back to
    # the system with the process anyway.
    gc.freeze()
