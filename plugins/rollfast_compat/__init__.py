"""rollfast_compat plugin (in progress)."""
