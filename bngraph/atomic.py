"""Outputs appear whole or not at all, and never in place of something bngraph did not write.

The rule for every output (each command's `-o`, `bngraph.save`, `bngraph.export`):
- A path that exists is replaced only when it is a bngraph output of the same kind (an artifact,
  a run or reproduce folder, each known by its `bngraph.json` and holding nothing but what
  bngraph writes there; an `.onnx` file or a picture that ends in bngraph's seal, the digest of
  what bngraph wrote, so that an edit since makes it the user's) and the caller passed `force`.
  Anything else is refused with one line (`UserError`) and left exactly as it was. Symbolic
  links are never replaced.
- The checks run before the work (`check_output`) and again just before the rename.
- Missing parent folders are created after the checks pass, and removed again when the write
  fails. The output is built beside its path and renamed onto it last; an old output of the same
  kind is moved aside first and deleted only once the new one is in place.
- A full disk, a file-size limit or Ctrl-C leave no temporary file behind and the old output as it
  was; a full disk is one line (the user's to fix), Ctrl-C propagates as KeyboardInterrupt.

One module, though long: every output kind goes through the same checks, the same build-aside,
move-aside and rename, and the same cleanup, and the rule is meant to be read in one place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import signal
import stat
import struct
import sys
import threading
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from bngraph.errors import UserError

MARKER = "bngraph.json"  # the artifact's description; run and reproduce folders carry one too
_MARKER_MAX_BYTES = 1 << 26  # a marker holds a history of commands and class names: 21k classes are 1.7 MB
DESCRIPTION_DIGEST = "description_sha256"  # in bngraph.json, of the rest of its text
ARTIFACT, RUN, REPRODUCE, ONNX, PICTURE = "artifact", "run", "reproduce", "onnx", "picture"
FOLDER_FORMATS = {ARTIFACT: "bngraph-artifact", RUN: "bngraph-run", REPRODUCE: "bngraph-reproduce"}
FILE_SUFFIXES = {ONNX: (".onnx",), PICTURE: (".svg", ".png", ".dot")}
DESCRIBED = {ARTIFACT: "an artifact folder", RUN: "a training run folder", REPRODUCE: "a reproduce folder",
             ONNX: "an ONNX file", PICTURE: "a graph picture"}
# Names that say "file": a folder written under one would mislead every later reader.
FILE_LIKE_SUFFIXES = {".onnx", ".pt", ".pth", ".py", ".json", ".jsonl", ".safetensors", ".png", ".svg", ".dot"}
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
PICTURE_MARK = b"written by bngraph graph"  # in a PNG tEXt chunk, an SVG or DOT comment
# ModelProto's field 2, producer_name, set to "bngraph" (`bngraph.onnx_io.save_onnx`): protobuf
# writes fields in number order, so it follows the ir_version within the file's first bytes.
ONNX_MARK, ONNX_PRODUCER = b"\x12\x07bngraph", "bngraph"
# The key of the metadata entry in which an ONNX file carries its seal (`seal`).
SEAL_KEY = b"bngraph_sha256"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # a PNG's last chunk: length 0, type, CRC
# What bngraph writes at the top of each kind of folder (artifacts: bngraph.artifacts, with the
# user's modules carried in code/ and the bytecode importing model.py leaves; runs:
# bngraph.training; reproduce: bngraph.reproduce). Anything else there is the user's, and the
# folder is then never replaced.
FOLDER_CONTENTS = {
    ARTIFACT: {MARKER, "model.py", "weights.pt", "code", "__pycache__"},
    RUN: {MARKER, "checkpoint.pt", "metrics.jsonl", "model", "inputs.png"},
    REPRODUCE: {MARKER, "fig1.png", "accuracy.png", "summary.json", "table.md", "models"},
}
# The files among those, each recorded in bngraph.json's sha256 as it is written (the rest are folders).
WRITTEN_FILES = {"model.py", "weights.pt", "checkpoint.pt", "metrics.jsonl", "inputs.png",
                 "fig1.png", "accuracy.png", "summary.json", "table.md"}
# Folders inside one that are themselves artifacts: checked the same way.
_NESTED_ARTIFACTS = {RUN: ("model",), REPRODUCE: ("models/*",)}


def output_kind(path: str | Path) -> str | None:
    """Which bngraph output `path` is (ARTIFACT, RUN, REPRODUCE, ONNX, PICTURE), or None."""
    path = Path(path)
    if path.is_symlink():
        return None
    if path.is_dir():
        marker = path / MARKER
        try:
            # A regular file of a marker's size only: a FIFO named so blocked the read for ever.
            if not marker.is_file() or marker.is_symlink() or marker.stat().st_size > _MARKER_MAX_BYTES:
                return None
            meta = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # no bngraph.json (a run from before 0.2 had none): not ours to replace
            return None
        fmt = meta.get("format") if isinstance(meta, dict) else None
        return next((kind for kind, name in FOLDER_FORMATS.items() if name == fmt), None)
    if not path.is_file():
        return None
    if path.suffix in FILE_SUFFIXES[ONNX] and _is_marked_onnx(path) and _is_sealed(path, ONNX):
        return ONNX
    if path.suffix in FILE_SUFFIXES[PICTURE] and _is_marked_picture(path) and _is_sealed(path, PICTURE):
        return PICTURE
    return None


def _changed_since_written(path: Path) -> bool:
    """Whether the file at `path` carries bngraph's mark but not its seal: bngraph wrote it, and
    it was changed since (or bngraph wrote it before it sealed its files)."""
    if path.suffix in FILE_SUFFIXES[ONNX]:
        return _is_marked_onnx(path)
    return path.suffix in FILE_SUFFIXES[PICTURE] and _is_marked_picture(path)


def _is_marked_onnx(path: Path) -> bool:
    with open(path, "rb") as f:
        return ONNX_MARK in f.read(64)


def _seal(body_digest: str, kind: str, suffix: str) -> bytes:
    """The bytes a file of `kind` named `*suffix` ends with (a PNG: before its IEND chunk), for
    content whose SHA-256 is `body_digest`: bngraph's mark and that digest, in the format's own
    syntax, so that the file stays valid and a later `--force` can tell it is as bngraph wrote it."""
    digest = body_digest.encode()
    if kind == ONNX:
        return onnx_metadata_entry(SEAL_KEY, digest)
    text = PICTURE_MARK + b" sha256=" + digest
    if suffix == ".png":  # a tEXt chunk: length, type, keyword NUL text, CRC of type and data
        body = b"tEXtComment\0" + text
        return struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    if suffix == ".svg":  # XML allows a comment after the root element
        return b"\n<!-- " + text + b" -->\n"
    return b"\n// " + text + b"\n"  # .dot


def onnx_metadata_entry(key: bytes, value: bytes) -> bytes:
    """The bytes of one entry of ModelProto's metadata_props (field 14) holding `key` and `value`
    (each under 128 bytes): appended to an ONNX file, protobuf merges it into the model."""
    entry = b"\x0a" + bytes([len(key)]) + key + b"\x12" + bytes([len(value)]) + value
    return b"\x72" + bytes([len(entry)]) + entry


def seal(path: Path, kind: str) -> None:
    """Sign the file of `kind` bngraph just wrote at `path` (`_seal`)."""
    if path.suffix != ".png":  # the seal follows the content: appended, without reading it all at once
        digest = sha256(path)
        with path.open("ab") as f:
            f.write(_seal(digest, kind, path.suffix))
        return
    data = path.read_bytes()
    if not data.endswith(_PNG_END):
        raise ValueError(f"{path} does not end in a PNG's IEND chunk")
    body = data[: -len(_PNG_END)]
    path.write_bytes(body + _seal(hashlib.sha256(body).hexdigest(), kind, path.suffix) + _PNG_END)


def _is_sealed(path: Path, kind: str) -> bool:
    """Whether the file at `path` ends in the seal of the bytes before it: as bngraph wrote it."""
    tail = _PNG_END if path.suffix == ".png" else b""
    seal_size = len(_seal("0" * 64, kind, path.suffix))
    body_size = path.stat().st_size - seal_size - len(tail)
    if body_size < 0:
        return False
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for _ in range(0, body_size, 1 << 20):
            digest.update(f.read(min(1 << 20, body_size - f.tell())))
        return f.read() == _seal(digest.hexdigest(), kind, path.suffix) + tail


def foreign_entries(path: Path, kind: str) -> list[str]:
    """What a bngraph folder of `kind` at `path` holds that bngraph does not write there: other
    files, and an artifact's files that are not as bngraph wrote them."""
    found = [p.name for p in path.iterdir() if p.name not in FOLDER_CONTENTS[kind] and not _left_by_a_kill(p.name, kind)]
    found += _changed_or_unrecorded(path)
    for pattern in _NESTED_ARTIFACTS.get(kind, ()):
        found += [f"{p.relative_to(path)}/{name}" for p in path.glob(pattern) if p.is_dir()
                  for name in foreign_entries(p, ARTIFACT)]
    return sorted(found)


