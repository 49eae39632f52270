"""Shared pieces of the data_prep commands: JSONL files, the resumable manifest, an HTTP JSON
client with retries and exponential backoff, a requests-per-minute rate limiter and the
OpenAI-compatible endpoint settings.

Standard library only (urllib), so the commands need nothing beyond goal_jax's dependencies.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterable, Iterator

DEFAULT_BASE_URL = "https://api.openai.com/v1"
BASE_URL_ENV = "OPENAI_BASE_URL"
API_KEY_ENV = "OPENAI_API_KEY"
VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocab")


class DataPrepError(ValueError):
    """Bad input to a data_prep command; the message names the item and what is wrong."""


# ----------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------


def utc_now() -> str:
    """The current UTC time as ISO 8601 with seconds, e.g. ``2026-11-29T20:31:07Z``."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_jsonl(path: str, what: str = "file") -> list[dict]:
    """All JSON objects of a JSONL file (blank lines skipped).

    A truncated *last* line (an interrupted append) is ignored; any other bad line raises
    DataPrepError naming the file and line number.
    """
    if not os.path.isfile(path):
        raise DataPrepError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    out = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:  # interrupted while appending: the item is simply not done
                break
            raise DataPrepError(f"{what} {path} line {i + 1}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataPrepError(f"{what} {path} line {i + 1}: expected a JSON object")
        out.append(obj)
    return out


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def write_jsonl(path: str, records: Iterable[dict]) -> int:
    """Writes records atomically (temp file + rename); returns the line count."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".jsonl", dir=folder)
    n = 0
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def append_jsonl(path: str, record: dict) -> None:
    """Appends one line and flushes it to disk (a crash loses at most this line)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_bytes_atomic(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=folder)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_prompt_files(paths: Iterable[str]) -> list[dict]:
    """Prompt records (prompts.py / coco_captions.py output) from one or more JSONL files.

    Each record needs a non-empty string ``id`` (unique over all files) and ``prompt``.
    """
    records, seen = [], {}
    for path in paths:
        for n, rec in enumerate(read_jsonl(path, "prompts file"), start=1):
            rid, prompt = rec.get("id"), rec.get("prompt")
            if not isinstance(rid, str) or not rid:
                raise DataPrepError(f"prompts file {path} record {n}: 'id' must be a non-empty "
                                    f"string, got {rid!r}")
            if not safe_id(rid):
                raise DataPrepError(f"prompts file {path} record {rid}: 'id' may only hold "
                                    "letters, digits, '_', '-' and '.' (it names the image file)")
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataPrepError(f"prompts file {path} record {rid}: 'prompt' must be a "
                                    f"non-empty string, got {prompt!r}")
            if rid in seen:
                raise DataPrepError(f"prompts file {path} record {rid}: duplicate id (also in "
                                    f"{seen[rid]})")
            seen[rid] = path
            records.append(rec)
    return records


def safe_id(item_id: str) -> bool:
    return bool(item_id) and all(c.isalnum() or c in "_-." for c in item_id) \
        and not item_id.startswith(".")


class Manifest:
    """An append-only JSONL log of finished items, keyed by ``id`` (the last line of an id wins).

    Resuming = reading it back: :meth:`done` tells whether an id has a line whose ``image`` file
    still exists under ``root``.
    """

    def __init__(self, path: str, root: str | None = None):
        self.path = path
        self.root = root if root is not None else os.path.dirname(os.path.abspath(path))
        self.records: dict[str, dict] = {}
        if os.path.isfile(path):
            lines = read_jsonl(path, "manifest")
            for rec in lines:
                if isinstance(rec.get("id"), str):
                    self.records[rec["id"]] = rec
            if not _ends_with_newline(path):  # an interrupted append: drop the partial line
                write_jsonl(path, lines)

    def done(self, item_id: str) -> bool:
        rec = self.records.get(item_id)
        if rec is None:
            return False
        image = rec.get("image")
        return not image or os.path.isfile(os.path.join(self.root, image))

    def add(self, record: dict) -> None:
        append_jsonl(self.path, record)
        self.records[record["id"]] = record


# ----------------------------------------------------------------------------------------------
# HTTP: rate limit, retries, OpenAI-compatible endpoints.
# ----------------------------------------------------------------------------------------------


class RateLimiter:
    """At most ``requests_per_minute`` request starts per minute: consecutive starts are spaced by
    at least ``60 / requests_per_minute`` seconds (0 or None = no limit). Thread-safe."""

    def __init__(self, requests_per_minute: float | None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if requests_per_minute is not None and requests_per_minute < 0:
            raise DataPrepError(f"rate limit must be >= 0 requests/minute, got {requests_per_minute}")
        self.interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._clock, self._sleep = clock, sleep
        self._next = None
        self._lock = threading.Lock()

    def wait(self) -> float:
        """Blocks until the next request may start; returns the seconds waited."""
        if not self.interval:
            return 0.0
        with self._lock:
            now = self._clock()
            start = now if self._next is None else max(now, self._next)
            self._next = start + self.interval
        waited = start - now
        if waited > 0:
            self._sleep(waited)
        return waited


class HTTPError(Exception):
    """An HTTP request that failed for good (after retries, or not retryable)."""

    def __init__(self, message: str, status: int | None = None, body: str = ""):
        super().__init__(message)
        self.status = status
        self.body = body


RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)
FATAL_STATUS = (401, 403)  # wrong key / no access: every further request fails the same way


class JSONClient:
    """POSTs JSON with retries (exponential backoff with jitter) and a rate limit.

    Retried: connection errors, timeouts and HTTP 408/409/429/5xx. The wait before retry k
    (k = 1, 2, ...) is ``backoff * 2**(k-1)`` seconds times a jitter in [1, 1.25), or the
    server's ``Retry-After`` seconds when larger, capped at ``max_backoff``. Other 4xx
    answers fail at once.

    Args:
      base_url: e.g. ``https://api.openai.com/v1``; request paths are appended to it.
      api_key: sent as ``Authorization: Bearer <key>`` (omitted when empty).
      max_retries: retries after the first attempt.
      timeout: seconds per attempt.
      limiter: a RateLimiter applied to every attempt (retries included).
    """

    def __init__(self, base_url: str, api_key: str = "", max_retries: int = 5,
                 backoff: float = 1.0, max_backoff: float = 60.0, timeout: float = 120.0,
                 limiter: RateLimiter | None = None, sleep: Callable[[float], None] = time.sleep,
                 log: Callable[[str], None] | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise DataPrepError(f"base URL must start with http:// or https://, got {base_url!r}")
        if max_retries < 0 or backoff < 0:
            raise DataPrepError("max_retries and backoff must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.max_retries = int(max_retries)
        self.backoff, self.max_backoff, self.timeout = float(backoff), float(max_backoff), timeout
        self.limiter = limiter or RateLimiter(None)
        self._sleep = sleep
        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        self._rng = random.Random(0)
        self.attempts = 0  # attempts made by this client (for summaries and tests)

    def post(self, path: str, payload: dict) -> dict:
        url = self.base_url + "/" + path.lstrip("/")
        data = json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.max_retries + 1):
            self.limiter.wait()
            self.attempts += 1
            retry_after = None
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    body = resp.read().decode("utf-8", "replace")
                try:
                    obj = json.loads(body)
                except json.JSONDecodeError:
                    raise HTTPError(f"POST {url}: answer is not JSON: {body[:200]!r}", 200, body)
                if not isinstance(obj, dict):
                    raise HTTPError(f"POST {url}: answer is not a JSON object", 200, body)
                return obj
            except urllib.error.HTTPError as e:
                body = e.read().decode("utf-8", "replace") if e.fp else ""
                message = f"POST {url}: HTTP {e.code} {_error_text(body)}"
                if e.code not in RETRY_STATUS or attempt == self.max_retries:
                    raise HTTPError(message, e.code, body) from None
                retry_after = _retry_after(e.headers.get("Retry-After") if e.headers else None)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                message = f"POST {url}: {getattr(e, 'reason', e)}"
                if attempt == self.max_retries:
                    raise HTTPError(message) from None
            wait = self.backoff * 2 ** attempt * (1 + 0.25 * self._rng.random())
            if retry_after is not None:
                wait = max(wait, retry_after)
            wait = min(wait, self.max_backoff)
            self._log(f"{message}; retry {attempt + 1}/{self.max_retries} in {wait:.2f} s")
            self._sleep(wait)
        raise AssertionError("unreachable")


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _error_text(body: str) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the start of the body."""
    try:
        err = json.loads(body).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    except (json.JSONDecodeError, AttributeError):
        pass
    return body[:200]


def endpoint_settings(base_url: str | None, api_key_env: str) -> tuple[str, str]:
    """(base URL, API key): the URL from the argument, else $OPENAI_BASE_URL, else OpenAI's;
    the key from the environment variable named ``api_key_env`` (never from the command line)."""
    url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    return url, os.environ.get(api_key_env, "")


def add_endpoint_args(parser, what: str) -> None:
    """--base-url, --api-key-env, --rpm, --max-retries, --backoff, --timeout."""
    g = parser.add_argument_group(f"{what} endpoint (OpenAI-compatible)")
    g.add_argument("--base-url", default=None,
                   help=f"API base URL including /v1 (default: ${BASE_URL_ENV} or {DEFAULT_BASE_URL})")
    g.add_argument("--api-key-env", default=API_KEY_ENV,
                   help="name of the environment variable holding the API key (default: %(default)s)")
    g.add_argument("--rpm", type=float, default=5.0,
                   help="rate limit in requests per minute, retries included; 0 = none "
                        "(default: %(default)s)")
    g.add_argument("--max-retries", type=int, default=5, help="retries per request (default: %(default)s)")
    g.add_argument("--backoff", type=float, default=2.0,
                   help="first retry wait in seconds, doubled each retry (default: %(default)s)")
    g.add_argument("--timeout", type=float, default=180.0, help="seconds per request (default: %(default)s)")


def client_from_args(args, log=None) -> JSONClient:
    url, key = endpoint_settings(args.base_url, args.api_key_env)
    return JSONClient(url, key, max_retries=args.max_retries, backoff=args.backoff,
                      timeout=args.timeout, limiter=RateLimiter(args.rpm), log=log)


def progress(iterable, total: int | None = None, desc: str = "", disable: bool = False) -> Iterator:
    """tqdm progress bar on stderr."""
    from tqdm import tqdm

    return iter(tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True))


def progress_bar(total: int, desc: str = "", disable: bool = False):
    """A manual tqdm bar (``.update(n)``, ``.close()``) on stderr."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True)


def read_vocab(name: str, vocab_dir: str | None = None) -> list[str]:
    """Lines of ``<vocab_dir>/<name>.txt`` (comments ``#`` and blank lines skipped)."""
    path = os.path.join(vocab_dir or VOCAB_DIR, name + ".txt")
    if not os.path.isfile(path):
        raise DataPrepError(f"vocabulary file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
    if not out:
        raise DataPrepError(f"vocabulary file {path} is empty")
    return out


def json_dump(obj: Any, path: str) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
