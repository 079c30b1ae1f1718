"""rollfast_psgd plugin (in progress)."""
