"""The package version: the single source of truth (setup.py reads this file without importing
the package; ``ipa_fast.__version__`` re-exports it)."""
__version__ = "0.1.0"
