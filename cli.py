"""What every script shares at its edge: bad input becomes one line on stderr and exit code 2."""
import argparse
import sys


class UserError(Exception):
    """An input problem the user can fix; printed as one line, never as a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line ("error: ..."), exit 2, like every other input error."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def run(main, args):
    """Call main(args); a UserError exits 2 with one line on stderr."""
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
