"""The one exception type for mistakes a user can make (bad path, bad config, bad checkpoint).

The CLI turns a UserError into one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: the message names the thing and says what to do."""


LINE_LIMIT = 300  # characters: a reject reason or error line stays one readable line in a report or a log


def one_line(exc: BaseException, with_type: bool = True, limit: int = LINE_LIMIT) -> str:
    """An exception as one short line for a reject reason or an error message: "ValueError: first line"."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if not text:
        return type(exc).__name__
    return (f"{type(exc).__name__}: {text}" if with_type else text)[:limit]
