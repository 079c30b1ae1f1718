"""rollfast_prism plugin (in progress)."""
