"""rollfast_partition plugin (in progress)."""
