"""A run's folder on disk, `<data_dir>/runs/<id>/`: the one owner of its layout. No other module spells a
file name of it.

```
run.yaml                          the resolved configuration (`tuneboard train run.yaml` reruns it)
train.log                         the training process's output, every attempt
error.txt                         the training process's own sentence when it fails in a way it can explain
checkpoints/checkpoint-<step>/    Trainer checkpoints; TUNEBOARD_COMPLETE is written into each once saved
adapter/                          the trained adapter (PEFT layout) and tokenizer
adapter/tuneboard.json            which step the adapter is, and whether it is the last or the best one
exports/<format>-<final|step-S>/  a finished export's files (app.exports names them); made aside, renamed in
```
No torch here: the web tier reads folders, the worker and the training process write them. A worker on
another machine keeps its own copy and sends checkpoints, the adapter and the log to the web server, which
stores them here (`store_checkpoint`, `store_adapter`, `append_log`) as uncompressed tar streams (`pack`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tarfile
import threading
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

CHECKPOINT_MARKER = "TUNEBOARD_COMPLETE"  # written last into a checkpoint folder: the save is complete
CHECKPOINT_PREFIX = "checkpoint-"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_SOURCE = "tuneboard.json"
INCOMING, OLD = ".incoming-", ".old-"  # an archive being unpacked; a folder being replaced
LOG_RECEIVED = ".log-received"  # [sender, bytes of its log received]: a resent chunk is appended once


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    @property
    def complete(self) -> bool:
        return (self.path / CHECKPOINT_MARKER).is_file()

    @property
    def has_adapter(self) -> bool:
        return self.complete and (self.path / ADAPTER_CONFIG).is_file()

    def mark_complete(self) -> None:
        (self.path / CHECKPOINT_MARKER).write_text(str(self.step))

    def size(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def step_of(path: Path) -> int | None:
    """The step in a `checkpoint-<step>` folder's name, or None for any other name."""
    number = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(number) if path.name.startswith(CHECKPOINT_PREFIX) and number.isdigit() else None


