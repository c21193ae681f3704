"""The one base class of every error a user can cause: the CLI prints its message as one line."""


class G2trtError(Exception):
    """Bad input or an unsupported setup; the message names the file (or option) and what is wrong."""
