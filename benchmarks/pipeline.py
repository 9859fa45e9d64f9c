"""Timings of the pipeline commands a user waits for, as JSON.

    python -m benchmarks.pipeline [--repeat 3] [--json]

Each command runs as a fresh `aml-rollout` process (what a user pays, imports included) in a
temporary folder: `--help`, `pipeline validate`, `pipeline build -o`, and `pipeline run-local`
(train → register → package with a local registry). Prints
`{"help_s": [...], "validate_s": [...], "build_s": [...], "run_local_s": [...], "load_average": x}`
with one entry per repetition. Numbers are wall-clock and depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = str(Path(sys.executable).with_name("aml-rollout"))
EXAMPLE_SPEC = str(
    Path(__file__).resolve().parents[1] / "components" / "rollout" / "spec.example.yaml"
)
#: Each command's limit: a hung one fails the benchmark instead of holding it forever.
TIMEOUT_S = 300.0
COMMANDS = {
    "help_s": ["--help"],
    "validate_s": ["pipeline", "validate"],
    "build_s": ["pipeline", "build", "-o", "pipeline.yml", "--rollout-spec", EXAMPLE_SPEC],
    "run_local_s": ["pipeline", "run-local", "--registry", "local:registry", "--run-dir", "run"],
}


class CommandFailed(RuntimeError):
    """A timed command exited non-zero; the message names it and quotes its last line."""


def timed(argv: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [CLI, *argv], cwd=cwd, capture_output=True, text=True, check=False, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise CommandFailed(f"`aml-rollout {' '.join(argv)}` ran over {TIMEOUT_S:g} s") from None
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CommandFailed(f"`aml-rollout {' '.join(argv)}` exited {done.returncode}: {last[0]}")
    return round(time.perf_counter() - started, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each command (default 3)")
    # Like the other benchmarks (`make bench` passes it); the one line printed is JSON anyway.
    parser.add_argument("--json", action="store_true", help="print only the JSON result line")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, not {args.repeat}")
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeat):
        work = Path(tempfile.mkdtemp(prefix="aml-rollout-bench-"))
        try:
            for name, command in COMMANDS.items():
                times[name].append(timed(command, work))
        except CommandFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({**times, "load_average": round(os.getloadavg()[0], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
