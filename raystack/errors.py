"""The one exception type the CLI turns into a single clear line on stderr and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file): the message names the flag or file at fault."""

    exit_code = 2
