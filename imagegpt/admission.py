"""Admission to the model: a queue bounded in rows (drawings and images, not requests), turns between
clients, deadlines, work dropped before it is computed when nobody waits for it any more, the drain,
and the batcher that merges waiting jobs into one model call.

    admission = Admission(max_rows=192, max_client_rows=128, deadline_s=30, metrics=telemetry.Metrics())
    decoder = Batcher("draw", run, executor, window=0.01, max_rows=64, admission=admission)
    async with admission.ticket(client, rows=64, deadline_ms=None, receive=request.receive) as t:
        results, shared = await decoder.submit(t, key, items)

A ticket reserves its rows from admission until its request is answered: past `max_rows` in all or
`max_client_rows` for one client (a remote address) the request is Refused at once (503 with a
Retry-After), and while the service drains every new request is. A job waits in its client's line;
the batcher takes the first job of each client in turn, so that a client with many jobs waiting
does not starve the others. A job whose deadline passes, or whose client disconnects, while it waits
is dropped (Expired: 504; Gone: nobody to answer) and never computed; a job already in a model call
finishes with its batch (the call is never cut), and only its answer is thrown away.
"""
import asyncio
import collections
import math
import time
from contextlib import asynccontextmanager

RETRY_AFTER_MAX = 30      # seconds: the longest wait a refusal suggests


class Refused(Exception):
    """503: the queue is full (reason queue_full / client_full) or the service stops (draining, stopping)."""

    def __init__(self, reason, retry_after, detail):
        super().__init__(detail)
        self.reason, self.retry_after = reason, retry_after


class Expired(Exception):
    """504: the request's deadline passed before its answer was ready."""


class Gone(Exception):
    """The client disconnected: there is nobody to answer."""


class Admission:
    """The bound on admitted work, counted in rows, in all and per client; the deadline rule; the drain."""

    def __init__(self, max_rows, max_client_rows, deadline_s, metrics):
        self.max_rows, self.max_client_rows, self.deadline_s = max_rows, max_client_rows, deadline_s
        self.metrics = metrics
        self.rows = 0                              # admitted rows not yet answered
        self.by_client = collections.Counter()
        self.accepting = True
        self.rate = None                           # rows per second of the model (moving average)
        self.batchers = []
        metrics.queue_limit.set(max_rows)
        metrics.queue_rows.set_function(lambda: self.rows)              # read when /metrics is scraped
        metrics.ready.set_function(lambda: 1 if self.accepting else 0)

    def retry_after(self):
        """Seconds a refused client should wait: the admitted rows at the model's recent pace (1..30)."""
        if not self.rate:
            return 1
        return int(min(RETRY_AFTER_MAX, max(1, math.ceil(self.rows / self.rate))))

    def observe(self, rows, seconds):
        """One model call of `rows` rows took `seconds`: update the pace that Retry-After uses."""
        pace = rows / max(seconds, 1e-6)
        self.rate = pace if self.rate is None else 0.8 * self.rate + 0.2 * pace

    def ready(self):
        """Does the service take work now (not draining, room for at least one row)?"""
        return self.accepting and self.rows < self.max_rows

    def refuse(self, reason, detail):
        self.metrics.refused.labels(reason).inc()
        raise Refused(reason, self.retry_after(), detail)

    def deadline(self, header):
        """The request's deadline (time.monotonic() seconds) from the setting and the header a client
        may send to lower it (milliseconds); ValueError for a header that is not a positive integer."""
        seconds = self.deadline_s
        if header is not None:
            text = header.strip()
            if not text.isdigit() or int(text) < 1:
                raise ValueError(f"X-Deadline-Ms: expected a positive whole number of milliseconds, got {header[:40]!r}")
            seconds = min(seconds, int(text) / 1000)
        return time.monotonic() + seconds

    @asynccontextmanager
    async def ticket(self, client, rows, deadline, receive=None):
        """Reserve `rows` for `client` until the block ends (Refused at once when there is no room)."""
        if not self.accepting:
            self.refuse("draining", "the service is stopping; try again elsewhere or later")
        if self.rows + rows > self.max_rows:
            self.refuse("queue_full", f"the queue is full ({self.rows} of {self.max_rows} drawings and images "
                                      f"waiting; this request adds {rows}); retry after the Retry-After seconds")
        if self.by_client[client] + rows > self.max_client_rows:
            self.refuse("client_full", f"this client already has {self.by_client[client]} drawings and images "
                                       f"waiting (at most {self.max_client_rows}); retry after the Retry-After seconds")
        t = Ticket(self, client, rows, deadline, receive)
        self.rows += rows
        self.by_client[client] += rows
        try:
            yield t
        finally:
            t.close()

    def release(self, t):
        self.rows -= t.rows
        self.by_client[t.client] -= t.rows
        if self.by_client[t.client] <= 0:
            del self.by_client[t.client]

    def drain(self):
        """Stop admitting (safe to call from a signal handler or another thread: it sets a flag only)."""
        self.accepting = False

    def idle(self):
        return self.rows == 0

    def stop_waiting(self):
        """The drain's time is up: every job still waiting gets 503 and is not computed (in the event loop)."""
        for b in self.batchers:
            b.drop_all()


