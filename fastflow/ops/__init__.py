"""Torch ops of fastflow, one module per op (schema, fake, reference, backend binding); see backends.py."""

from fastflow.ops.backends import (
    BACKENDS,
    BackendUnavailable,
    available_backends,
    describe_backends,
    resolve_backend,
)
from fastflow.ops.cache_forecast import cache_forecast, cache_forecast_reference

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "available_backends",
    "cache_forecast",
    "cache_forecast_reference",
    "describe_backends",
    "resolve_backend",
]
