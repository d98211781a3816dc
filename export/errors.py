"""Errors shared by all fabwatch packages."""


class UsageError(Exception):
    """Bad usage or bad input: the CLI prints this one-line message and exits with code 2."""
