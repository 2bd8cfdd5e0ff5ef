"""Where commands write: one rule for every output path of every command (SPEC.md §4 "Outputs").

1. Before any work, every input and output is resolved to its real path (symlinks and `..`
   resolved; an input directory also counts with the real path of each entry it holds). An output
   may not be, contain or lie inside an input, nor overlap another output: `check_paths`.
2. An existing output is replaced only with `--overwrite`, and only when drpo wrote it
   (`foreign`): a directory whose marker file (`drpo_checkpoint.json`, `state.json`) lists the
   files drpo wrote there and holds nothing else; a file of the same kind that drpo wrote, known
   by its marker — a JSON report's top-level `"report": "drpo-..."`, an Arrow file's schema
   metadata key `drpo.output`, an HTML page's `HTML_MARKER` comment in its first 4 KiB. An empty
   file or directory holds nothing and may be replaced too.
3. Writing goes to a hidden temporary sibling (same filesystem) that is renamed into place
   (`atomic_file`, `atomic_dir`, `write_file`): at every instant the output is absent, old and
   complete, or new and complete; on failure the temporary is removed and the old output stays.
   Before the rename every file gets mode 0666 & ~umask and every directory 0777 & ~umask
   (0644 / 0755 under umask 022), as `cp` would give; and never more readable than the command's
   least readable input (`claimed`: a private model gives a private checkpoint, as `cp -r` keeps).
4. For the whole command each output is locked (`claimed`): a second drpo run naming the same
   output is refused at once with the holder's pid, before either does any work.

No torch here: `config.validate()` calls `output_problems` in milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from drpo_cli.base.errors import ConfigError

STATE_SUFFIX = ".partial-state"  # train's resumable state: a sibling OUT.partial-state/ of --out OUT

# Directory kinds -> the marker file whose "files" list names everything drpo wrote in the directory.
DIR_MARKERS = {"checkpoint": "drpo_checkpoint.json", "state": "state.json"}
ARROW_MARKER_KEY = b"drpo.output"  # schema metadata of every Arrow file drpo writes; the value says what it is
HTML_MARKER = "<!-- drpo-output -->"  # in the first 4 KiB of every HTML page drpo writes
FILE_KINDS = ("json", "arrow", "html")
_WHAT = {"checkpoint": "a checkpoint directory drpo wrote", "state": "an interrupted run's state directory drpo wrote",
         "json": "a drpo JSON report", "arrow": "a drpo Arrow file", "html": "a drpo HTML page"}
_HINT = "--overwrite replaces only what drpo wrote"
_LISTED = 3  # foreign names shown in a message
LOCK_SUFFIX = ".drpo-lock"  # a hidden sibling `.NAME.drpo-lock` of each output, held for the whole command


@dataclass(frozen=True)
class Output:
    """One output of a command: the option that names it, the path as given, what drpo writes there."""

    flag: str
    """How the user named it, for messages: "--out", "--json", "--per-token"."""
    path: str | os.PathLike
    """As given (relative, through symlinks or `..`: all resolved before any check)."""
    kind: str
    """"checkpoint" or "state" (directories), "json", "arrow" or "html" (files), "events" (a TensorBoard
    directory, appended to: only the overlap rules and the lock apply)."""
    check_existing: bool = True
    """False: only the overlap rules; the caller decides about an existing path (train's resumable state)."""


def state_dir(out: str | os.PathLike) -> Path:
    """Where `drpo train --out OUT` keeps an interrupted run's state: the sibling `OUT.partial-state/`."""
    r = real(out)
    return r.with_name(r.name + STATE_SUFFIX)


def real(path: str | os.PathLike) -> Path:
    """The absolute path with every symlink and `..` resolved (an absent tail is kept as given)."""
    return Path(os.path.realpath(os.fspath(path)))


def check_paths(inputs: Sequence[tuple[str, str | os.PathLike | None]], outputs: Sequence[Output], *,
                overwrite: bool) -> None:
    """Raise one ConfigError (exit 2) listing every problem of `output_problems`; call before any work."""
    problems = output_problems(inputs, outputs, overwrite=overwrite)
    if problems:
        summary = problems[0] if len(problems) == 1 else f"{len(problems)} problems with the outputs"
        raise ConfigError(summary, details=problems if len(problems) > 1 else [])


def output_problems(inputs: Sequence[tuple[str, str | os.PathLike | None]], outputs: Sequence[Output], *,
                    overwrite: bool) -> list[str]:
    """Every problem with a command's outputs, one line each (naming both paths where two collide).

    `inputs` are (flag, path) pairs (None paths are skipped): rollout files and directories, the
    model, adapter and reference-model directories. An output may not be, contain or lie inside an
    input or another output; an existing output needs `overwrite` and must be drpo's (`foreign`).
    """
    problems: list[str] = []
    ins = [(_shown(flag, p), r) for flag, p in inputs if p is not None for r in _input_reals(p)]
    outs = [(o, real(o.path)) for o in outputs]
    for o, r in outs:
        clash = next((f"{rel} the input {name}" for name, ir in ins if (rel := _relation(r, ir))), None)
        if clash is not None:
            problems.append(f"{_shown(o.flag, o.path)}: {clash} (an output may not be, contain or lie inside an input)")
        elif o.check_existing:
            problems.extend(_existing_problems(o, r, overwrite))
    for i, (a, ra) in enumerate(outs):
        for b, rb in outs[i + 1:]:
            if rel := _relation(ra, rb):
                problems.append(f"{_shown(a.flag, a.path)}: {rel} {_shown(b.flag, b.path)} (two outputs may not overlap)")
    return problems


def foreign(path: str | os.PathLike, kind: str) -> str | None:
    """What makes `path` something drpo did not write, as a phrase ("holds 2 files drpo did not write: ..."),
    or None when --overwrite may replace it (drpo's output of this kind, or an empty file or directory)."""
    p = real(path)
    if kind in DIR_MARKERS:
        if not p.is_dir():
            return f"is a file (expected {_WHAT[kind]})"
        entries = sorted(e.name + ("/" if e.is_dir() and not e.is_symlink() else "") for e in os.scandir(p))
        listed = _listed_files(p / DIR_MARKERS[kind])
        extra = [e for e in entries if e not in listed]
        if not extra:
            return None
        shown = ", ".join(extra[:_LISTED]) + (", …" if len(extra) > _LISTED else "")
        return f"holds {len(extra)} file{'s' if len(extra) != 1 else ''} drpo did not write: {shown}"
    if kind not in FILE_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    if p.is_dir():
        return "is a directory (expected a file path)"
    if not p.is_file():
        return "is not a regular file"
    if p.stat().st_size == 0 or _is_drpo_file(p, kind):
        return None
    return f"is a file drpo did not write (not {_WHAT[kind]})"


# ---- for the whole command: locks and modes ---------------------------------------------------------


@contextlib.contextmanager
def claimed(inputs: Sequence[tuple[str, str | os.PathLike | None]], outs: Sequence[Output], *,
            lock: bool = True) -> Iterator[None]:
    """Hold for the whole command: a lock on each output (`locked`), and a umask under which nothing
    drpo creates is more readable than the least readable input (`withheld_bits`). `lock=False`:
    the modes only (torchrun's ranks but the first: one process locks)."""
    withheld = withheld_bits(p for _, p in inputs if p is not None)
    old = os.umask(0)
    os.umask(old | withheld)
    try:
        with contextlib.ExitStack() as stack:
            if lock:
                for o in outs:
                    stack.enter_context(locked(o))
            yield
    finally:
        os.umask(old)


def withheld_bits(paths: Iterable[str | os.PathLike]) -> int:
    """Permission bits (group and other) that some input withholds: a class that cannot read an input
    file, or list and enter an input directory (or read a file directly inside it), gets none of
    rwx on the outputs. The owner's bits are the umask's business."""
    withheld = 0
    for path in paths:
        try:
            st = os.stat(path)
            modes = [(st.st_mode, os.path.isdir(path))]
            if modes[0][1]:
                modes += [(e.stat().st_mode, False) for e in os.scandir(path) if e.is_file()]
        except OSError:
            continue  # a missing input is reported by the command's own checks
        for mode, is_dir in modes:
            for shift in (3, 0):  # group, other
                need = 0o5 if is_dir else 0o4
                if (mode >> shift) & need != need:
                    withheld |= 0o7 << shift
    return withheld


@contextlib.contextmanager
def locked(o: Output) -> Iterator[None]:
    """An exclusive lock on output `o` (flock on its hidden sibling `.NAME.drpo-lock`, which holds the
    holder's pid) until the block ends; ConfigError (exit 2) at once if another process holds it, or if
    the output's directory cannot be written (read-only, no permission). The lock file is removed on
    release; the kernel releases the lock of a process that dies, so a stale file locks nothing."""
    dest = real(o.path)
    path = dest.with_name(f".{dest.name}{LOCK_SUFFIX}")
    made = []  # a directory output's missing parents, made as the output would make them; removed if left empty
    if o.kind in (*DIR_MARKERS, "events"):
        missing, parent = [], dest.parent
        while not os.path.lexists(parent) and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        with contextlib.suppress(OSError):
            for d in reversed(missing):
                d.mkdir()
                made.append(d)
    try:
        yield from _held(o, dest, path)
    finally:
        for d in reversed(made):  # nothing was written into them (a failed run): as they were
            try:
                d.rmdir()
            except OSError:
                break


def _held(o: Output, dest: Path, path: Path) -> Iterator[None]:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise ConfigError(f"{_shown(o.flag, o.path)}: cannot write in {dest.parent} ({err.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"{_shown(o.flag, o.path)}: in use by another drpo run (pid {holder}); wait for it "
                              "to end or choose another path") from None
        try:  # the previous holder may have removed the file between our open and our lock
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding the lock: nobody else can hold this file now
        os.close(fd)


# ---- writing ------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, kind: str, *, overwrite: bool) -> Iterator[Path]:
    """Yields a temporary path next to `path` to write; on success it replaces `path` atomically.

    Leaving the block with an exception removes the temporary file and leaves `path` as it was.
    The final check that `path` may be replaced (it may have changed while the caller wrote) runs
    right before the rename.
    """
    dest = real(path)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        _check_replaceable(dest, kind, overwrite)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_file(path: str | os.PathLike, data: str | bytes, kind: str, *, overwrite: bool) -> Path:
    """Write `data` (str as UTF-8) to `path` atomically with `atomic_file`; returns the real path."""
    with atomic_file(path, kind, overwrite=overwrite) as tmp, open(tmp, "wb") as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    return real(path)


def write_together(files: Sequence[tuple[str, str | os.PathLike, str | bytes, str]], *, overwrite: bool,
                   stack: contextlib.ExitStack) -> None:
    """Write outputs (flag, path, data, kind) so that they appear together or not at all: each goes into
    its temporary sibling now, and `stack` renames them in when it closes without an error (and removes
    the temporaries otherwise). A write that fails (e.g. a full disk) names its output in one line."""
    from drpo_cli.base.errors import DrpoError

    for flag, path, data, kind in files:
        tmp = stack.enter_context(atomic_file(path, kind, overwrite=overwrite))
        try:
            with open(tmp, "wb") as fh:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as err:
            raise DrpoError(f"{_shown(flag, path)}: cannot write ({err.strerror or err}); none of the outputs "
                            "was written") from None


def new_temp_dir(path: str | os.PathLike) -> Path:
    """An empty hidden sibling of `path` to fill (parents of `path` are created); see `publish_dir`."""
    dest = real(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


def write_marker(tmp_dir: Path, kind: str, record: dict) -> None:
    """Write `kind`'s marker file into `tmp_dir` last: `record` plus "files", everything the directory holds."""
    marker = DIR_MARKERS[kind]
    files = sorted({e.name + ("/" if e.is_dir() else "") for e in os.scandir(tmp_dir)} | {marker})
    path = tmp_dir / marker
    path.write_text(json.dumps({**record, "files": files}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _fsync(path)


def publish_dir(tmp_dir: Path, path: str | os.PathLike, kind: str, *, overwrite: bool) -> Path:
    """Rename the finished `tmp_dir` into `path` (umask modes first); the old output, if any, is deleted.

    Replacing swaps the two directories in one step where the kernel can (Linux renameat2
    RENAME_EXCHANGE: `path` is always there, old or new), else old aside, new in (put back if that
    fails), so `path` is always absent or complete. The old one is then deleted; `tmp_dir` is
    removed on any failure.
    """
    dest = real(path)
    try:
        _check_replaceable(dest, kind, overwrite)
        _apply_umask(tmp_dir)
        _fsync(tmp_dir)
        if not os.path.lexists(dest):
            os.rename(tmp_dir, dest)
        elif _exchange(tmp_dir, dest):
            _remove(tmp_dir)  # now the old output
        else:
            old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(dest, old)
            try:
                os.rename(tmp_dir, dest)
            except BaseException:
                os.rename(old, dest)
                raise
            _remove(old)
        _fsync(dest.parent)
    except BaseException:
        discard(tmp_dir)
        raise
    return dest


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where that is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc before glibc 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or filesystem without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def discard(tmp_dir: Path) -> None:
    """Remove a temporary directory from `new_temp_dir` (nothing if already gone)."""
    shutil.rmtree(tmp_dir, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, kind: str, *, overwrite: bool) -> Iterator[Path]:
    """Yields a temporary directory to fill (ending with `write_marker`); on success `publish_dir`."""
    tmp = new_temp_dir(path)
    try:
        yield tmp
    except BaseException:
        discard(tmp)
        raise
    publish_dir(tmp, path, kind, overwrite=overwrite)


def remove_output(path: str | os.PathLike, kind: str) -> bool:
    """Delete an output drpo wrote (e.g. the resumable state once the run finished); anything else stays.

    Returns whether `path` is gone.
    """
    dest = real(path)
    if not os.path.lexists(dest):
        return True
    if foreign(dest, kind) is not None:
        return False
    _remove(dest)
    return True


# ---- helpers ------------------------------------------------------------------------------------


def _input_reals(path: str | os.PathLike) -> list[Path]:
    """An input's real path, and for a directory the real paths of its entries (symlinks may lead out)."""
    r = real(path)
    reals = [r]
    if r.is_dir():
        with contextlib.suppress(OSError):
            reals += [real(e.path) for e in os.scandir(r) if e.is_symlink()]
    return reals


def _relation(out: Path, other: Path) -> str | None:
    """How `out` collides with `other`: "is", "contains" or "is inside"; None when they are apart."""
    if out == other:
        return "is"
    if out in other.parents:
        return "contains"
    if other in out.parents:
        return "is inside"
    return None


def _shown(flag: str, path: str | os.PathLike) -> str:
    """`--flag path` as given, followed by the real path where symlinks lead elsewhere."""
    given, r = os.fspath(path), real(path)
    return f"{flag} {given}" if os.path.abspath(given) == str(r) else f"{flag} {given} (= {r})"


def _existing_problems(o: Output, r: Path, overwrite: bool) -> list[str]:
    if not os.path.lexists(r):
        if o.kind in FILE_KINDS and not r.parent.is_dir():
            return [f"{_shown(o.flag, o.path)}: parent directory does not exist"]
        return []
    if o.kind in FILE_KINDS and r.is_dir():
        return [f"{_shown(o.flag, o.path)}: is a directory (expected a file path)"]
    if not overwrite:
        return [f"{_shown(o.flag, o.path)}: already exists (pass --overwrite to replace it)"]
    why = foreign(r, o.kind)
    return [] if why is None else [f"{_shown(o.flag, o.path)}: {why} ({_HINT})"]


def _check_replaceable(dest: Path, kind: str, overwrite: bool) -> None:
    """The last check before a rename: `dest` may have appeared or changed while the output was written."""
    if not os.path.lexists(dest):
        return
    if not overwrite:
        raise ConfigError(f"{dest}: already exists (pass --overwrite to replace it)")
    why = foreign(dest, kind)
    if why is not None:
        raise ConfigError(f"{dest}: {why} ({_HINT})")


def _listed_files(marker: Path) -> set[str]:
    """The "files" a marker lists (empty when there is no marker or it lists none: nothing is drpo's)."""
    try:
        files = json.loads(marker.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return set()
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()


def _is_drpo_file(path: Path, kind: str) -> bool:
    try:
        if kind == "json":
            with open(path, "rb") as fh:
                if fh.read(1).strip() not in (b"{", b""):
                    return False
            report = json.loads(path.read_text(encoding="utf-8")).get("report")
            return isinstance(report, str) and report.startswith("drpo-")
        if kind == "html":
            with open(path, "rb") as fh:
                return HTML_MARKER.encode() in fh.read(4096)
        return ARROW_MARKER_KEY in (_arrow_metadata(path) or {})
    except (OSError, ValueError, AttributeError):
        return False


def _arrow_metadata(path: Path) -> dict | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for read in (lambda: pa.ipc.open_file(str(path)).schema, lambda: pa.ipc.open_stream(str(path)).schema,
                 lambda: pq.read_schema(str(path))):
        try:
            return read().metadata
        except (pa.ArrowException, OSError):
            continue
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """Modes as a plain `cp` gives: 0666 & ~umask for files, 0777 & ~umask for directories (root included)."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for d, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(d, name), 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(d, name)):  # chmod would follow it to its target
                os.chmod(os.path.join(d, name), 0o666 & ~mask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not support fsync on directories
        pass
    finally:
        os.close(fd)
