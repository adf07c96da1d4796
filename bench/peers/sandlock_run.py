"""Runs a command in a sandlock sandbox with port_remap, the notified-call
peer of the syscall and connection-setup benchmarks (bench/run.sh installs
sandlock 0.9.0 into a virtual environment and runs this with its python).

    python sandlock_run.py CMD [ARG...]

The sandbox allows what the probes do (read everything, write /tmp, connect
and bind any TCP port) and remaps ports, so its supervisor handles their
socket calls through seccomp user notification, as appshot's does. The
command's output is passed through and its exit code is this script's.
"""

import sys

from sandlock import Sandbox


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: sandlock_run.py CMD [ARG...]", file=sys.stderr)
        return 2
    sandbox = Sandbox(
        port_remap=True,
        fs_readable=["/"],
        fs_writable=["/tmp"],
        net_allow=["*:*"],
        net_allow_bind=["*"],
    )
    result = sandbox.run(sys.argv[1:])
    sys.stdout.buffer.write(result.stdout or b"")
    sys.stderr.buffer.write(result.stderr or b"")
    if not result.success:
        print(f"sandlock_run.py: {result}", file=sys.stderr)
    return result.exit_code if result.exit_code >= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
