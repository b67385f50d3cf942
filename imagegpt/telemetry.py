"""The service's Prometheus metrics (prometheus-client): their names, one registry per app, the ASGI
middleware that counts every request by route and status, and the text served at /metrics.

    imagegpt_requests_total{route,status}        requests answered (499: the client left first)
    imagegpt_request_seconds{route}              histogram: arrival to answer
    imagegpt_queue_rows, imagegpt_queue_limit_rows   drawings and images admitted and not yet answered; the bound
    imagegpt_queue_wait_seconds{kind}            histogram: time a job waited for its model call
    imagegpt_batch_rows{kind}                    histogram: rows per model call (kind: draw, read)
    imagegpt_model_call_seconds{kind}            histogram: time of one model call
    imagegpt_drawings_total, imagegpt_images_read_total   rows computed (rate() gives drawings per second)
    imagegpt_refused_total{reason}               503 at once: queue_full, client_full, draining
    imagegpt_dropped_total{reason}, imagegpt_dropped_rows_total{reason}
                                                 work never computed: expired, disconnected, stopping
    imagegpt_ready                               1 while the service takes work, 0 from SIGTERM on
    process_*                                    the server process (resident memory, CPU seconds, ...)
"""
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder

API_ROUTES = ("/classify", "/generate", "/complete")
ROUTES = (*API_ROUTES, "/healthz", "/readyz", "/metrics", "/", "/docs", "/openapi.json")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DROP_REASONS = ("expired", "disconnected", "stopping")
REFUSE_REASONS = ("queue_full", "client_full", "draining")
KINDS = ("draw", "read")


class Metrics:
    """The metrics of one app, in their own registry (several apps in one process do not mix)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.requests = Counter("imagegpt_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("imagegpt_request_seconds", "time from a request's arrival to its answer",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_rows = Gauge("imagegpt_queue_rows", "drawings and images admitted and not yet answered", registry=r)
        self.queue_limit = Gauge("imagegpt_queue_limit_rows", "the bound on imagegpt_queue_rows (--max_queue)",
                                 registry=r)
        self.queue_wait = Histogram("imagegpt_queue_wait_seconds", "time a job waited for its model call",
                                    ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("imagegpt_batch_rows", "rows (drawings or images) in one model call",
                                    ["kind"], buckets=ROW_BUCKETS, registry=r)
        self.call_seconds = Histogram("imagegpt_model_call_seconds", "time of one model call", ["kind"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.drawings = Counter("imagegpt_drawings", "drawings made (rate() gives drawings per second)", registry=r)
        self.images = Counter("imagegpt_images_read", "uploaded images and token sequences classified", registry=r)
        self.refused = Counter("imagegpt_refused", "requests answered 503 at once, by reason", ["reason"], registry=r)
        self.dropped = Counter("imagegpt_dropped", "admitted requests whose work was never computed, by reason",
                               ["reason"], registry=r)
        self.dropped_rows = Counter("imagegpt_dropped_rows", "drawings and images never computed, by reason",
                                    ["reason"], registry=r)
        self.ready = Gauge("imagegpt_ready", "1 while the service takes work, 0 while it drains", registry=r)
        for reason in REFUSE_REASONS:       # every series exists from the start, at 0
            self.refused.labels(reason)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
            self.dropped_rows.labels(reason)
        for kind in KINDS:
            self.batch_rows.labels(kind)
            self.queue_wait.labels(kind)
            self.call_seconds.labels(kind)

    def model_rows(self, kind, rows, seconds):
        """One model call of `rows` rows (kind draw or read) took `seconds`."""
        self.batch_rows.labels(kind).observe(rows)
        self.call_seconds.labels(kind).observe(seconds)
        (self.drawings if kind == "draw" else self.images).inc(rows)

    def text(self, accept=None):
        """(body, content type) in the format the scraper's Accept header asks for (prometheus-client's
        negotiation: OpenMetrics or Prometheus text)."""
        encode, kind = choose_encoder(accept or "")
        return encode(self.registry), kind

    def answered(self, routes=API_ROUTES):
        """{status: requests} over the API's routes, for the line serve.py prints when it stops."""
        out = {}
        for family in self.registry.collect():
            if family.name == "imagegpt_requests":
                for s in family.samples:
                    if s.name.endswith("_total") and s.labels["route"] in routes:
                        out[s.labels["status"]] = out.get(s.labels["status"], 0) + int(s.value)
        return out


def route_of(path):
    """A request path -> its route label (a bounded set: any other path is 'other')."""
    if path in ROUTES:
        return path
    return "/static" if path.startswith("/static/") else "other"


class RequestMetrics:
    """ASGI middleware: every HTTP request counted by route and status, and timed (outermost, so that
    a 401, 413 or 503 from the layers inside is counted too)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500

        async def sent(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = route_of(scope["path"])
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
