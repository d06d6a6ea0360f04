"""One exception type for every mistake a user can fix: the CLI prints it as one line."""


class TreeoptError(Exception):
    """A user-facing error. Its message is one line that names the fix."""
