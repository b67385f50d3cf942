"""The web service's settings: one dataclass, one sentence per field (serve.py --help shows them), and
their checks. Light on purpose: serve.py reads it before it imports torch or FastAPI."""
from dataclasses import dataclass

from imagegpt.errors import UserError

LARGEST_REQUEST = 64       # rows of the largest request (/generate count 64): every bound must fit one


@dataclass
class ServiceConfig:
    """How the service batches, bounds its queue, keeps deadlines, stops and finds its API key."""

    batch_window_ms: float = 10.0
    """how long concurrent requests are collected into one model call (0..1000 ms)"""
    max_batch: int = 64
    """most rows (images or drawings) in one model call"""
    batching: bool = True
    """merge concurrent requests into one model call (false: every request is its own call)"""
    max_upload_mb: float = 4.0
    """request bodies over this many MB get 413"""
    body_timeout_s: float = 15.0
    """a request body that has not fully arrived after this many seconds gets 408 (a stalled upload)"""
    max_queue: int = 192
    """drawings and images admitted and not yet answered, in all; a request past it gets 503 with Retry-After
    (the longest wait is about max_queue / the model's drawings per second)"""
    max_client_queue: int = 128
    """the same bound for one client (one remote address), so that no client holds the whole queue"""
    deadline_s: float = 30.0
    """longest a request waits for its answer (a client may lower it with the header X-Deadline-Ms); work
    still waiting then is dropped, and the client gets 504"""
    drain_s: float = 30.0
    """on SIGTERM or Ctrl-C: how long the work already admitted may take to finish before the service exits"""
    api_key_env: str = "IMAGEGPT_API_KEY"
    """the environment variable that holds the API key (needed with a --host other than loopback)"""
    api_key_file: str = ""
    """a file whose first line is the API key (used instead of the environment variable when given)"""

    def check(self):
        """UserError naming the option for a value out of range."""
        if not 0 <= self.batch_window_ms <= 1000:
            raise UserError(f"--batch_window_ms {self.batch_window_ms:g}: expected 0..1000")
        if self.max_batch < 1:
            raise UserError(f"--max_batch {self.max_batch}: expected a positive integer")
        for name in ("max_upload_mb", "body_timeout_s", "deadline_s", "drain_s"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} {getattr(self, name):g}: expected a positive number")
        if not LARGEST_REQUEST <= self.max_client_queue <= self.max_queue:
            raise UserError(f"--max_client_queue {self.max_client_queue} --max_queue {self.max_queue}: expected "
                            f"{LARGEST_REQUEST} (the largest request) <= max_client_queue <= max_queue")
        if not self.api_key_env:
            raise UserError("--api_key_env: expected the name of an environment variable")
        return self

    @property
    def window(self):
        """Seconds to collect requests into one call; None: no batching."""
        return self.batch_window_ms / 1000 if self.batching else None

    @property
    def max_upload(self):
        return int(self.max_upload_mb * 2**20)
