"""Kron modes."""