def _left_by_a_kill(name: str, kind: str) -> bool:
    """Whether `name` is the temporary of one of the files bngraph writes in a folder of `kind`
    (`fresh_sibling`'s `.checkpoint.1234.partial.pt`): a run killed with SIGKILL as it rewrote
    its checkpoint or bngraph.json leaves it, and it is bngraph's, not the user's."""
    found = _KILLED_TEMPORARY.fullmatch(name)
    return found is not None and f"{found[1]}{found[3] or ''}" in FOLDER_CONTENTS[kind]


# `fresh_sibling`'s temporary of the file `NAME.SUFFIX` made by process PID: (NAME, PID, SUFFIX).
_KILLED_TEMPORARY = re.compile(r"\.(.+)\.(\d+)(?:-\d+)?\.partial(\.[^.]*)?")


def remove_left_by_kills(folder: Path, kind: str) -> None:
    """Delete what a killed bngraph left in its folder of `kind` (`_left_by_a_kill`: a whole
    checkpoint's size, or a half-written model/), where the process that wrote it is gone."""
    for entry in folder.iterdir():
        if not _left_by_a_kill(entry.name, kind) or _alive(int(_KILLED_TEMPORARY.fullmatch(entry.name)[2])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: alive
        return True
    return True


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def description_text(meta: dict) -> str:
    """The text of a folder's bngraph.json describing `meta`, carrying the SHA-256 of its own
    text without that line: an edit to the description makes the folder the user's, as an edit
    to any other file bngraph wrote does (`foreign_entries`)."""
    meta = {key: value for key, value in meta.items() if key != DESCRIPTION_DIGEST}  # one read back
    body = json.dumps(meta, indent=2) + "\n"
    return json.dumps({**meta, DESCRIPTION_DIGEST: _digest(body)}, indent=2) + "\n"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _description(folder: Path) -> tuple[dict | None, bool]:
    """`folder`'s bngraph.json (None where it is unreadable or not an object), and whether its
    text is not what bngraph wrote (one written before the digest was recorded cannot tell, and
    counts as unchanged, as it did then)."""
    try:
        meta = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, True
    if not isinstance(meta, dict):
        return None, True
    body = {key: value for key, value in meta.items() if key != DESCRIPTION_DIGEST}
    recorded = meta.get(DESCRIPTION_DIGEST)
    return meta, recorded is not None and _digest(json.dumps(body, indent=2) + "\n") != recorded


def _changed_or_unrecorded(folder: Path) -> list[str]:
    """A bngraph folder's files that are not as bngraph wrote them: its bngraph.json edited, an
    artifact's files changed since (their SHA-256 in its bngraph.json), or inside code/ and
    __pycache__/ without being listed there (the user's, put beside the modules bngraph
    carried), Python's bytecode aside."""
    meta, changed = _description(folder)
    found = [f"{MARKER} (changed since bngraph wrote it)"] if changed else []
    recorded = (meta or {}).get("sha256", {})
    found += _not_written_here(folder, meta or {}, recorded)
    # A list: the file as it was and as it is being rewritten (`_record_written`), either one bngraph's.
    found += [f"{name} (changed since bngraph wrote it)" for name, digest in recorded.items()
              if (folder / name).is_file() and sha256(folder / name) not in ([digest] if isinstance(digest, str) else digest)]
    for place in ("code", "__pycache__"):
        for file in sorted((folder / place).rglob("*")) if (folder / place).is_dir() else ():
            name = file.relative_to(folder).as_posix()
            bytecode = file.parent.name == "__pycache__" and file.suffix == ".pyc"
            if not file.is_dir() and name not in recorded and not bytecode:
                found.append(name)
    return found


def _not_written_here(folder: Path, meta: dict, recorded: dict) -> list[str]:
    """The files at the top of a bngraph folder under a name bngraph writes there (inputs.png,
    checkpoint.pt) that bngraph did not record writing: a run trained without --track-inputs
    never drew inputs.png, so one there is the user's picture, not a plot to replace. Told only
    for a folder whose bngraph.json carries its own digest: since then every file bngraph writes
    is recorded as it is written (an older folder cannot tell, and its files count as bngraph's)."""
    if DESCRIPTION_DIGEST not in meta:
        return []
    return [p.name for p in sorted(folder.iterdir())
            if p.name in WRITTEN_FILES and (p.name not in recorded or not p.is_file())]


def _is_marked_picture(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 512))
        return PICTURE_MARK in f.read()


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _check_place(path: Path, inputs: Iterable[str | Path | None]) -> None:
    """Not the folder the user is in (or one around it), not in, at or around an input."""
    where = path.resolve()
    if _within(Path.cwd().resolve(), where):
        raise UserError(f"-o {path} is the folder you are in or one around it: name a new file or folder")
    for given in inputs:
        if given is None or not os.path.lexists(given):
            continue
        source = Path(given).resolve()
        if _within(where, source) or _within(source, where):
            raise UserError(f"-o {path} would replace or sit inside the input {given}: choose another output")


