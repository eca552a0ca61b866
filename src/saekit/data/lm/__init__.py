"""Transformers models as activation sources: loading, hook points, harvesting, text."""
