"""The node agent: sources, fetcher, store, verifier, eviction, warm controller, metrics, CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("weightcache")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
