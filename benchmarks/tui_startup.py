"""The TUI's start-up and idle cost: ``athanor`` on a real terminal (tmux) against a gateway with 50 models.

    .venv/bin/python benchmarks/tui_startup.py [--models 50] [--idle-seconds 10] [--rounds 3]

Prints the time from launching ``athanor`` to the first full screen (every model's row and the header shown, read
back from the terminal with tmux capture-pane every 10 ms), and the idle TUI's CPU use as a share of one core over
``--idle-seconds`` (user + system time of the TUI's process, read by psutil). Targets (issue 15): first screen
<= 1 s, idle CPU < 3% of one core. Needs tmux.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from _gateway import ATHANOR, gateway


def tmux(socket: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tmux", "-L", socket, "-f", "/dev/null", *args], capture_output=True, text=True, env=env)


def first_screen(home: Path, names: list[str], idle_seconds: float) -> tuple[float, float]:
    """Seconds to the first full screen, and the idle CPU share of one core afterwards."""
    socket = f"athanor-bench-{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if k != "TMUX"}
    launched = time.monotonic()
    rows = 2 * len(names) + 20  # the table gets about half of the screen: every model's row fits
    tmux(socket, "new-session", "-d", "-s", "tui", "-x", "160", "-y", str(rows), f"ATHANOR_HOME={home} {ATHANOR}",
         env=env)
    try:
        while True:
            screen = tmux(socket, "capture-pane", "-p", "-t", "tui", env=env).stdout
            if all(name in screen for name in names) and "manager " in screen and "| up " in screen:
                seconds = time.monotonic() - launched
                break
            if time.monotonic() - launched > 30:
                raise RuntimeError(f"no full screen after 30 s:\n{screen}")
            time.sleep(0.01)  # how often the terminal is read back: the resolution of the figure
        pane = int(tmux(socket, "display", "-p", "-t", "tui", "#{pane_pid}", env=env).stdout)
        proc = psutil.Process(pane)
        time.sleep(2)  # let the start-up work settle before the idle window
        before, start = proc.cpu_times(), time.monotonic()
        time.sleep(idle_seconds)  # the idle window measured
        after, elapsed = proc.cpu_times(), time.monotonic() - start
        busy = (after.user + after.system) - (before.user + before.system)
        tmux(socket, "send-keys", "-t", "tui", "q", env=env)
        return seconds, 100 * busy / elapsed
    finally:
        tmux(socket, "kill-server", env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("tmux") is None:
        sys.exit("tmux is needed (apt-get install tmux)")
    names = [f"m{i:02d}" for i in range(args.models)]
    with tempfile.TemporaryDirectory() as tmp, gateway(Path(tmp), "{ctxSize: 256}", tuple(names)) as served:
        results = [first_screen(served.home, names, args.idle_seconds) for _ in range(args.rounds)]
    starts, idles = [r[0] for r in results], [r[1] for r in results]
    print(f"first full screen with {args.models} models: median {statistics.median(starts):.2f} s "
          f"(rounds {', '.join(f'{s:.2f}' for s in starts)}; target <= 1 s)")
    print(f"idle TUI CPU: median {statistics.median(idles):.1f}% of one core "
          f"(rounds {', '.join(f'{c:.1f}' for c in idles)}; target < 3%)")


if __name__ == "__main__":
    main()