def refuse_inside_bngraph_folder(path: str | Path) -> None:
    """Refuse a user's -o inside a run, an artifact or a reproduce folder: its --resume and --force
    then refused that folder as holding what was not the command's own. bngraph's folders hold
    what their command writes, and nothing else."""
    where = Path(path).resolve()  # out/../out is out, beside its parents, not inside it
    # Not a folder anyone may write into (/tmp): a bngraph.json planted there would refuse every -o below.
    own = [p for p in where.parents if not _writable_by_all(p)]
    if (folder := next((p for p in own if output_kind(p) is not None), None)) is not None:
        raise UserError(f"-o {path} would sit inside {folder}, bngraph's {output_kind(folder)} folder, whose --resume "
                        "and --force would then refuse it: write it beside that folder")


def _writable_by_all(folder: Path) -> bool:
    try:
        return bool(folder.stat().st_mode & stat.S_IWOTH)
    except OSError:
        return True


def _check_parent(path: Path) -> None:
    parent = next(p for p in path.absolute().parents if os.path.lexists(p))
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: folder {parent} is not writable")
    limit = _name_limit(parent)
    if too_long := [p.name for p in (path, *path.parents) if len(os.fsencode(p.name)) > limit]:
        raise UserError(f"cannot write {path}: the name {too_long[0][:40]}... is {len(os.fsencode(too_long[0]))} bytes, "
                        f"more than the file system takes ({limit})")


