"""The one error type users see: a single line that says what is wrong and what to do."""


class QtutorError(ValueError):
    """Bad input or a missing resource. ``qtutor bench`` prints ``str(err)`` and exits with 2."""
