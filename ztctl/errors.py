class CliError(Exception):
    """A user-facing failure: ztctl prints it as one line and exits 1."""
