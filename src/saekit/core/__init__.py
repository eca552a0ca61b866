"""The ground floor every other room builds on; it imports nothing else from saekit.

``configs``: documented dataclasses from plain data, ``KindConfig`` families chosen by ``kind``.
``atomic``: atomic file writes and directory swaps, fsync, sha256. ``encoding``: what an encoder
produces (``SparseCode``, ``Preacts``, ``Encoding``, ``ForwardOutput``) and the affine encoder.
"""
