"""rollfast_contrib: optimizers beyond the core set (in progress)."""
