"""API keys: several at once (rotation), from flags, the environment or a re-read key file; the check."""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from fastapi import Request

from .errors import ApiError

logger = logging.getLogger("negvision.api")


class ApiKeys:
    """Accepted keys (several at once, for rotation): from ``keys``, the ``NEGVISION_API_KEY`` environment variable
    (comma-separated) and ``key_file`` (one key a line, ``#`` comments), which is re-read when it changes, so a key
    is rotated by editing the file, without a restart."""

    ENV = "NEGVISION_API_KEY"

    def __init__(self, keys: Sequence[str] = (), key_file: str | Path | None = None, use_env: bool = True,
                 recheck_s: float = 1.0) -> None:
        self.recheck_s = recheck_s  # how often the key file's mtime is looked at
        self.static = [k.strip() for k in keys if k and k.strip()]
        if use_env and os.environ.get(self.ENV):
            self.static += [k.strip() for k in os.environ[self.ENV].split(",") if k.strip()]
        self.key_file = Path(key_file) if key_file else None
        self._file_keys: list[str] = []
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if self.key_file is not None:
            self._reload(force=True)

    @staticmethod
    def read_key_file(path: Path) -> list[str]:
        """Keys in ``path``; ``ValueError`` naming the file when it cannot be read or holds none."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--api-key-file {path}: cannot read it ({e})") from e
        keys = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if not keys:
            raise ValueError(f"--api-key-file {path}: no key in it (one key a line)")
        return keys

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.recheck_s:
            return
        self._checked = now
        try:
            st = self.key_file.stat()
        except OSError:
            if force:
                raise ValueError(f"--api-key-file {self.key_file}: no such file") from None
            return  # keep the last good keys while the file is being replaced
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            keys = self.read_key_file(self.key_file)
        except ValueError:
            if force:
                raise
            logger.warning("API key file %s unreadable or empty; keeping the previous keys", self.key_file)
            return
        with self._lock:
            self._file_keys, self._stamp = keys, stamp

    @classmethod
    def of(cls, api_key: str | Sequence[str] | ApiKeys | None) -> ApiKeys:
        """``api_key`` as accepted keys: an ``ApiKeys`` as it is, one key or several (no environment), None: no auth."""
        if isinstance(api_key, ApiKeys):
            return api_key
        if not api_key:
            return cls((), use_env=False)
        return cls([api_key] if isinstance(api_key, str) else list(api_key), use_env=False)

    @property
    def enabled(self) -> bool:
        return bool(self.static or self.key_file)

    def keys(self) -> list[str]:
        if self.key_file is not None:
            self._reload()
        with self._lock:
            return self.static + self._file_keys

    def check(self, sent: str) -> bool:
        """Constant-time comparison against every accepted key."""
        ok = False
        for k in self.keys():
            ok |= hmac.compare_digest(sent.encode(), k.encode())
        return ok

    def authorize(self, request: Request) -> None:
        """Let ``request`` through when it sends an accepted key (``X-API-Key`` or ``Authorization: Bearer``) or
        no key is set; else a 401 ``ApiError``."""
        if not self.enabled:
            return
        sent = request.headers.get("x-api-key")
        if sent is None:
            auth = request.headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                sent = auth[7:].strip()
        hdr = {"WWW-Authenticate": "Bearer"}
        if sent is None:
            raise ApiError(401, "missing API key: send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY'",
                           headers=hdr)
        if not self.check(sent):
            raise ApiError(401, "wrong API key", headers=hdr)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost (the server is reachable from this machine only)."""
    import ipaddress

    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
