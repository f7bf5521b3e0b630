"""User-facing errors: the CLI prints these as one line (no traceback unless --debug)."""

__all__ = ["HemaflowError"]


class HemaflowError(Exception):
    """Bad input or configuration that the user can fix; the message says where and how."""
