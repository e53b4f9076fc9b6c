"""torchrun whose input errors are one line: `python launch.py --nproc_per_node=N SCRIPT.py [ARGS...]`.

torch.distributed.run (torchrun) answers any worker that exits non-zero with its own report: a
ChildFailedError traceback of about 40 lines. Our scripts check their inputs on every rank, print
the one-line error on rank 0 only and exit 2 (cli.run). This runs the same launcher with the same
arguments and, when the workers failed with exit code 2 (an input error, already reported), exits 2
without the launcher's report. Any other failure is reported as torchrun reports it.
"""
import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

INPUT_ERROR = 2
_STOPPED = {-15, -9}  # workers the launcher stopped after the first failure (SIGTERM, SIGKILL)


def main(argv):
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if INPUT_ERROR in codes and codes <= {INPUT_ERROR} | _STOPPED:
            return INPUT_ERROR
        raise
    return 0


def quiet_launcher():
    """The launcher's own loggers (each with its own level) report failures at ERROR: keep CRITICAL only."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


if __name__ == "__main__":
    quiet_launcher()
    sys.exit(main(sys.argv[1:]))
