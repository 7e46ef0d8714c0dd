"""The engine process of ``serving.engine_worker.ProcessEngineWorker``: ``python -m serving.engine_proc FD``.

A module of its own so that the classes whose instances cross the socket (exceptions, StepOut)
keep their importable names instead of living in ``__main__``.
"""

from __future__ import annotations

import logging
import sys

from serving.engine_worker import child_main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s engine[%(process)d] %(levelname)s %(name)s: %(message)s")
    sys.exit(child_main(int(sys.argv[1])))
