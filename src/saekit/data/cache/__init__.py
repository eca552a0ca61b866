"""The activation cache written by ``saekit cache``: reading and verifying, writing."""