def _name_limit(folder: Path) -> int:
    """The longest file name, in bytes, the file system at `folder` takes (NAME_MAX)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not on Windows, and not on every file system
        return 255


def refuse_empty_output(path: str | Path) -> None:
    """Refuse an output named by an empty text (`-o "$OUT"` with OUT unset), as it was typed:
    Path("") is ".", and the refusal then named "-o .", which the user never wrote; and one
    that is no path at all (a module given where the path goes: pathlib's TypeError)."""
    if not isinstance(path, (str, os.PathLike)):
        raise UserError(f"the output path is {'None' if path is None else 'a ' + type(path).__name__}: name a file or "
                        "folder to write")
    if not str(path).strip():
        raise UserError('the output path is empty (-o ""): name a file or folder to write')


# The working folder a command started in (`working_folder_pinned`, the CLI's): a relative -o is
# the user's relative to it, whatever the model's code does with os.chdir as it runs.
_started_in: str | None = None


@contextlib.contextmanager
def working_folder_pinned() -> Iterator[None]:
    """While the block runs, a relative output path is refused once the working folder is no
    longer the one the block started in (a model's forward calling os.chdir): it would be
    written there, not where the user meant."""
    global _started_in
    try:
        here = os.getcwd()
    except FileNotFoundError:  # the shell's folder was removed after it entered it
        raise UserError("the working folder no longer exists (it was removed after this shell entered it): "
                        "cd to a folder that exists") from None
    before, _started_in = _started_in, here
    try:
        yield
    finally:
        _started_in = before


def absolute_output(path: str | Path) -> Path:
    """`_output_path`, absolute: where a run folder is written from then on, whatever the model's
    forward does to the working folder (os.chdir), its `..` read through symbolic links as the
    system reads them (`link/../run` is beside where link points)."""
    return _output_path(path).absolute()


def _output_path(path: str | Path) -> Path:
    """`path`, its folder resolved where it passes through `..`: the temporaries are built beside
    it by name, and beside `art/../art` is reached through `art` itself, which the swap moves
    away. Only its folder: a symbolic link at `path` stays one, for `check_output` to refuse."""
    refuse_empty_output(path)
    path = Path(path)
    if _started_in is not None and not path.is_absolute() and os.getcwd() != _started_in:
        raise UserError(f"the model's code moved the working folder to {os.getcwd()} (os.chdir) as it ran, so -o {path} "
                        "would land there: nothing was written; give -o as an absolute path")
    if ".." not in path.parts:
        return path
    return path.resolve() if path.name in ("", "..") else path.parent.resolve() / path.name


def check_output(
    path: str | Path, kind: str | None, *, force: bool = False, inputs: Iterable[str | Path | None] = ()
) -> Path:
    """Refuse, before any work, an output that would replace or sit inside something it must not.

    `kind` is what will be written there (None: a file only bngraph reads, such as a download).
    `inputs` are the paths the command reads (its model, weights, data): the output may not be
    one of them, inside one, or around one. Returns `path` as a Path (`_output_path`).
    """
    path = _output_path(path)
    _check_place(path, inputs)
    if kind in FOLDER_FORMATS and path.suffix.lower() in FILE_LIKE_SUFFIXES:
        hint = " (an ONNX file is written by `bngraph export MODEL -o FILE.onnx`)" if path.suffix == ".onnx" else ""
        raise UserError(f"-o {path} names a file, but this writes {DESCRIBED[kind]}: drop the {path.suffix}{hint}")
    if kind in FILE_SUFFIXES and path.suffix not in FILE_SUFFIXES[kind]:
        *others, last = FILE_SUFFIXES[kind]
        raise UserError(f"cannot write {path}: use a {', '.join(others) + ' or ' if others else ''}{last} file name")
    if os.path.lexists(path):
        if path.is_symlink():
            raise UserError(f"{path} is a symbolic link: bngraph does not replace it; choose another -o")
        found = output_kind(path)
        if found is None and path.is_file() and _changed_since_written(path):
            raise UserError(f"{path} was written by bngraph but is not as it wrote it (changed since, or written before "
                            "bngraph sealed its files): it is left as it is; choose another -o")
        if found is None:
            what = "folder" if path.is_dir() else "file"
            raise UserError(f"{path} is a {what} bngraph did not write: it is left as it is; choose another -o")
        if found != kind:
            raise UserError(f"{path} is {DESCRIBED[found]}, not {DESCRIBED.get(kind, 'this output')}; choose another -o")
        if found == RUN:
            refuse_if_running(path)
        if not force:
            resume = "add --resume to continue it, " if kind == RUN and (path / "checkpoint.pt").is_file() else ""
            raise UserError(f"{path} exists ({DESCRIBED[kind]} bngraph wrote): {resume}add --force (in Python, force=True) to replace it, "
                            "or choose another -o")
        if kind in FOLDER_CONTENTS and (foreign := foreign_entries(path, kind)):
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise UserError(f"{path} holds what bngraph did not write ({shown}), which replacing it would delete: "
                            "move that out, or choose another -o")
        _check_replaceable(path)
    _check_parent(path)
    return path


def _check_replaceable(path: Path) -> None:
    """Fail before the work where this user may not replace the bngraph output at `path`: another
    user's in a folder only owners may rename in (/tmp's sticky bit; the rename failed after all
    the work), or a folder whose files this user cannot delete (its old copy stayed, hidden)."""
    uid = os.geteuid()
    if uid == 0:
        return
    parent = path.absolute().parent
    with contextlib.suppress(OSError):
        own, folder = os.lstat(path), os.stat(parent)
        if folder.st_mode & stat.S_ISVTX and uid not in (own.st_uid, folder.st_uid):
            raise UserError(f"cannot replace {path}: it belongs to another user, in a folder where only a file's owner "
                            "may replace it; choose another -o")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"cannot replace {path}: its files cannot be deleted by this user (folder not writable); "
                        "choose another -o")


