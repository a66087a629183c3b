"""The package's version, written into every model file it saves."""

__version__ = "0.6.0"
