"""Keep passwords out of every record the suite writes: MLflow params and tags, config files, summaries,
console output, error messages, checkpoints, child-process command lines.

A password can reach the suite inside a URL (``postgresql://user:pw@host/db`` as the Optuna storage,
``http://user:pw@host:5000`` as the MLflow tracking URI, a data source URL) or as a ``password=...`` pair (a
libpq keyword string or a URL query). :func:`redact` turns every such password into ``***`` in any text, and
:func:`redact_tree` does it in a config dict; everything that writes or prints goes through them. The real
URL stays in memory and, for child processes, in the environment (:mod:`pc_lightning.sweep.study`).

:func:`split_credentials` takes the user and password out of a URL, so that a client that can read them from
elsewhere gets a URL without them (MLflow reads ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``;
libpq reads ``PGPASSWORD`` and ``~/.pgpass``).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"

# scheme://user:password@  (the password stops at the first '@', whitespace or quote; RFC 3986 requires an
# '@' inside a password to be written %40)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@'\"]*):(?P<password>[^\s@'\"]+)@")
# password=... in a libpq keyword string or a URL query (password, passwd, pwd; any case)
_KEY_PASSWORD = re.compile(r"(?P<head>\b(?:password|passwd|pwd)=)(?P<password>[^\s&;'\"]+)", re.IGNORECASE)


def redact(text: Any) -> Any:
    """``text`` with every password in a URL or ``password=`` pair replaced by ``***``; a non-string is
    returned unchanged."""
    if not isinstance(text, str):
        return text
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@", text)
    return _KEY_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", text)


def redact_tree(obj: Any) -> Any:
    """A copy of a (nested) dict/list/tuple with :func:`redact` applied to every string in it."""
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_tree(v) for v in obj)
    return redact(obj)


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``(url without user and password, user, password)``; user and password are percent-decoded and None
    where the URL has none."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None, None
    host = parts.netloc.rpartition("@")[2]
    bare = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return bare, user, password


def without_masked_password(url: str) -> str:
    """A URL read back from a record (``user:***@``) with the mask removed (``user@``), so that the client
    takes the password from where it keeps it (``PGPASSWORD``, ``~/.pgpass``) instead of trying ``***``."""
    return url.replace(f":{MASK}@", "@")