def file_tail(path: Path, most: int) -> str:
    """The last `most` bytes of a file, as text ("" when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - most))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "run.yaml"

    @property
    def log(self) -> Path:
        return self.path / "train.log"

    @property
    def error(self) -> Path:
        return self.path / "error.txt"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def has_adapter(self) -> bool:
        return (self.adapter / ADAPTER_CONFIG).is_file()

    @property
    def exports_dir(self) -> Path:
        return self.path / "exports"

    def export_dir(self, format: str, step: int) -> Path:
        """Where one export's files live: of the final adapter (step 0) or of that checkpoint."""
        return self.exports_dir / f"{format}-{'final' if step == 0 else f'step-{step}'}"

    def checkpoint(self, step: int) -> Checkpoint:
        return Checkpoint(self.checkpoints_dir / f"{CHECKPOINT_PREFIX}{step}", step)

    def checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint folder, complete or not, oldest first."""
        found = [
            Checkpoint(p, step)
            for p in self.checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*")
            if (step := step_of(p)) is not None
        ]
        return sorted(found, key=lambda c: c.step)

    def complete_checkpoints(self) -> list[Checkpoint]:
        return [c for c in self.checkpoints() if c.complete]

    def adapter_source(self) -> dict | None:
        """{"step": S, "chosen": "last" | "best"} for the final adapter, when it says."""
        try:
            return json.loads((self.adapter / ADAPTER_SOURCE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    @staticmethod
    def write_adapter_source(adapter: Path, step: int, chosen: str) -> None:
        (adapter / ADAPTER_SOURCE).write_text(json.dumps({"step": step, "chosen": chosen}), encoding="utf-8")

    @staticmethod
    def copy_adapter(checkpoint: Path, adapter: Path) -> None:
        """A checkpoint's adapter (its PEFT config and weights) into an adapter folder."""
        for name in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS):
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, adapter / name)

    def adapter_at(self, step: int | None) -> Path:
        """The final adapter (step None) or a checkpoint's."""
        return self.adapter if step is None else self.checkpoint(step).path

    def read_error(self) -> str | None:
        return self.error.read_text(encoding="utf-8").strip() if self.error.is_file() else None

    def tail(self, lines: int = 40) -> str:
        """The last lines of the log (reading at most its last 64 kB)."""
        return "\n".join(file_tail(self.log, 64_000).splitlines()[-lines:])

    def store_checkpoint(self, step: int, source: IO[bytes], keep: set[int] | None = None) -> Checkpoint:
        """A whole checkpoint received as a tar stream: unpacked beside the others, marked complete, then
        renamed into place (a half-received one is never seen). Checkpoints not in `keep` (the sender's
        own set after its rotation) are deleted."""
        checkpoint = self.checkpoint(step)
        staging = unpack(source, self.checkpoints_dir)
        if not Checkpoint(staging, step).complete:  # the sender's marker travels last: a cut one has none
            shutil.rmtree(staging, ignore_errors=True)
            raise ValueError(f"checkpoint {step} arrived without its {CHECKPOINT_MARKER} marker (incomplete)")
        _replace(staging, checkpoint.path)
        if keep is not None:
            for other in self.checkpoints():
                if other.step not in keep | {step}:
                    shutil.rmtree(other.path, ignore_errors=True)
        return checkpoint

    def store_adapter(self, source: IO[bytes]) -> None:
        """The final adapter received as a tar stream, swapped in whole."""
        staging = unpack(source, self.path)
        if not (staging / ADAPTER_CONFIG).is_file():
            shutil.rmtree(staging, ignore_errors=True)
            raise ValueError(f"The adapter received has no {ADAPTER_CONFIG}.")
        _replace(staging, self.adapter)

    def store_export(self, format: str, step: int, source: IO[bytes], main_file: str) -> Path:
        """An export's files received as a tar stream (from a worker on another machine), swapped in
        whole; refused unless `main_file` is among them."""
        staging = unpack(source, self.exports_dir)
        if not (staging / main_file).is_file():
            shutil.rmtree(staging, ignore_errors=True)
            raise ValueError(f"The export received has no {main_file}.")
        target = self.export_dir(format, step)
        _replace(staging, target)
        return target

    def append_log(self, data: bytes, sender: str, offset: int) -> None:
        """Bytes `offset`… of `sender`'s copy of the log (one attempt's), appended; bytes already received
        from that sender (a request sent again because its answer was lost) are not appended twice.
        ValueError, and nothing stored, when the bytes would leave a gap (they start past what is held)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with _REPLACING:
            received = self._log_received()
            have = received[1] if received and received[0] == sender else 0
            if offset > have:
                raise ValueError(
                    f"These log bytes start at byte {offset:,}, but the server holds {have:,} bytes of this "
                    f"attempt's log; send from byte {have:,}. Nothing was stored."
                )
            new = data[have - offset :]
            if new:
                with open(self.log, "ab") as f:
                    f.write(new)
            (self.path / LOG_RECEIVED).write_text(json.dumps([sender, max(have, offset + len(data))]))

    def _log_received(self) -> list | None:
        try:
            return json.loads((self.path / LOG_RECEIVED).read_text())
        except (OSError, ValueError):
            return None


def own_files(folder: Path) -> list[Path]:
    """The folder's regular files, in subfolders too: never a symbolic link, nor anything under a linked
    folder (what a run made is plain files; a link would carry another file of the machine along)."""
    found: list[Path] = []
    for parent, _folders, files in os.walk(folder):  # links to folders are not followed
        found.extend(p for p in (Path(parent, name) for name in files) if p.is_file() and not p.is_symlink())
    return sorted(found)


def zip_folder(folder: Path, into: IO[bytes], prefix: str) -> None:
    """The folder's own files (`own_files`) as a zip archive, each under `prefix/`."""
    with zipfile.ZipFile(into, "w", zipfile.ZIP_DEFLATED, strict_timestamps=False) as archive:
        for path in own_files(folder):
            archive.write(path, f"{prefix}/{path.relative_to(folder)}")


def pack(folder: Path, into: IO[bytes]) -> None:
    """The folder's files as an uncompressed tar stream (names relative to the folder), a checkpoint's
    marker last. FileNotFoundError when the folder, or a file of it, goes away meanwhile (a checkpoint
    rotated away): never a partial archive."""
    if not folder.is_dir():
        raise FileNotFoundError(folder)
    files = sorted(own_files(folder), key=lambda p: (p.name == CHECKPOINT_MARKER, p))
    with tarfile.open(fileobj=into, mode="w|") as archive:
        for path in files:
            archive.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    if not folder.is_dir():
        raise FileNotFoundError(folder)


# What a received archive may hold. Our own `pack` writes plain files and folders, and a PAX header only for
# a long name or a file over 8 GiB (a few hundred bytes); anything larger is refused before tarfile reads it,
# so that no header can cost more than a few milliseconds or kilobytes to parse.
TAR_BLOCK = 512
MAX_TAR_MEMBERS = 20_000
MAX_TAR_HEADER = 8192  # bytes of one PAX or GNU long-name header
TAR_CONTENT = {b"0", b"\0", b"5"}  # a file, a file (old style), a folder
TAR_META = {b"x", b"L"}  # the next member's PAX header, its GNU long name


