"""Credentials never leave the process in anything rcdm records: MLflow params and tags, log files, Hydra's
saved configs, checkpoint configs. Two kinds are recognised wherever they appear in text: the user
information of a URL (``scheme://user:password@host``) and the values of the credential variables of the
environment (AWS keys, MLflow tokens and passwords). Config keys that look like credentials are hidden whole
(``rcdm.tracking.redact``)."""
from __future__ import annotations

import logging
import os
import re
from typing import Any

MASK = "***"
ENV_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN",
                   "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME", "MINIO_ROOT_PASSWORD",
                   "MLFLOW_FLASK_SERVER_SECRET_KEY")
# scheme://user:password@ (also as Hydra saves an override: http\://user\:password@)
URL_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*\\?://)[^/@\s]*@", re.I)


def _env_values() -> list[str]:
    values = {os.environ.get(k, "") for k in ENV_CREDENTIALS}
    return sorted((v for v in values if len(v) >= 4), key=len, reverse=True)  # short values would mask words


def scrub(text: str) -> str:
    """``text`` with URL user information and the environment's credential values masked."""
    if not text:
        return text
    out = URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    for value in _env_values():
        out = out.replace(value, MASK)
    return out


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # terminal escapes and other control characters


def printable(text: str) -> str:
    """``text`` safe for a terminal: credentials masked (``scrub``) and control characters (ANSI escape sequences
    from a file someone else wrote) shown as ``\\x1b`` instead of acted on; newlines and tabs stay."""
    return CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", scrub(str(text)))


def scrub_tree(obj: Any) -> Any:
    """Every string in nested dicts and lists scrubbed."""
    if isinstance(obj, str):
        return scrub(obj)
    if isinstance(obj, dict):
        return {k: scrub_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub_tree(v) for v in obj)
    return obj


def split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """``scheme://user:password@host/...`` -> (``scheme://host/...``, user, password); others unchanged."""
    m = re.match(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^/@\s:]*)(:(?P<pw>[^/@\s]*))?@(?P<rest>.*)", url, re.I)
    if not m:
        return url, None, None
    return m["scheme"] + m["rest"], m["user"] or None, m["pw"]


def _scrubbing_factory(make):
    def factory(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: logging reports it at emit time
            return record
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        return record

    factory.rcdm_scrubs = True
    return factory


def guard_logging() -> None:
    """Mask credentials in every log record from here on, whatever handlers Hydra configures later (the
    record factory outlives logging.config.dictConfig); idempotent."""
    make = logging.getLogRecordFactory()
    if not getattr(make, "rcdm_scrubs", False):
        logging.setLogRecordFactory(_scrubbing_factory(make))
