"""``example:///DIR``: weavelet's file transport under another URL scheme."""

from __future__ import annotations

from typing import Any

from weavelet_file import FileTransport

SCHEME = "example"


class ExampleTransport(FileTransport):
    """Stores runs in ``DIR`` exactly as ``file:///DIR`` does; only the URL scheme differs."""

    def __init__(self, url: str, **options: Any) -> None:
        scheme, sep, rest = url.partition("://")
        if scheme.lower() != SCHEME or not sep:
            raise ValueError(f"not an {SCHEME}:// URL: {url!r}")
        super().__init__(f"file://{rest}", **options)
        self.url = url
