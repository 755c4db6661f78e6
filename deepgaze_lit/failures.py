"""How a `deepgaze` run that cannot go on ends: one line `deepgaze: error: ...` on stderr and an exit status.

    0    done
    1    failed while running: a full disk, a diverged loss, a bug (the line says which; a bug asks for --debug)
    2    a mistake in the command, its configuration or its input files, found before any work where it can be
    128+n  stopped by signal n (130 Ctrl-C, 138 SIGUSR1 preemption, 143 SIGTERM) after saving what it could

`--debug` on the command line or DEEPGAZE_DEBUG=1 in the environment prints the traceback before the line.
"""

import errno
import os
import tempfile
from pathlib import Path

EXIT_FAILED = 1
EXIT_USAGE = 2
DEBUG_FLAG = "--debug"
DEBUG_ENVIRONMENT = "DEEPGAZE_DEBUG"


class UsageError(Exception):
    """A mistake in the command or its configuration; the message names the option or file and the fix."""


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(text).split())


def error_message(error: BaseException) -> str:
    """The message of `error` as one line. An error re-raised by a DataLoader worker carries the worker's traceback
    in its message ("Caught ... Original Traceback ..."): only the original message, its last line, is kept."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return one_line(text)


def describe_os_error(error: OSError) -> str:
    """What went wrong with a file, for the user: the path, the cause in words and what to do."""
    path = error.filename if error.filename is not None else "a file"
    if error.errno == errno.ENOSPC:
        return f"no space left on device writing {path}: free some space there or choose another folder"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"cannot write {path}: permission denied; choose a folder you can write to"
    if error.errno == errno.EROFS:
        return f"cannot write {path}: read-only file system; choose a folder on a writable disk"
    if error.errno == errno.ENOTDIR:
        return f"{path} is under a regular file, not a folder; choose another path"
    if error.errno == errno.ENOENT:
        return f"{path}: no such file or folder"
    if error.errno == errno.EISDIR:
        return f"{path} is a folder; expected a file"
    return f"{path}: {error.strerror or error}"


def require_writable_folder(path: str | Path, option: str) -> Path:
    """Create the folder `path` (and its parents) if needed and write and delete a probe file in it, so that a run
    that will write there fails before any work; UsageError naming `option` otherwise."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option} {folder} is a file, not a folder; choose a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=".deepgaze-probe-", dir=folder)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        at_folder = OSError(error.errno, error.strerror, str(folder))
        raise UsageError(f"{option}: {describe_os_error(at_folder)}") from error
    return folder
