"""The seven first-party geometries of the ``kron`` family, one module (and one entry
point) each. They follow the mode protocol documented in :mod:`rollfast_psgd`."""
