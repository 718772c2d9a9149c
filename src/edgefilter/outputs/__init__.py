"""What decisions become for people and tools: decision log, events, Prometheus, stats, report, evidence."""
