"""saekit: train, evaluate and inspect sparse autoencoders on neural-network activations."""

from saekit._version import __version__

__all__ = ["__version__"]
