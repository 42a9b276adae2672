"""Turning user paths into URLs every process of the cluster reads the same way."""

from __future__ import annotations

import os

import fsspec


def absolute_url(url: str) -> str:
    """Local paths become absolute (workers do not share the driver's working directory)."""
    if "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def is_local(url: str) -> bool:
    protocol = fsspec.core.split_protocol(url)[0]
    return protocol in (None, "file", "local")
