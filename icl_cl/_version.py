"""The package version, in a module that imports nothing (the store records it; pyproject.toml
reads it from here)."""

__version__ = "0.1.0"