class Ticket:
    """One admitted request: its client, rows, deadline, the jobs it submitted, and the ASGI receive
    that tells when its client disconnects."""

    def __init__(self, admission, client, rows, deadline, receive):
        self.admission, self.client, self.rows, self.deadline, self.receive = admission, client, rows, deadline, receive
        self.running = None        # a job in a model call when the request ended: release after it

    def close(self):
        """The request is answered (or gone): its rows leave the queue, once any model call of it ends."""
        if self.running is not None and not self.running.fut.done():
            self.running.fut.add_done_callback(lambda _: self.admission.release(self))
        else:
            self.admission.release(self)

    async def wait(self, batcher, job):
        """The job's results, or Expired at the deadline, or Gone when the client disconnects (a job still
        waiting is then dropped, never computed)."""
        watch = asyncio.ensure_future(disconnected(self.receive)) if self.receive else None
        try:
            done, _ = await asyncio.wait([job.fut] + ([watch] if watch else []),
                                         timeout=max(0.0, self.deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if watch:
                watch.cancel()
        if job.fut.done():
            return job.fut.result()
        gone = watch is not None and watch in done
        batcher.drop(job, "disconnected" if gone else "expired")
        if job.started:
            self.running = job
        raise Gone() if gone else Expired(f"the deadline passed before the answer was ready "
                                          f"(after {self.admission.deadline_s:g} s or the X-Deadline-Ms header)")


async def disconnected(receive):
    """Return when the ASGI server reports that the client went away (the body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class Job:
    __slots__ = ("key", "items", "fut", "ticket", "started", "queued_at")

    def __init__(self, key, items, ticket):
        self.key, self.items, self.ticket = key, items, ticket
        self.fut = asyncio.get_running_loop().create_future()
        self.started, self.queued_at = False, time.monotonic()


class Batcher:
    """Runs jobs as calls of run(key, items) -> results (one per item) in the model thread. Jobs wait in
    one line per client; after `window` seconds (None: no batching, every job alone) it takes the first
    job of each client in turn, those with the first one's key (not None) together, up to max_rows rows
    a call (a bigger job goes alone)."""

    def __init__(self, kind, run, executor, window, max_rows, admission):
        self.kind, self.run, self.executor, self.window, self.max_rows = kind, run, executor, window, max_rows
        self.admission, self.metrics = admission, admission.metrics
        self.lines = collections.OrderedDict()    # client -> deque of jobs, in turn order
        self.waiting_rows = 0
        self.wakeup = None
        self.task = None
        admission.batchers.append(self)

    def start(self):
        self.wakeup = asyncio.Event()
        self.task = asyncio.create_task(self._loop())

    async def stop(self):
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass

    async def submit(self, ticket, key, items):
        """-> (results for items, rows in the call they shared); Expired, Gone or Refused if dropped."""
        job = Job(key, items, ticket)
        self.put(job)
        return await ticket.wait(self, job)

    def put(self, job):
        """Into the line of its client (the end of the turn order for a client new to it)."""
        self.lines.setdefault(job.ticket.client, collections.deque()).append(job)
        self.waiting_rows += len(job.items)
        if self.wakeup is not None:
            self.wakeup.set()

    def _unqueue(self, job):
        line = self.lines.get(job.ticket.client)
        if job.started or line is None or job not in line:
            return False
        line.remove(job)
        if not line:
            del self.lines[job.ticket.client]
        self.waiting_rows -= len(job.items)
        return True

    def drop(self, job, reason, error=None):
        """Take a job that still waits out of its line: it is never computed (counted by reason)."""
        if not self._unqueue(job):
            return False
        self.metrics.dropped.labels(reason).inc()
        self.metrics.dropped_rows.labels(reason).inc(len(job.items))
        if error is not None and not job.fut.done():
            job.fut.set_exception(error)
        return True

    def drop_all(self):
        for line in list(self.lines.values()):
            for job in list(line):
                self.drop(job, "stopping", Refused("stopping", 1, "the service stopped before this request's "
                                                                  "turn; try again elsewhere or later"))

    def take(self):
        """The next call's jobs: in rounds, the first job of each client in turn that fits the call."""
        now, group, rows, key = time.monotonic(), [], 0, None
        progress = True
        while progress:
            progress = False
            for client in list(self.lines):
                line = self.lines[client]
                while line and line[0].ticket.deadline <= now:     # expired while waiting
                    self.drop(line[0], "expired", Expired("the deadline passed while the request waited"))
                if client not in self.lines:
                    continue
                job = line[0]
                if group and (self.window is None or key is None or job.key != key
                              or rows + len(job.items) > self.max_rows):
                    continue
                self._unqueue(job)
                if client in self.lines:
                    self.lines.move_to_end(client)      # its turn is spent: to the end of the order
                group.append(job)
                rows += len(job.items)
                key = job.key
                progress = True
                if self.window is None or key is None or rows >= self.max_rows:
                    return group
        return group

    async def _loop(self):
        loop = asyncio.get_running_loop()
        while True:
            while not self.lines:
                self.wakeup.clear()
                await self.wakeup.wait()
            if self.window and self.waiting_rows < self.max_rows:
                await asyncio.sleep(self.window)        # company for the call
            group = self.take()
            if not group:
                continue
            for job in group:
                job.started = True
                self.metrics.queue_wait.labels(self.kind).observe(time.monotonic() - job.queued_at)
            items = [it for job in group for it in job.items]
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.run, group[0].key, items)
            except Exception as e:  # reaches the waiting requests, never ends the loop
                for job in group:
                    if not job.fut.done():
                        job.fut.set_exception(e)
                continue
            seconds = time.perf_counter() - t0
            self.admission.observe(len(items), seconds)
            self.metrics.model_rows(self.kind, len(items), seconds)
            at = 0
            for job in group:
                if not job.fut.done():
                    job.fut.set_result((results[at:at + len(job.items)], len(items)))
                at += len(job.items)
