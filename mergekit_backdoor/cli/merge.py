"""CLI commands for the merge stage: ``sanitize`` and ``recipes``."""
