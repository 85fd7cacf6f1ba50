"""A stand-in job for the run-lock tests: the real entry-point path (`cli.run_job`, so `cli.job_lock`),
without a model, so two of them start in about two seconds.

    python -m tests.store.lock_job --config=tests/store/lock_job.py --config.output_dir=DIR \
        --config.seconds=5

This file is also its own config file (`get_config`). The job appends one line
`<pid> start` to DIR/writes.log when it starts and `<pid> end` when it ends, so
a test can tell which process wrote the directory and whether they overlapped;
it ends early once DIR/stop exists.
"""

from __future__ import annotations

import os
import time

from ml_collections import config_dict


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    del arg
    c = config_dict.ConfigDict()
    c.output_dir = ""  # the directory the job "writes" (and locks)
    c.seconds = 5.0  # how long the job holds the lock at most (it ends sooner once DIR/stop exists)
    return c


class _Result:
    def summary_rows(self):
        return [("pid", str(os.getpid()))]


def _log(directory: str, what: str) -> None:
    from arcstream.io import RunLocation

    loc = RunLocation(directory)
    if loc.local is not None:
        with open(loc.local / "writes.log", "a") as f:
            f.write(f"{os.getpid()} {what}\n")
            f.flush()
            os.fsync(f.fileno())


def _job(config):
    _log(str(config.output_dir), "start")
    deadline = time.time() + float(config.seconds)
    stop = os.path.join(str(config.output_dir), "stop")
    while time.time() < deadline and not os.path.exists(stop):
        time.sleep(0.05)
    _log(str(config.output_dir), "end")
    return _Result()


if __name__ == "__main__":
    from arcstream import cli

    cli.run_job("arcstream.lock_test", _job, distributed=True)  # joins a pod under launch/local.py
