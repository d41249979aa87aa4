"""Instruction datasets: format detection and validation, storage, statistics."""
