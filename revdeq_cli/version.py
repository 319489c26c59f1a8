"""The package version (a leaf: imports nothing), read by `revdeq --version` and the generated model code."""

__version__ = "0.2.0"
