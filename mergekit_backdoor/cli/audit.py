"""CLI commands for the audit stage (to be filled)."""