def _keep_mode(old: Path, new: Path) -> None:
    """Give `new`, about to replace `old`, `old`'s permissions, and a folder's files those of the
    files they replace: an output the user had made private stays private (--force made it
    world-readable with the umask's mode)."""
    if old.is_symlink():  # a link's own mode is 0777: never one to give a file
        return
    with contextlib.suppress(OSError):
        os.chmod(new, stat.S_IMODE(os.lstat(old).st_mode))
        if new.is_dir():
            for entry in new.iterdir():
                before = old / entry.name
                if entry.is_file() and before.is_file() and not before.is_symlink():
                    os.chmod(entry, stat.S_IMODE(os.lstat(before).st_mode))


def _remove_old(old: Path, path: Path) -> None:
    """Delete `old`, the output `path` replaced; say so where some of it could not be deleted
    (`_check_replaceable` asked first: a file made unremovable since) rather than leave a hidden
    copy without a word."""
    failed: list[str] = []
    def note(_function, name, err):
        err = err[1] if isinstance(err, tuple) else err  # onerror's exc_info; onexc's exception
        failed.append(f"{name}: {getattr(err, 'strerror', None) or err}")

    # onexc from Python 3.12, where onerror is deprecated (a warning -W error makes an exception)
    shutil.rmtree(old, **{"onexc" if sys.version_info >= (3, 12) else "onerror": note})
    if failed:
        warnings.warn(f"{path} was replaced, but its old copy could not be deleted whole ({failed[0]}); "
                      f"what is left of it is in {old}", stacklevel=2)


def check_writable(path: str | Path) -> None:
    """Fail before the work when `path`'s folder cannot be written (whether `path` may be
    replaced is `check_output`'s question, asked again by the writers)."""
    path = _output_path(path)
    _check_place(path, ())
    _check_parent(path)


def _make_parents(path: Path) -> list[Path]:
    """Create the missing folders above `path`; return them, outermost first, to undo."""
    missing = [p for p in path.absolute().parents if not os.path.lexists(p)][::-1]
    made = []
    try:
        for folder in missing:
            folder.mkdir()
            made.append(folder)
    except OSError as err:
        _remove_made(made)
        raise UserError(f"cannot create folder {folder}: {err.strerror}") from None
    return made


def _remove_made(made: list[Path]) -> None:
    for folder in reversed(made):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if still empty: something else may have come to live there


def fresh_sibling(path: Path, tag: str) -> Path:
    # Hidden, beside the target (same filesystem: the rename is atomic), the suffix kept (onnx.save
    # and savefig choose the format from it), and new: an old leftover is never reused or deleted.
    # A stem near the file system's name limit is shortened to its digest, the name then too long.
    stem = path.stem
    if len(os.fsencode(path.name)) > _name_limit(path.absolute().parent) - 40:
        stem = hashlib.sha256(os.fsencode(stem)).hexdigest()[:16]
    for n in itertools.count():
        name = f".{stem}.{os.getpid()}{f'-{n}' if n else ''}.{tag}{path.suffix}"
        if not os.path.lexists(path.with_name(name)):
            return path.with_name(name)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _disk_errors(path: Path) -> Iterator[None]:
    """A full disk or a file-size limit is the user's to fix: one line, not a traceback."""
    try:
        yield
    except OSError as err:
        if err.errno in DISK_FULL:
            raise UserError(f"cannot write {path}: {os.strerror(err.errno)} (nothing was written)") from None
        raise
    except Exception:
        # Some writers (torch.save, protobuf) hide the OSError; a disk with no room left says it.
        with contextlib.suppress(OSError):
            if os.statvfs(path.absolute().parent).f_bavail == 0:
                raise UserError(f"cannot write {path}: no space left on device (nothing was written)") from None
        raise


