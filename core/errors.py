"""One exception type for every failure a user can act on: the CLI prints it as one line.

Its exit status says whose move it is: 2 (the default) for bad input, a file or place the user
named that cannot serve (fix the command); 1 for a run that failed on its way (a full disk: fix the
machine, then run the same command again to resume)."""

BAD_INPUT = 2
FAILED_RUN = 1


class TreeoptError(Exception):
    """A user-facing error. Its message is one line that names the file, the problem and the fix."""

    def __init__(self, message: str, exit_code: int = BAD_INPUT):
        super().__init__(message)
        self.exit_code = exit_code
