"""The one exception type the CLI turns into a single ``error: ...`` line and exit code 2."""


class HTCError(ValueError):
    """Bad input from the user: a wrong option, file, checkpoint or cache. The message says which."""
