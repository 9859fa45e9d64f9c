"""A separate venv for `azureml-inference-server-http` (it pins its own Flask and pydantic).

`ensure_azureml_venv()` creates `.venv-azureml` at the repository root (gitignored via `.venv-*/`)
with the AML inference server plus the scoring dependencies at the SAME versions as the running
interpreter (a skops file must load with the scikit-learn that wrote it), and returns the path of
its `azmlinfsrv` script. It is idempotent (a stamp file records what was installed) and safe to
call from parallel test sessions (an fcntl lock). When pip cannot install the packages it raises
AzuremlEnvUnavailable with pip's last lines, so callers can say exactly why.

`score.py` is run from the repository checkout: callers put the root on PYTHONPATH.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-azureml"
SERVER_PACKAGE = "azureml-inference-server-http"
SAME_AS_HERE = ("numpy", "scikit-learn", "scipy", "skops", "orjson")


#: azmlinfsrv binds 0.0.0.0, a constant with no option to change it; this starts it on loopback.
_ON_LOOPBACK = (
    "import sys; import azureml_inference_server_http.amlserver as server; "
    "server.DEFAULT_HOST = '127.0.0.1'; sys.argv[0] = 'azmlinfsrv'; sys.exit(server.run())"
)


def loopback_command(azmlinfsrv: Path) -> list[str]:
    """The command that runs `azmlinfsrv` (its arguments follow) listening on 127.0.0.1 only."""
    return [str(azmlinfsrv.parent / "python"), "-c", _ON_LOOPBACK]


class AzuremlEnvUnavailable(RuntimeError):
    """The AML inference server venv cannot be created (pip failed); the message says why."""


def requirements() -> list[str]:
    """What the venv holds: the AML server and our scoring deps pinned to this interpreter's."""
    return [SERVER_PACKAGE, *(f"{name}=={metadata.version(name)}" for name in SAME_AS_HERE)]


def ensure_azureml_venv(venv: Path = VENV) -> Path:
    """Create (once) the venv and return the path of its `azmlinfsrv` console script."""
    wanted = "\n".join(requirements())
    script = venv / "bin" / "azmlinfsrv"
    stamp = venv / ".installed"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with (venv.parent / f"{venv.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if script.exists() and stamp.exists() and stamp.read_text() == wanted:
            return script
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
             "--disable-pip-version-check", *requirements()],
        ]  # fmt: skip
        for argv in steps:
            done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=900)
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
                raise AzuremlEnvUnavailable(f"`{' '.join(argv[:4])} ...` failed: {tail}")
        stamp.write_text(wanted)
    return script


if __name__ == "__main__":
    print(ensure_azureml_venv())
