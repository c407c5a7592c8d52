"""The project's error type: bad input, or a state the user can fix.

``lavender``'s command line prints such an error as one line naming what is wrong, without a
traceback (``lavender --debug ...`` shows it); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LavenderError(Exception):
    """Bad input or a fixable state; the message names the file, record or option and the problem."""

    exit_code = 1
