"""Errors `g2trt optimize` reports as one line."""

from __future__ import annotations

from export.errors import G2trtError


class OptimizeError(G2trtError, ValueError):
    """A model the graph passes cannot optimize as asked (bad target, already optimized, unreadable)."""


class SiteCountError(OptimizeError):
    """A pass matched fewer sites than the model's config implies: never ship a half-fused graph."""
