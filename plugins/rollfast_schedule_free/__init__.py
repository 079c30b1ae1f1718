"""rollfast_schedule_free plugin (in progress)."""
