"""PRISM mode (in progress)."""
