"""Batch selection (placeholder until the sampling module lands)."""
