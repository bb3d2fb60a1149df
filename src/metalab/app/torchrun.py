"""``metalab-torchrun``: torchrun with metalab's exit status and no launcher traceback.

    metalab-torchrun --nproc_per_node=2 train.py trainer.device=cpu trainer.meta_batch_size=24

Plain ``torchrun`` runs metalab too, but when any process exits non-zero (a refusal: 2; a stop by
SIGTERM: 143) it prints a traceback and a failure table and exits 1, so a scheduler cannot tell a
refusal from a stop from a crash. This runs torchrun's own launcher (``torch.distributed.run``, the
same arguments) quietly and exits with the status of the first process that ended badly (a process
killed by signal n: 128 + n), each process having printed metalab's sentence itself; a signal to
the launcher stops every process (each writes its checkpoint first) and exits 128 + the signal.
"""

from __future__ import annotations

import logging
import os
import sys

from metalab.app.scripting import exit_status

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # the level of the agent's own loggers, read at import
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for name in ("torch.distributed.run", "torch.distributed.launcher", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # the agent's log only repeats the exit statuses

    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        torchrun.run(args)
    except ChildFailedError as error:
        return exit_status(error.get_first_failure()[1].exitcode)
    except SignalException as error:
        return 128 + int(error.sigval)
    except Exception as error:  # the launcher itself failed: rendezvous, a port in use, a script not found
        print(f"error: torchrun could not run the processes ({error}).".replace("\n", " "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
