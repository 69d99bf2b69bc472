"""The one root of user mistakes. A `UserError` is a wrong input or environment, never a bug: its message names the
input (file, field, option), what is wrong and what to do. The commands print only these as `error: ...` and exit 1;
every other exception is a bug and keeps its traceback.

It subclasses ValueError so that code validating a value can be caught where a ValueError is expected."""
from __future__ import annotations


class UserError(ValueError):
    """A wrong input or environment; the message says which, what is wrong and what to do."""
