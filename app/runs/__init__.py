"""Training runs: their configuration, their state machine, and their files."""
