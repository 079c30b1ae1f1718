"""rollfast_magma plugin (in progress)."""
