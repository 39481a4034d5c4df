"""CLI commands kept in their own modules (see rept.cli.EXTRA_COMMANDS)."""