def save_tensors(obj, path: Path) -> None:
    """torch.save through bytes: written directly, a full disk raises an opaque RuntimeError
    ("unexpected pos"); through Python's own write it is an OSError that says ENOSPC or EFBIG."""
    import torch  # here: the CLI checks outputs with this module before torch is needed

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getbuffer())


def write_atomically(
    path: str | Path,
    write: Callable[[Path], None],
    *,
    kind: str | None = None,
    force: bool = False,
    replace_own: bool = False,
    before_rename: Callable[[], None] | None = None,
) -> Path:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it onto `path`.

    An existing `path` is replaced only as the module docstring says; `replace_own` is for a file
    inside a folder bngraph owns (a run's checkpoint), rewritten as the run goes.
    `before_rename()` runs after the last check, right before the rename (a companion file put
    in place); a failure after it is the caller's to undo.
    """
    path = _output_path(path)
    if not (replace_own and path.is_file() and not path.is_symlink()):  # a link the user put there is refused
        check_output(path, kind, force=force)
    made = _make_parents(path)
    tmp = fresh_sibling(path, "partial")
    try:
        with _disk_errors(path):
            write(tmp)
            if kind in FILE_SUFFIXES:
                seal(tmp, kind)
        replacing = os.path.lexists(path)
        if replacing and not replace_own:
            check_output(path, kind, force=force)  # the long work may have let something else in
        if replace_own:  # the new digest recorded beside the old one first: a kill in between leaves either valid
            digest = sha256(tmp)
            _record_written(path.parent, {path.name: digest}, keep_previous=True)
        if replacing:
            _keep_mode(path, tmp)
        if before_rename is not None:
            before_rename()
        if replacing or replace_own:
            os.replace(tmp, path)  # what the check above allowed
        else:
            _rename_new(tmp, path)  # fails where another command wrote `path` since
        if replace_own:
            _record_written(path.parent, {path.name: digest})
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_made(made)  # after the temporary: a folder is removed only once empty
        raise
    return path


def _record_written(folder: Path, digests: dict[str, str], *, keep_previous: bool = False) -> None:
    """Record the SHA-256 `digests` of files bngraph writes into `folder`, a run or reproduce
    folder, in its bngraph.json: an edit after this makes the file the user's, which `--force`
    and `--resume` then refuse to lose (`foreign_entries`). With `keep_previous`, the digest
    before stays valid too (the file is about to be replaced). A description the user edited is
    left as it is (it refuses already); a folder that is not bngraph's is not one to record in."""
    if not digests or not (folder / MARKER).is_file():
        return
    meta, changed = _description(folder)
    if changed or meta.get("format") not in FOLDER_FORMATS.values():
        return
    recorded = meta.get("sha256", {})
    for name, digest in digests.items():
        before = recorded.get(name, []) if keep_previous else []
        before = [before] if isinstance(before, str) else before
        recorded[name] = digest if not before else [*before[-1:], digest]
    meta["sha256"] = recorded
    tmp = fresh_sibling(folder / MARKER, "partial")
    try:
        with _disk_errors(folder / MARKER):
            tmp.write_text(description_text(meta), encoding="utf-8")
        os.replace(tmp, folder / MARKER)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_marker(folder: Path, kind: str) -> None:
    with _disk_errors(folder / MARKER):
        (folder / MARKER).write_text(description_text({"format": FOLDER_FORMATS[kind], "format_version": 1}), encoding="utf-8")


class InterruptedAfterWriting(KeyboardInterrupt):
    """Ctrl-C or SIGTERM that came while an old output was swapped out: the new output is in
    place, whole, and the old one gone; only what the command would have done after is not."""


@contextlib.contextmanager
def _stop_signals_deferred() -> Iterator[list[int]]:
    """Ctrl-C and SIGTERM noted, not raised, while the block runs; the list holds those that came.
    Only a handler written in Python raises in the middle of a block (Python's own for Ctrl-C, the
    CLI's for both), and only in the main thread: those are the ones deferred."""
    came: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield came
        return
    previous = {signum: signal.signal(signum, lambda signum, _frame: came.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM) if callable(signal.getsignal(signum))}
    try:
        yield came
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _written_meanwhile(path: Path) -> UserError:
    return UserError(f"{path} appeared while this command worked (another command writing the same -o?): it is "
                     "left as it is; choose another -o")


def _claim(path: Path) -> None:
    """Make the empty folder `path`, onto which a built folder is then renamed; a UserError
    where something else took the name since the checks (two commands writing one -o)."""
    try:
        path.mkdir()
    except FileExistsError:
        raise _written_meanwhile(path) from None


def _rename_new(tmp: Path, path: Path) -> None:
    """Rename the file `tmp` to `path`, which must not exist: a hard link is made only where
    nothing is (os.replace would replace a file another command wrote there since the checks)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _written_meanwhile(path) from None
    except OSError:  # a file system without hard links: the rename, as before
        os.replace(tmp, path)
        return
    tmp.unlink()


def _swap_in(built: Path, path: Path, kind: str, force: bool) -> None:
    """Put the folder `built` at `path`; an old output there goes aside, then away.

    A stop signal waits until the swap is done, the old output's removal included: stopped
    between the rename and the end of that removal, `path` held the new output beside a hidden,
    half-deleted `.NAME.PID.old`, and the message said the old output was kept. It then ends the
    command as `InterruptedAfterWriting`.
    """
    replacing = os.path.lexists(path)  # asked once: what is there now was not checked
    if replacing:
        check_output(path, kind, force=force)  # the long work may have let something else in
    with _stop_signals_deferred() as stopped:
        old = None
        if replacing:
            _keep_mode(path, built)
            old = fresh_sibling(path, "old")
            os.replace(path, old)  # a folder cannot be replaced in one rename: `path` is gone an instant
        else:
            _claim(path)  # a rename onto an empty folder replaces it: the name is taken first
        try:
            os.replace(built, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            else:
                _remove_made([path])
            raise
        if old is not None:
            _remove_old(old, path)  # checked above: a bngraph output of this kind
    if stopped:
        interrupted = InterruptedAfterWriting(f"after {path} was written whole (the old one it replaced is gone)")
        interrupted.signum = stopped[-1]  # the exit code says which (the CLI's 128 + signum)
        raise interrupted


def write_dir_atomically(
    path: str | Path, write: Callable[[Path], None], *, kind: str = ARTIFACT, force: bool = False
) -> Path:
    """Build a folder as a temporary sibling, then move it onto `path` (see the module docstring).

    `write(tmp)` fills the folder; a run or reproduce folder gets its `bngraph.json` here.
    """
    path = check_output(path, kind, force=force)
    made = _make_parents(path)
    tmp = fresh_sibling(path, "partial")
    try:
        tmp.mkdir()
        with _disk_errors(path):
            write(tmp)
            if kind != ARTIFACT and not (tmp / MARKER).exists():
                _write_marker(tmp, kind)
                _record_written(tmp, {p.name: sha256(p) for p in tmp.iterdir() if p.is_file() and p.name != MARKER})
        _swap_in(tmp, path, kind, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)  # after the temporary: a folder is removed only once empty
        raise
    return path


def start_run_folder(path: Path, *, resume: bool) -> None:
    """The folder a training run writes as it goes (see `run_folder`): new, empty or a run's."""
    path = Path(path)
    if resume:
        return
    if path.is_dir() and any(p.name != MARKER for p in path.iterdir()) and output_kind(path) != RUN:
        raise UserError(f"{path} is a folder bngraph did not write: it is left as it is; choose another -o")
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER).exists():
        _write_marker(path, RUN)


