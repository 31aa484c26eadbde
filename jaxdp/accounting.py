"""Privacy accounting (placeholder until the accounting module lands)."""
