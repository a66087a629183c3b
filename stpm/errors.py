"""The one exception type a user's mistake raises."""


class StpmError(Exception):
    """A problem the user can fix (missing folder, unreadable image, wrong model file).

    The message names the path and the fix; the CLI prints it on one line and exits non-zero.
    """


class ImageTooLarge(StpmError):
    """An image whose header asks for more pixels than the limit: refused before decoding."""
