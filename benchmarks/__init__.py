"""Performance benchmarks: scripts that print ratios measured in one run."""
