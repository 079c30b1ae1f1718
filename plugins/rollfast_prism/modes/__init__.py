"""PRISM modes."""
