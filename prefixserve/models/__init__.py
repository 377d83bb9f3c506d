"""Backbone loading and the Llama-family forward."""

from prefixserve.models.loader import Backbone, build_backbone, load_backbone

__all__ = ["Backbone", "build_backbone", "load_backbone"]
