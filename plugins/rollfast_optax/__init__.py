"""rollfast_optax plugin (in progress)."""
