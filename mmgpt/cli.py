"""What the three commands share: a user's mistake ends the command with its message and exit status 1, not a
traceback. Bugs (any other exception) keep their traceback."""
from __future__ import annotations

import sys

from mmgpt.files import terminated


class UserError(Exception):
    """Base of the errors that are not bugs but a wrong input or environment (a failed parity check, an engine
    TensorRT refuses); the message names the input, what is wrong and what to do."""


# ValueError and friends: every bad input mmgpt checks raises one, with such a message.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, UserError)


def run_command(fn):
    try:
        return fn()
    except BaseException as e:
        if terminated.is_set():  # SIGTERM, whatever a library wrapped the exception raised for it into
            print("terminated by SIGTERM; nothing half-written was left behind", file=sys.stderr)
            raise SystemExit(143) from None  # 128 + SIGTERM, as if the signal had ended the process
        if isinstance(e, USER_ERRORS):
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        raise
