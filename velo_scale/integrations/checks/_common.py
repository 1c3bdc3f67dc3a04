"""Helpers shared by the integration check scripts (standard library only:
the scripts run before their environment exists)."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

REPO = pathlib.Path(__file__).resolve().parents[3]
PROJECT_WEIGHTS = REPO / "velo_scale" / "project_weights" / "params"


class CheckFailed(AssertionError):
    """A check's assertion failed (the message says which and why)."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def ensure(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def run_logged(
    cmd: Sequence[str],
    log_path: pathlib.Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: pathlib.Path | None = None,
    timeout: float | None = None,
    kill_when: Callable[[], bool] | None = None,
) -> tuple[int, float, bool]:
    """Runs `cmd` with stdout+stderr to `log_path`.

    Returns (exit code, seconds, killed): with `kill_when`, the process group is
    sent SIGKILL as soon as `kill_when()` is true (polled every 0.2 s).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_path, "w") as out:
        out.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
        )
        killed = False
        while proc.poll() is None:
            if kill_when is not None and kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                proc.wait()
                break
            if timeout is not None and time.time() - start > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise CheckFailed(f"{cmd[0]} ran over {timeout:.0f} s; see {log_path}")
            time.sleep(0.2)
    return proc.returncode, time.time() - start, killed


def tail(path: pathlib.Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def pip_install(
    python: pathlib.Path, args: Sequence[str], log_path: pathlib.Path
) -> None:
    code, seconds, _ = run_logged(
        [str(python), "-m", "pip", "install", "-q", *args], log_path
    )
    if code != 0:
        raise CheckFailed(
            f"pip install {' '.join(args)} failed (exit {code}); see {log_path}:\n"
            + tail(log_path)
        )
    log(f"  pip install {' '.join(args)}: {seconds:.0f} s")


def make_venv(venv: pathlib.Path, python: str, log_dir: pathlib.Path) -> pathlib.Path:
    """Creates `venv` with `python` (upgrading pip); returns its interpreter."""
    code, _, _ = run_logged([python, "-m", "venv", str(venv)], log_dir / "venv.log")
    ensure(code == 0, f"{python} -m venv {venv} failed; see {log_dir / 'venv.log'}")
    interpreter = venv / "bin" / "python"
    pip_install(interpreter, ["--upgrade", "pip"], log_dir / "pip-upgrade.log")
    return interpreter


def import_error(python: pathlib.Path, modules: Sequence[str]) -> str | None:
    """None when `python` imports `modules`, else the end of its error."""
    if not python.exists():
        return f"{python} does not exist"
    code = "import " + ", ".join(modules)
    result = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, cwd="/"
    )
    return None if result.returncode == 0 else result.stderr[-1500:]


def reuse_or_make_venv(
    venv: pathlib.Path,
    python: str,
    modules: Sequence[str],
    log_dir: pathlib.Path,
    *,
    rebuild: bool,
) -> tuple[pathlib.Path, bool]:
    """(venv python, whether it is new): an existing venv that imports
    `modules` is reused (a broken one is an error naming --rebuild); else a
    new one is made."""
    venv_python = venv / "bin" / "python"
    if venv.exists() and not rebuild:
        error = import_error(venv_python, modules)
        ensure(
            error is None,
            f"the existing venv {venv} cannot import {modules} (pass --rebuild to "
            f"make a new one):\n{error}",
        )
        log(f"environment: reusing {venv}")
        return venv_python, False
    if venv.exists():
        shutil.rmtree(venv)
    log(f"environment: building {venv}")
    return make_venv(venv, python, log_dir), True


def imports_ok(python: pathlib.Path, modules: Sequence[str]) -> bool:
    return import_error(python, modules) is None


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A Markdown table (what the scripts print as their summary)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells
    ]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def python_version_ok(python: str, minimum: tuple[int, int]) -> bool:
    result = subprocess.run(
        [python, "-c", f"import sys; print(sys.version_info[:2] >= {minimum!r})"],
        capture_output=True,
        text=True,
    )
    return result.stdout.strip() == "True"


def weights_env(env: dict[str, str]) -> str:
    """Sets $VELO_SCALE_WEIGHTS to the project weights unless it is set;
    returns a description for the summary."""
    if env.get("VELO_SCALE_WEIGHTS"):
        return env["VELO_SCALE_WEIGHTS"]
    env["VELO_SCALE_WEIGHTS"] = str(PROJECT_WEIGHTS)
    return f"{PROJECT_WEIGHTS.relative_to(REPO)} (project weights)"


def git_head(path: pathlib.Path) -> str:
    result = subprocess.run(
        ["git", "-C", str(path), "log", "-1", "--format=%h %cs"],
        capture_output=True,
        text=True,
    )
    head = result.stdout.strip()
    if not head:
        return "unknown (not a git checkout)"
    status = subprocess.run(
        ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    )
    return head + (" + uncommitted changes" if status.stdout.strip() else "")


def main_guard(main: Callable[[Sequence[str] | None], int]) -> None:
    try:
        sys.exit(main(None))
    except CheckFailed as e:
        print(f"\nCHECK FAILED: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
