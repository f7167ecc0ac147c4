"""Start and stop a Triton Inference Server (the `tritonserver` and Python backend shipped by nvidia-pytriton).

fdcam writes a model repository whose two models (`fdcam`, `fdcam_image`) run fdcam.serving.triton_model
in Triton's Python backend, then runs `tritonserver` on it as a child process it owns: in its own process
group, killed with its whole group if it does not stop in time, and told to exit if fdcam dies.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy

from .. import models
from .engine import ServingConfig

__all__ = ["ServerOptions", "TritonProcess", "write_repository", "triton_environment", "MODEL_NAMES"]

MODEL_NAMES = ("fdcam", "fdcam_image")
# Log lines of a stub process that died before talking to tritonserver (which then waits for it indefinitely).
STUB_FAILURES = ("error while loading shared libraries",)


@dataclass(frozen=True)
class ServerOptions:
    """Ports, address and batching of one server."""

    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    address: str = "127.0.0.1"
    max_batch: int = 32
    max_queue_delay_us: int = 2000
    exit_timeout_s: int = 10


def _pytriton_paths() -> tuple[Path, Path, Path, Path]:
    """tritonserver binary, its shared libraries, the Python backend, and the stub for this Python."""
    try:
        from pytriton.utils.distribution import get_libs_path, get_root_module_path, get_stub_path
    except ImportError:
        raise ImportError(
            "fdcam serve needs the [serve] extra: pip install 'fdcam[serve]' (nvidia-pytriton, tritonclient)"
        ) from None
    root = get_root_module_path() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = Path(get_stub_path(version))
    if not stub.is_file():
        raise RuntimeError(f"nvidia-pytriton ships no Python-backend stub for Python {version}")
    # pytriton's get_libs_path guesses "editable install" when its site-packages is not this environment's
    # own (a venv layered on another through a .pth file) and names a folder that is not there.
    candidates = [Path(get_libs_path()), root.parent.parent / "nvidia_pytriton.libs", root / "external_libs"]
    libs = next((c for c in candidates if c.is_dir()), candidates[0])
    return root / "bin" / "tritonserver", libs, root / "backends" / "python", stub


def search_path() -> list[str]:
    """This interpreter's module search path, without the working directory.

    Site-packages added by .pth files are included.
    """
    cwd = os.getcwd()
    return [entry for entry in sys.path if entry and os.path.abspath(entry) != cwd and os.path.isdir(entry)]


def triton_environment(base: dict | None = None) -> dict:
    """Environment for tritonserver and its Python-backend stubs.

    The stub is linked against libpython3.X; without help it may load the system's older copy instead of
    this interpreter's (seen as "'_thread.RLock' object has no attribute '_recursion_count'"), so this
    interpreter's LIBDIR goes first on LD_LIBRARY_PATH, then the libraries nvidia-pytriton ships.
    The stub's embedded Python runs isolated (PYTHONPATH is ignored) and finds its prefix by looking up
    `python3` on PATH: this interpreter's bin directory goes first there, so the stub starts inside this
    environment (a venv's site-packages, not the base interpreter's, which may hold numpy 2 beside our
    numpy 1: outputs then came back empty). Triton's Python utilities import numpy before any model file.
    """
    env = dict(os.environ if base is None else base)
    _, libs, _, _ = _pytriton_paths()
    library_dirs = [sysconfig.get_config_var("LIBDIR"), str(libs)]
    library_dirs += [d for d in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(dict.fromkeys(d for d in library_dirs if d))
    path = [os.path.dirname(sys.executable)] + [d for d in env.get("PATH", "").split(os.pathsep) if d]
    env["PATH"] = os.pathsep.join(dict.fromkeys(path))
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Spinning OpenMP threads stall badly when another process holds a core (measured here on 2 cores:
    # Grad-CAM of one image 4.8 s instead of 0.1 s); a server shares its CPUs, so threads sleep while waiting.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Each thread that touches the heap may get its own glibc arena (up to 8 per core), and freed memory
    # in an arena is rarely handed back: a stub that served a few large images kept gigabytes when idle.
    # Two arenas (and malloc_trim after each execution, fdcam.serving.triton_model) keep it flat.
    env.setdefault("MALLOC_ARENA_MAX", "2")
    return env


_SHIM = '''"""Written by `fdcam serve`: this environment's packages first, then fdcam's Triton model."""
import site

import numpy

for directory in {site_dirs!r}:  # their .pth files too (an editable fdcam)
    site.addsitedir(directory)
if numpy.__file__ != {numpy_file!r}:
    raise ImportError("the Python-backend stub imported numpy from " + numpy.__file__ + ", not from {numpy_file}")

from fdcam.serving.triton_model import TritonPythonModel  # noqa: E402,F401
'''


def _model_config(name: str, kind: str, serving: ServingConfig, options: ServerOptions) -> str:
    spec = models.spec(serving.model)
    height, width = spec.input_size
    if kind == "tensor":
        first_input = f'{{ name: "image" data_type: TYPE_FP32 dims: [ 3, {height}, {width} ] }}'
    else:
        first_input = '{ name: "image_bytes" data_type: TYPE_STRING dims: [ 1 ] }'
    outputs = [
        f'{{ name: "logits" data_type: TYPE_FP32 dims: [ {spec.num_classes} ] }}',
        '{ name: "targets" data_type: TYPE_INT64 dims: [ -1 ] }',
        f'{{ name: "saliency" data_type: TYPE_FP32 dims: [ -1, {height}, {width} ] }}',
    ]
    if kind == "image":
        outputs.append('{ name: "saliency_original" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] }')
    encoded = base64.b64encode(json.dumps(serving.to_dict()).encode("utf-8")).decode("ascii")
    return "\n".join(
        [
            f'name: "{name}"',
            'backend: "python"',
            f"max_batch_size: {options.max_batch}",
            "input [",
            f"  {first_input},",
            '  { name: "classes" data_type: TYPE_INT64 dims: [ -1 ] optional: true }',
            "]",
            "output [",
            ",\n".join(f"  {output}" for output in outputs),
            "]",
            f"dynamic_batching {{ max_queue_delay_microseconds: {options.max_queue_delay_us} }}",
            "instance_group [ { count: 1 kind: KIND_CPU } ]",
            f'parameters {{ key: "fdcam_kind" value {{ string_value: "{kind}" }} }}',
            f'parameters {{ key: "fdcam_config" value {{ string_value: "{encoded}" }} }}',
            "",
        ]
    )


def write_repository(workspace: str | Path, serving: ServingConfig, options: ServerOptions) -> tuple[Path, Path]:
    """Write the model repository and a backend directory (with the stub for this Python) under `workspace`."""
    workspace = Path(workspace)
    _, _, python_backend, stub = _pytriton_paths()
    backends = workspace / "backends"
    shutil.copytree(
        python_backend, backends / "python", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    repository = workspace / "models"
    shim = _SHIM.format(site_dirs=[d for d in search_path() if d.endswith("-packages")], numpy_file=numpy.__file__)
    for name, kind in zip(MODEL_NAMES, ("tensor", "image")):
        (repository / name / "1").mkdir(parents=True, exist_ok=True)
        (repository / name / "config.pbtxt").write_text(_model_config(name, kind, serving, options), encoding="utf-8")
        (repository / name / "1" / "model.py").write_text(shim, encoding="utf-8")
    return repository, backends


def _exit_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies, so a killed `fdcam serve` leaves no server."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """Process ids below `pid` (children, their children, ...), read from /proc."""
    found, queue = [], [pid]
    while queue:
        for child in _children(queue.pop()):
            found.append(child)
            queue.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class TritonProcess:
    """One tritonserver child process: start, wait until its models are ready, stop with nothing left behind."""

    def __init__(self, repository: Path, backends: Path, options: ServerOptions, log_path: Path):
        self.repository, self.backends, self.options, self.log_path = repository, backends, options, log_path
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        binary, _, _, _ = _pytriton_paths()
        o = self.options
        return [
            str(binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.backends}",
            f"--http-address={o.address}",
            f"--grpc-address={o.address}",
            f"--metrics-address={o.address}",
            f"--http-port={o.http_port}",
            f"--grpc-port={o.grpc_port}",
            f"--metrics-port={o.metrics_port}",
            f"--exit-timeout-secs={o.exit_timeout_s}",
            "--disable-auto-complete-config",
            "--log-verbose=0",
        ]

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=triton_environment(),
                # its own process group: a Ctrl-C meant for fdcam reaches it only through stop()
                start_new_session=True,
                preexec_fn=_exit_with_parent,
            )

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _ready(self) -> bool:
        base = (
            f"http://{'127.0.0.1' if self.options.address in ('0.0.0.0', '') else self.options.address}"
            f":{self.options.http_port}"
        )
        try:
            for path in ["/v2/health/ready"] + [f"/v2/models/{name}/ready" for name in MODEL_NAMES]:
                with urllib.request.urlopen(base + path, timeout=2) as response:
                    if response.status != 200:
                        return False
            return True
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float, stop_requested=lambda: False) -> None:
        """Block until both models answer ready; a server that exits or stays unready past `timeout_s` is an error."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not stop_requested():
            if not self.running():
                raise RuntimeError(f"tritonserver exited during startup: {self.failure_line()}")
            if self._ready():
                return
            stub_failure = self._log_line(STUB_FAILURES)
            if stub_failure:  # tritonserver keeps waiting for a stub that never started: fail now, not at the timeout
                raise RuntimeError(f"a Python-backend stub could not start: {stub_failure}")
            time.sleep(0.25)
        if not stop_requested():
            raise RuntimeError(f"tritonserver was not ready within {timeout_s:.0f} s: {self.failure_line()}")

    def _lines(self) -> list[str]:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        return [line.strip() for line in text.splitlines() if line.strip()]

    def _log_line(self, markers: tuple[str, ...], errors_only: bool = False) -> str | None:
        """The last log line holding the first marker found, with where the log is; None when none does."""
        lines = [line for line in self._lines() if line.startswith("E") or not errors_only]
        for marker in markers:
            for line in reversed(lines):
                if marker in line:  # Triton writes a message's own line breaks as "\\n": keep its first line
                    return line.split("\\n", 1)[0][:400] + f" (log: {self.log_path})"
        return None

    def failure_line(self) -> str:
        """The most telling line of the server log (a model load error, else the last error), as one line."""
        found = (
            self._log_line(STUB_FAILURES)
            or self._log_line(("failed to load '", "Traceback"), errors_only=True)
            or self._log_line(("failed to load", "error:", "E1", "E0"))
        )
        if found:
            return found
        lines = self._lines()
        return lines[-1][:400] if lines else f"no output (log: {self.log_path})"

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM tritonserver (it unloads the models and their stubs exit).

        SIGKILL whatever is left after the timeout.
        """
        if self.process is None:
            return None
        timeout_s = self.options.exit_timeout_s + 5 if timeout_s is None else timeout_s
        family = descendants(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(5)
        # Stubs whose parent is gone exit on their own within seconds; make sure of it.
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in family) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in family:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return self.process.returncode
