"""Batch sources and their configs: one module per ``data.source`` kind (see registry)."""
