"""User-facing errors: the CLI prints these as one clear message, without a traceback."""


class TcaError(Exception):
    """Bad input or configuration; the message says which file/line/param and what to do."""
