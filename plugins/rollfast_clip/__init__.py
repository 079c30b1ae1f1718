"""rollfast_clip plugin (in progress)."""
