"""What every script shares at its edge: bad input becomes one line on stderr and exit code 2."""
import sys


class UserError(Exception):
    """An input problem the user can fix; printed as one line, never as a traceback."""


def run(main, args):
    """Call main(args); a UserError (or a ValueError raised while validating) exits 2 with one line."""
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
