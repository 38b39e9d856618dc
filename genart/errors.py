"""The one exception type for mistakes a user can make (bad path, bad config, bad checkpoint).

The CLI turns a UserError into one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: the message names the thing and says what to do."""
