"""Errors a user can fix. `search.py` prints them as one line and exits 2."""


class UserError(Exception):
    """Base class: a fault in what the user gave us, not a bug."""


class DataError(UserError):
    """A dataset or input file is missing or malformed.

    Args:
        path: The file or folder at fault.
        fault: What is wrong with it, in a few words.
    """

    def __init__(self, path, fault):
        self.path = str(path)
        self.fault = fault
        super().__init__(f"{self.path}: {fault}")


class UsageError(UserError):
    """A command-line value, run directory or setting that cannot be used."""
