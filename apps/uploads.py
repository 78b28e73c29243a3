"""The upload cap both apps apply: ``$TWINVIEW_MAX_UPLOAD_MB`` megabytes (10^6 bytes, fractions allowed).

It is checked on the bytes themselves because Streamlit's own ``server.maxUploadSize`` is not applied
everywhere (AppTest, other servers); ``twinview app`` sets both to the same value.
"""

from __future__ import annotations

import os

from twinview.errors import DataError

MAX_UPLOAD_ENV = "TWINVIEW_MAX_UPLOAD_MB"
MB = 1_000_000


def max_upload_bytes(default_mb: float) -> int:
    """The cap in bytes: the environment's value, else ``default_mb``; a bad value is a DataError."""
    raw = os.environ.get(MAX_UPLOAD_ENV, "").strip()
    try:
        mb = float(raw) if raw else float(default_mb)
    except ValueError:
        mb = -1.0
    if not 0 < mb < float("inf"):
        raise DataError(None, f"{MAX_UPLOAD_ENV} must be a positive number of megabytes, got {raw!r}")
    return int(mb * MB)


def check_upload_size(name: str, size: int, default_mb: float) -> None:
    """A DataError naming the upload when ``size`` bytes is over the cap."""
    cap = max_upload_bytes(default_mb)
    if size > cap:
        raise DataError(name, f"{size / MB:.3g} MB is over the upload cap of {cap / MB:.3g} MB "
                              f"({MAX_UPLOAD_ENV})")
