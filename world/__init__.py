"""The demo web: a procedural image–text world with ground truth, and its HTTP server.

Exports are loaded lazily, so that ``world.scenes`` or ``world.render`` (what render workers
import) do not pull in pyarrow and the server.
"""
from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_PORT", "generate_world", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("DEFAULT_PORT", "generate_world"):
        from recap.world import generate

        return getattr(generate, name)
    if name == "serve":
        from recap.world.server import serve

        return serve
    raise AttributeError(f"module 'world' has no attribute {name!r}")
