"""CLI commands for the data stage (to be filled)."""
