"""The one exception type the CLI turns into a single clear line on stderr and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file): the message names the flag or file at fault."""

    exit_code = 2


class RunFailed(UserError):
    """A run that could not produce a sound result (e.g. non-finite weights): one clear line, exit 1,
    nothing written to the output."""

    exit_code = 1


class DiskFull(UserError):
    """A write failed for want of space (or a file-size limit); what was half-written has been removed."""
