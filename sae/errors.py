"""One exception type for user mistakes, so the CLI can print one line instead of a traceback."""


class SaekitError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""
