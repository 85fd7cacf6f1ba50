#!/usr/bin/env python3
"""Simulate a pod on one machine: N processes x M fake CPU devices.

    python launch/local.py --processes 2 --devices 4 -- \
        python -m arcstream.run --config=configs/default.py --config.output_dir=runs/pod2x4

Each process gets `ARCSTREAM_COORDINATOR/NUM_PROCESSES/PROCESS_ID`, JAX on the
CPU with M fake devices (`--xla_force_host_platform_device_count`), and its own
log file `<log_dir>/process_<i>.log`; process 0 also echoes to this terminal.
Exits with the first non-zero exit code (and stops the others), so a failed
host fails the launch, as on a real pod.
"""

import argparse
import os
import socket
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices", type=int, default=4, help="fake CPU devices per process")
    p.add_argument("--log_dir", default="runs/launch_logs")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command every process runs (after --)")
    a = p.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("give the command to run after --")
    os.makedirs(a.log_dir, exist_ok=True)
    coord = f"127.0.0.1:{_free_port()}"
    procs = []
    for i in range(a.processes):
        env = dict(os.environ)
        env.update(
            ARCSTREAM_COORDINATOR=coord,
            ARCSTREAM_NUM_PROCESSES=str(a.processes),
            ARCSTREAM_PROCESS_ID=str(i),
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={a.devices}",
        )
        log = open(os.path.join(a.log_dir, f"process_{i}.log"), "w")
        out = None if i == 0 else log
        procs.append((subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None), log))
    rc = 0
    while procs:
        for proc, log in list(procs):
            r = proc.poll()
            if r is None:
                continue
            procs.remove((proc, log))
            log.close()
            if r != 0 and rc == 0:
                rc = r
                print(f"launch/local.py: a process exited with {r}; stopping the others "
                      f"(logs in {a.log_dir})", file=sys.stderr)
                for other, _ in procs:
                    other.terminate()
        time.sleep(0.1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
