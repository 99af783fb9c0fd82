"""User-facing errors: one clear, actionable line; the CLI prints it and exits non-zero."""


class AnovlError(Exception):
    """An error caused by the user's input or configuration, not by a bug in anovl."""
