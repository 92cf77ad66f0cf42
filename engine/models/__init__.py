"""Model adapters by name: tiny random configs for tests and the offline default, or real weights."""
from __future__ import annotations

from engine.models.base import MODALITIES, Adapter, Capture, Family, Site
from engine.models.registry import family, family_of, get_adapter, site_map_of

__all__ = ["MODALITIES", "Adapter", "Capture", "Family", "Site", "family", "family_of",
           "get_adapter", "site_map_of"]