def refuse_symlinked_run(path: Path) -> None:
    """A run folder is a folder: through a symbolic link, whether it is bngraph's run cannot be
    told (`output_kind`), and the two refusals sent the user from --resume to its absence and back."""
    if path.is_symlink():
        raise UserError(f"{path} is a symbolic link: give the run folder itself (where it points: {os.path.realpath(path)})")


@contextlib.contextmanager
def run_folder(path: str | Path, *, force: bool = False, resume: bool = False, inputs=()) -> Iterator[Path]:
    """The folder a training run fills as it goes, so that a stopped run can `--resume`.

    A new path is the run folder itself: a run stopped after a checkpoint stays there, whole and
    resumable; one stopped before any checkpoint is removed with the folders made for it. With
    `force` over an old run, the new run is built beside it and swapped in when done: stopped, it
    is discarded and the old run stays as it was; done, but the old run may no longer be replaced
    (the user put a file into it meanwhile), it is kept as OUT.new and the error says so.
    """
    path = absolute_output(path)
    if resume:
        if force:
            raise UserError("--resume continues the run in -o, --force replaces it: choose one")
        refuse_symlinked_run(path)
        _check_place(path, inputs)
        with _held(path, pass_on=True) if path.is_dir() else contextlib.nullcontext():
            yield path
        return
    check_output(path, RUN, force=force, inputs=inputs)
    replacing = os.path.lexists(path)
    made = _make_parents(path)
    folder = fresh_sibling(path, "partial") if replacing else path
    try:
        folder.mkdir()  # outside the cleanup below: a folder that appeared since the check is not ours
    except FileExistsError:
        _remove_made(made)
        raise UserError(f"{path} appeared while bngraph was starting the run: it is left as it is; choose another -o") from None
    with _held(folder, pass_on=True):
        yield from _filling(folder, path, made, replacing, force)


# The run folder `run_folder` holds for the one `bngraph.train` call it wraps (`held_run_folder`):
# that call holds it on; any other (a second run started from its on_eval) is refused.
_passed_on: str | None = None
_held_here: set[str] = set()  # the run folders this process holds, for the refusal's words


