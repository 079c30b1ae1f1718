"""PSGD Kron mode (in progress)."""
