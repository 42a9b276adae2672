"""The one exception family for user mistakes: the CLI prints its message and exits 2."""


class RayllmError(Exception):
    """A problem the user can fix (bad input, bad config, missing resource).

    The message names what is wrong and how to fix it; the CLI shows it without a traceback.
    Anything else that escapes is a bug in rayllm and keeps its traceback.
    """