@contextlib.contextmanager
def _held(folder: Path, *, pass_on: bool = False) -> Iterator[None]:
    """Hold `folder` for one training run (an advisory lock the kernel drops with the process):
    a second run, a `--resume` or a `--force` of the same folder meanwhile is refused, not let
    write into it or swap it away under the first (`refuse_if_running`). With `pass_on`, the
    first `held_run_folder` of it inside holds it on (a second flock of this process's own
    would refuse it)."""
    global _passed_on
    key = os.path.realpath(folder)
    if key in _held_here:  # flock would refuse it too, in words about another process
        raise UserError(f"{folder} is the folder of a training run still going in this process (a run started from "
                        "its on_eval?): it is left as it is; start the new run when that one is done, or choose another -o")
    fd = os.open(folder, os.O_RDONLY)
    try:
        _lock(fd, folder, fcntl.LOCK_EX)
        before, _passed_on = _passed_on, key if pass_on else _passed_on
        _held_here.add(key)
        try:
            yield
        finally:
            _passed_on = before
            _held_here.discard(key)
    finally:
        os.close(fd)


@contextlib.contextmanager
def held_run_folder(folder: Path) -> Iterator[None]:
    """`_held` for `bngraph.train`'s own run folder: two processes training into one folder (an
    API script started twice, or under torchrun without `distributed=join(...)`) both wrote it,
    the last writer's checkpoint winning. The CLI's `run_folder` holds it already and passes it
    on to the one call it wraps."""
    global _passed_on
    if _passed_on is not None and _passed_on == os.path.realpath(folder):
        _passed_on = None  # taken: a run this one starts (from its on_eval) is refused
        yield
        return
    with _held(folder):
        yield


def refuse_if_running(folder: Path) -> None:
    """Refuse a run folder that a training run still going in another process holds (`_held`;
    this process's own hold is `held_run_folder`'s to judge)."""
    if os.path.realpath(folder) in _held_here:
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        _lock(fd, folder, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def _lock(fd: int, folder: Path, kind: int) -> None:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"{folder} is the folder of a training run still going (another bngraph process): it is "
                        "left as it is; wait for that run, stop it, or choose another -o") from None


def _swap_in_or_keep_beside(folder: Path, path: Path, force: bool) -> None:
    """Put the finished run `folder` in place of the old run at `path`. Where the old run may no
    longer be replaced (a file the user put into it while the new one trained), it is left as it
    is, and the new run, perhaps hours of training, is kept beside it under a name of its own
    (said in the error) rather than deleted as a temporary."""
    try:
        _swap_in(folder, path, RUN, force)
    except UserError as refused:
        kept = _keep_beside(folder, path)
        what = f"the finished new run is kept in {kept}" if kept else "the new run was discarded"
        raise UserError(f"{refused}; {what}") from None


def _keep_beside(folder: Path, path: Path) -> Path | None:
    """Rename `folder` to a new name beside `path` (run.new, run.new-2, ...); None if it cannot be."""
    for n in itertools.count(1):
        kept = path.with_name(f"{path.name}.new{f'-{n}' if n > 1 else ''}")
        try:
            kept.mkdir()  # the name taken first: a rename onto an empty folder someone made would replace it
        except FileExistsError:
            continue
        except OSError:
            return None
        try:
            os.replace(folder, kept)  # onto the empty folder just made
        except OSError:
            _remove_made([kept])
            return None
        return kept
    raise AssertionError("unreachable")


def _filling(folder: Path, path: Path, made: list[Path], replacing: bool, force: bool) -> Iterator[Path]:
    try:
        _write_marker(folder, RUN)
        yield folder
        if replacing:
            _swap_in_or_keep_beside(folder, path, force)
    except InterruptedAfterWriting:
        raise  # the new run is in place: nothing to discard
    except KeyboardInterrupt as stop:
        if replacing:
            shutil.rmtree(folder, ignore_errors=True)
            # Not the loop's "resume with --resume": the checkpoint it names went with the new run.
            discarded = KeyboardInterrupt(f"the new run was discarded; {path} is as it was")
            if hasattr(stop, "signum"):  # which signal (the exit code says it: 143 for SIGTERM)
                discarded.signum = stop.signum
            raise discarded from None
        if not (folder / "checkpoint.pt").exists():
            _discard_run(folder)
            _remove_made(made)
        raise
    except BaseException:
        if replacing or not (folder / "checkpoint.pt").exists():
            _discard_run(folder)
            _remove_made(made)
        raise


def _discard_run(folder: Path) -> None:
    """Remove what bngraph wrote in a run folder it is giving up; a file the user put there while
    the run went on (notes.txt) stays, in the folder, which is then no run (its marker gone)."""
    if not folder.is_dir():
        return
    theirs = {name.split("/")[0] for name in foreign_entries(folder, RUN)}
    if not theirs:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for entry in folder.iterdir():
        if entry.name in theirs:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
