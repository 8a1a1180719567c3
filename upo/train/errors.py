"""``UserError``: a mistake in the user's input, reported by ``upo-train`` as one line with exit status 2."""


class UserError(Exception):
    """A mistake in the user's input (flags, config, data). Reported as one line, no traceback."""
