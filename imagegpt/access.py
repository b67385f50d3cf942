"""Who may call the service: the API key (read from an environment variable or a file, never from the
command line, where ps shows it to every user of the machine), its check in constant time on every API
call, the rule that a service reachable from other machines has a key, and who a client is.

With a key, every path but the open ones needs the header `Authorization: Bearer <key>` and gets 401
without it. Open: the page and its files (it asks for the key itself), /healthz and /readyz (probes
of an orchestrator carry no key), and the API docs. /metrics needs the key (Prometheus sends it with
`authorization: {credentials: ...}` in its scrape config).
"""
import hashlib
import hmac
import ipaddress
import os

from imagegpt.errors import UserError

OPEN = frozenset({"/", "/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
MIN_KEY_CHARS = 16


def read_key(env_name, file):
    """The API key from `file` (its first line) if given, else from the environment variable `env_name`;
    None when neither holds one. UserError for an unreadable file or a key that cannot be one."""
    if file:
        try:
            with open(file, encoding="utf-8") as f:
                key, where = (f.readline()).strip(), file
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--api_key_file {file}: cannot read the key ({getattr(e, 'strerror', None) or e})") from None
        if not key:
            raise UserError(f"--api_key_file {file}: the file is empty; its first line is the key")
    else:
        key, where = os.environ.get(env_name, "").strip(), f"the environment variable {env_name}"
        if not key:
            return None
    if len(key) < MIN_KEY_CHARS or not key.isascii() or not key.isprintable() or " " in key:
        raise UserError(f"the API key in {where}: expected at least {MIN_KEY_CHARS} printable ASCII characters "
                        "without spaces (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return key


def is_loopback(address):
    """Is a bound address (a socket's getsockname()[0]) this machine only?"""
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return address == "localhost"


def check_exposure(address, key, env_name):
    """Refuse to serve on a non-loopback address without a key (UserError)."""
    if key is None and not is_loopback(address):
        raise UserError(f"--host {address} is reachable from other machines: set an API key first, in the "
                        f"environment variable {env_name} or a file named by --api_key_file (never on the command line)")


def client_of(scope):
    """Who a request comes from, for fairness: its remote address as uvicorn reports it (for a proxy it
    trusts, FORWARDED_ALLOW_IPS, the forwarded address). One key serves every client, so it names no one."""
    client = scope.get("client")
    return client[0] if client else "unknown"


def digest(value):
    return hashlib.sha256(value).digest()


class KeyCheck:
    """ASGI middleware: with a key, every path but OPEN (and the page's /static/ files) needs
    `Authorization: Bearer <key>`; anything else is 401 before the body is read. The comparison is
    hmac.compare_digest of SHA-256 digests: its time depends neither on where a wrong key differs nor on
    its length."""

    def __init__(self, app, key):
        self.app = app
        self.want = digest(key.encode("ascii")) if key else None

    async def __call__(self, scope, receive, send):
        if self.want is None or scope["type"] != "http" or scope["path"] in OPEN or scope["path"].startswith("/static/"):
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
        if hmac.compare_digest(digest(given), self.want):
            return await self.app(scope, receive, send)
        line = b'{"detail": "this service needs its API key: send the header Authorization: Bearer <key>"}'
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(line)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": line})
