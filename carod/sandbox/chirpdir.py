"""The chirp directory of each sandbox: where a job with ``WantIOProxy`` finds condor_chirp and its socket.

Every bubblewrap sandbox gets, read-only at :data:`MOUNT`
(``/usr/libexec/condor``), a directory of its own on the host,
``<state_dir>/chirp/<sandbox name>`` (root's, 0755, under a 0700 parent that
jobs never see: state_dir is hidden from them). It is bound when the chain
starts, before the job is known (carod.sandbox.warm), and stays empty
unless the job asks for chirp: then carod links the tools into it
(``condor_chirp``, ``carod-chirp``: carod.sandbox.chirptool with the node's
python3) and binds the job's chirp socket there (carod.node.chirp). A bind
mount shows what is added to its directory later; the job cannot change
the directory (read-only mount, root's), and connecting to a socket is
allowed on a read-only mount.

The mount point must exist on the host: carod creates the empty directory
``/usr/libexec/condor`` at start when it is missing (an HTCondor
installation's own is hidden inside sandboxes by the bind).
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

#: Where the chirp directory appears in the sandbox (the walkthrough's PATH has it).
MOUNT = "/usr/libexec/condor"
#: The job's chirp socket in that directory (carod.sandbox.chirptool looks beside itself).
SOCKET_NAME = "carod-chirp.sock"
#: The names the client is installed under.
TOOLS = ("condor_chirp", "carod-chirp")
#: The master copies, linked into each sandbox's directory (not a sandbox name: those never start with ".").
_MASTER = ".tools"
#: python3 for the client, in the order tried: it must be visible in the sandbox (not under /root, /home...).
PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")


def find_python() -> str | None:
    """A python3 every user may run, at a path the sandbox shows."""
    for path in PYTHONS:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o001:
            return path
    return None


def setup(state_dir: Path) -> tuple[Path | None, str]:
    """At start-up (nothing runs yet): a fresh ``state_dir/chirp`` with the tools; None and why when impossible."""
    python = find_python()
    if python is None:
        return None, f"no python3 any user may run in {', '.join(PYTHONS)}"
    try:
        os.makedirs(MOUNT, mode=0o755, exist_ok=True)
    except OSError as exc:
        return None, f"cannot create the mount point {MOUNT}: {exc.strerror}"
    if not os.path.isdir(MOUNT):
        return None, f"{MOUNT} is not a directory"
    root = state_dir / "chirp"
    try:
        shutil.rmtree(root, ignore_errors=True)  # what an earlier run left: no sandbox outlives it
        os.mkdir(root, 0o700)
        os.chmod(root, 0o700)
        master = root / _MASTER
        os.mkdir(master, 0o755)
        source = (Path(__file__).parent / "chirptool.py").read_text()
        _, _, body = source.partition("\n")
        for name in TOOLS:
            path = master / name
            path.write_text(f"#!{python} -IS\n{body}")
            os.chmod(path, 0o755)  # noqa: S103 - every job user runs it (read-only in sandboxes)
    except OSError as exc:
        return None, f"cannot prepare {root}: {exc.strerror}"
    return root, ""


def make(root: Path, box: Path) -> Path:
    """The sandbox's (empty) chirp directory, made before its chain starts. Raises OSError."""
    path = root / box.name
    os.mkdir(path, 0o755)
    os.chmod(path, 0o755)  # noqa: S103 - root's; the job user passes through it to its socket
    return path


def install(root: Path, box: Path) -> Path:
    """The job wants chirp: link the tools into its directory. Returns the socket's path. Raises OSError."""
    path = root / box.name
    for name in TOOLS:
        os.link(root / _MASTER / name, path / name)
    return path / SOCKET_NAME


def remove(root: Path, box: Path) -> None:
    shutil.rmtree(root / box.name, ignore_errors=True)
