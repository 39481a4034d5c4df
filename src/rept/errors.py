"""The one base class of user-facing errors: the CLI prints them as a single line and exits 2."""


class ReptError(Exception):
    """A problem with the user's input (a file, a column, a setting), stated in one line."""
