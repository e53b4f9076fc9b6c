"""UserError: an input problem the user can fix.

The scripts print it as one line on stderr with exit code 2, never a traceback (cli.run). It lives
in the library so that quant/ (checkpoint loading, the integer backend) can raise it without
importing the scripts' own modules.
"""


class UserError(Exception):
    """An input problem the user can fix; printed as one line, never as a traceback."""
