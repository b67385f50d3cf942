"""The clean stop: a uvicorn server that, on SIGTERM or Ctrl-C, stops admitting work (new requests get
503 with Retry-After, /readyz says not ready, /healthz still answers), lets the admitted work finish for
up to --drain_s seconds, then shuts down with uvicorn's own graceful shutdown and returns, so that the
command exits 0.

    server = drain.server(app)           # app = service.create_app(...)
    server.run(sockets=[sock])           # returns after a SIGTERM once the admitted work is answered

At the limit, or at a second signal, work still waiting gets 503 and a model call under way still
finishes (its answers get GRACE_S more seconds at least); a third signal forces the exit, as uvicorn's
second Ctrl-C does.
"""
import time

import uvicorn

GRACE_S = 5.0     # seconds the answers of a model call under way get after the drain, at least

def server(app, log_level="warning"):
    """A draining uvicorn server for an app of service.create_app (its admission and settings)."""
    return Server(uvicorn.Config(app, log_level=log_level, lifespan="on"), app.state.admission,
                  app.state.config.drain_s)


class Server(uvicorn.Server):
    """uvicorn.Server whose signal handler drains the admission first (see the module's docstring)."""

    def __init__(self, config, admission, drain_s):
        super().__init__(config)
        self.admission, self.drain_s = admission, drain_s
        self.signals = 0
        self.drain_started = None      # time.monotonic() of the first signal
        self.drained_in = None         # seconds the drain took
        self.cut = False               # the limit (or a second signal) ended the drain with work waiting

    def handle_exit(self, sig, frame):
        # Not recorded for uvicorn to raise again once it has shut down: that would end the process by
        # the signal (exit -15) instead of returning (exit 0). Setting flags only: safe in a signal handler.
        self.signals += 1
        if self.signals == 1:
            self.drain_started = time.monotonic()
            self.admission.drain()
        elif self.signals >= 3:
            self.force_exit = True

    async def on_tick(self, counter):
        if self.drain_started is not None and not self.should_exit:
            elapsed = time.monotonic() - self.drain_started
            if self.admission.idle() or elapsed >= self.drain_s or self.signals >= 2:
                if not self.admission.idle():
                    self.cut = True
                    self.admission.stop_waiting()      # waiting work: 503; a model call under way finishes
                # answers still being made (a model call under way) get the rest of the limit, at least GRACE_S
                self.config.timeout_graceful_shutdown = max(GRACE_S, self.drain_s - elapsed)
                self.drained_in = elapsed
                self.should_exit = True
        return await super().on_tick(counter)
