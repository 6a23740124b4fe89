"""CLI commands for the eval stage (to be filled)."""