def _tar_number(field: bytes) -> int:
    """A tar header's number: octal text, or base-256 when the first byte's high bit is set."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise tarfile.TarError("a member's header is damaged (its size is not a number)") from None


def _pax_size(record: bytes) -> int | None:
    """The `size` a PAX header gives the next member, if any (records are `LENGTH key=value\\n`)."""
    size, at = None, 0
    while at < len(record):
        space = record.find(b" ", at)
        if space < 0:
            break
        try:
            length = int(record[at:space])
        except ValueError:
            raise tarfile.TarError("a PAX header is damaged") from None
        if length <= space - at:
            raise tarfile.TarError("a PAX header is damaged")
        key, _, value = record[space + 1 : at + length - 1].partition(b"=")
        if key == b"size":
            try:
                size = int(value)
            except ValueError:
                raise tarfile.TarError("a PAX header is damaged (its size is not a number)") from None
        at += length
    return size


def check_tar(source: IO[bytes]) -> int:
    """Walk a tar stream's headers without unpacking (linear in the number of members, bounded memory) and
    refuse, with a TarError sentence, what Tuneboard never sends: links, devices, global or oversized
    headers, more than MAX_TAR_MEMBERS members. Returns the member count; `source` is left at its start."""
    start, members, pending = source.tell(), 0, None
    try:
        while True:
            header = source.read(TAR_BLOCK)
            if len(header) < TAR_BLOCK:
                raise tarfile.TarError("the archive ends in the middle of a member (cut short)")
            if header == bytes(TAR_BLOCK):
                return members
            kind, size = header[156:157], _tar_number(header[124:136])
            if kind in TAR_META:
                if size > MAX_TAR_HEADER:
                    raise tarfile.TarError(
                        f"a member's extended header is {size:,} bytes (at most {MAX_TAR_HEADER:,} accepted)"
                    )
                body = source.read(size)
                source.seek(-size % TAR_BLOCK, 1)
                if kind == b"x":
                    pending = _pax_size(body)
                continue
            if kind not in TAR_CONTENT:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")[:200]
                raise tarfile.TarError(f"{name} is neither a plain file nor a folder")
            members += 1
            if members > MAX_TAR_MEMBERS:
                raise tarfile.TarError(f"the archive holds more than {MAX_TAR_MEMBERS:,} members")
            size = size if pending is None else pending
            pending = None
            if kind != b"5":
                source.seek(size + (-size % TAR_BLOCK), 1)
    finally:
        source.seek(start)


def unpack(source: IO[bytes], parent: Path) -> Path:
    """A tar stream unpacked into a new hidden folder under `parent` (returned). Only plain files and
    folders inside it are accepted (`check_tar` first, then tarfile's "data" filter: no links out, no
    devices, no absolute paths); anything else raises tarfile.TarError with a sentence and leaves nothing
    behind. `source` must be seekable (a spooled body)."""
    check_tar(source)
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f"{INCOMING}{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        with tarfile.open(fileobj=source, mode="r|") as archive:
            for member in archive:
                if not (member.isfile() or member.isdir()) or member.issparse():
                    raise tarfile.TarError(f"{member.name[:200]} is neither a plain file nor a folder")
                try:
                    archive.extract(member, staging, filter="data")
                except (IsADirectoryError, NotADirectoryError, FileExistsError):
                    clash = f"{member.name[:200]} is both a file and a folder in the archive"
                    raise tarfile.TarError(clash) from None
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        raise
                    raise tarfile.TarError(
                        f"{member.name[:200]} cannot be written ({exc.strerror})"
                    ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def sweep_leftovers(runs_dir: Path) -> int:
    """Remove what a crash left half-made in the run folders: archives being unpacked, folders being
    replaced. Called when the web server starts; returns how many it removed."""
    removed = 0
    for pattern in (f"*/{INCOMING}*", f"*/*/{INCOMING}*", f"*/{OLD}*", f"*/*/{OLD}*"):
        for leftover in runs_dir.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
            removed += 1
    return removed


_REPLACING = threading.Lock()  # two stores of one target in one process (a retried upload, two fetches)


def _replace(staging: Path, target: Path) -> None:
    """Put `staging` where `target` is, the old one (if any) removed first."""
    with _REPLACING:
        if target.exists():
            old = target.with_name(f"{OLD}{uuid.uuid4().hex}")
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
