"""serve.py in a process of its own on a free loopback port, for the load test and the web benchmark: started
and waited for, its memory (measure.status_kb), its /metrics read back, stopped; and clients that come from
other loopback addresses."""
import asyncio
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from imagegpt.measure import status_kb
from imagegpt.service_config import ServiceConfig
from imagegpt.settings import flat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUEST_TIMEOUT = 120.0   # seconds; a slower request counts as failed


@dataclass
class Where:
    """How serve.py runs the model: its threads (0: chosen from what the machine offers), device, backend."""
    threads: int = 0
    device: str = "cpu"
    backend: str = "torch"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """python serve.py in a subprocess on a free loopback port (keyless: the key's variable is not passed)."""

    def __init__(self, ckpt, cfg=None, where=None, **changes):
        cfg, where = cfg or ServiceConfig(), where or Where()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        options = {**flat(cfg), **changes}
        args = [a for k, v in options.items() if not k.startswith("api_key") for a in (f"--{k}", str(v))]
        env = {k: v for k, v in os.environ.items() if k != cfg.api_key_env}
        self.command = [sys.executable, os.path.join(ROOT, "serve.py"), "--ckpt", str(ckpt), "--port", str(self.port),
                        "--threads", str(where.threads), "--device", str(where.device), "--backend", where.backend, *args]
        self.proc = subprocess.Popen(self.command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out, err = self.stop()
                raise RuntimeError(f"serve.py did not start: {err.strip()[-500:]}")
            time.sleep(0.2)

    def memory_mb(self, field="VmRSS"):
        """The process's resident memory now (VmRSS) or at its peak (VmHWM), in MB; None once it ended."""
        kb = status_kb(field, self.proc.pid)
        return None if kb is None else kb / 1024

    def close(self):
        """Stop the service (as stop(), its output left unread)."""
        self.stop()

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.communicate()


def scrape(url):
    """/metrics -> {(name, sorted label items): value}."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def client_at(url, address):
    """An httpx client whose requests come from `address` (another loopback address: another client).
    Plain HTTP on loopback: no TLS, so no certificate store is loaded (httpx's default costs 22 ms a
    client, which held the load generator's own loop for a second when 48 clients opened at once)."""
    return httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT,
                             transport=httpx.AsyncHTTPTransport(local_address=address, verify=False))


async def wait_for(url, test, timeout=20.0):
    """Poll /metrics until test(samples) holds -> True, or False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if test(await asyncio.to_thread(scrape, url)):
            return True
        await asyncio.sleep(0.02)
    return False
