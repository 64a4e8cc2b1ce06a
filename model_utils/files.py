"""Files: the one atomic write (and the clean-up of its leftovers), the one writability check and the one
rule for "the images of a folder"."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from model_utils.cli import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
TEMP_SUFFIX = ".tmp"
_TEMP_PATTERN = re.compile(r"\.(\d+)" + re.escape(TEMP_SUFFIX) + "$")  # the writer's pid, in atomic_output


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (other threads may create files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere it can only be read by setting it
    os.umask(mask)
    return mask


def give_umask_permissions(path: str | os.PathLike) -> None:
    """Set a file's mode to what the umask gives a new file (writers like MindSpore's make them 0400/0600)."""
    os.chmod(path, 0o666 & ~_umask())


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed.

    The temporary name is `.<name>.<random>.<pid>.tmp<suffix>` (`suffix` for writers that insist on
    an extension), so leftovers of killed processes can be recognised. The result is fsync'ed and
    gets the permissions the umask gives a new file (the temporary stays private until renamed).
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=f".{os.getpid()}{TEMP_SUFFIX}{suffix}"
    )
    os.close(handle)
    try:
        yield Path(temporary)
        descriptor = os.open(temporary, os.O_RDONLY)  # some writers (mindspore.export) leave files read-only
        try:
            os.fsync(descriptor)  # flush to disk so a power cut cannot leave a hole
        finally:
            os.close(descriptor)
        give_umask_permissions(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _pid_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temporaries(directory: str | os.PathLike, prefix: str) -> None:
    """Delete the atomic_output temporaries `<prefix>*.tmp` in `directory` left by processes that no
    longer run (killed mid-write); those of live writers (other processes on this machine) stay."""
    for path in Path(directory).glob(f"{glob.escape(prefix)}*{TEMP_SUFFIX}"):
        match = _TEMP_PATTERN.search(path.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_is_running(int(match.group(1))):
            path.unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's content, read in blocks (about 1 GB/s)."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive flock on `directory`, e.g. for read-modify-write updates of small files in it
    by concurrent processes. Leaves nothing behind. `wait=False`: BlockingIOError when it is held."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield
    finally:
        os.close(handle)  # releases the lock


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    with atomic_output(path) as temporary, open(temporary, "wb") as stream:
        stream.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def require_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail before any work when `path` cannot be written (a directory, or a folder we cannot write).

    The parent folder is created when missing, as the writers would.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the folder of {what} {path}: {error.strerror}") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{what} {path} is not writable")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: folder {path.parent} is not writable")
    return path


def require_writable_dir(path: str | os.PathLike, what: str = "output folder", create: bool = True) -> Path:
    """Fail before any work when folder `path` cannot be written; created when missing, unless `create`
    is False (then the nearest existing parent must be writable, so the writer can create it later)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path} is a file, not a folder")
    if not create and not path.exists():
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise InputError(f"cannot create {what} {path}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"cannot create {what} {path}: folder {parent} is not writable")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create {what} {path}: {error.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path} is not writable")
    return path


def read_image_list(list_path: str | os.PathLike) -> list[str]:
    """Image names of a list file, one a line (blank lines and '#' comments ignored)."""
    list_path = Path(list_path)
    if not list_path.is_file():
        raise FileNotFoundError(f"image list {list_path} not found")
    try:
        text = list_path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"image list {list_path} is not UTF-8 text") from None
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def image_id(name: str) -> str:
    """The id of an image: its name (relative path) without a known image suffix."""
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix and suffix.lower() in IMAGE_SUFFIXES else name


def list_images(images_dir: str | os.PathLike, names: Sequence[str] | None = None) -> dict[str, Path]:
    """Image id -> path of the images in a folder and its sub-folders, sorted by id.

    An image is a file with one of IMAGE_SUFFIXES (any case); its id is its path relative to
    `images_dir` without the suffix. Two files with one id (`dup.jpg`, `dup.png`) are refused,
    never one silently dropped. `names` (ids, or names with a suffix) selects and orders images.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise InputError(f"image folder {images_dir} does not exist")
    found: dict[str, list[Path]] = {}
    for path in sorted(images_dir.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.setdefault(path.relative_to(images_dir).with_suffix("").as_posix(), []).append(path)
    collisions = {key: paths for key, paths in found.items() if len(paths) > 1}
    if collisions:
        listed = "; ".join(", ".join(str(p) for p in paths) for paths in collisions.values())
        raise InputError(f"{len(collisions)} image name(s) in {images_dir} differ only by suffix, "
                         f"so their features would collide: {listed}")
    images = {key: paths[0] for key, paths in found.items()}
    if names is None:
        if not images:
            raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}")
        return images
    wanted = [image_id(name) for name in names]
    missing = [name for name in wanted if name not in images]
    if missing:
        more = f" (and {len(missing) - 1} more listed images)" if len(missing) > 1 else ""
        raise InputError(f"image {missing[0]!r} not found in {images_dir} (any of {', '.join(IMAGE_SUFFIXES)}){more}")
    return {name: images[name] for name in wanted}


class ImageFolder:
    """Images of a folder found by name, by the rule of list_images; each sub-folder is listed once
    (finding many images costs one listing per folder, not one per image)."""

    def __init__(self, images_dir: str | os.PathLike) -> None:
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise InputError(f"image folder {self.images_dir} does not exist")
        self._stems: dict[Path, dict[str, list[str]]] = {}  # folder -> file stem -> image file names

    def _listing(self, folder: Path) -> dict[str, list[str]]:
        if folder not in self._stems:
            stems: dict[str, list[str]] = {}
            for name in sorted(os.listdir(folder)) if folder.is_dir() else ():
                stem, suffix = os.path.splitext(name)
                if suffix.lower() in IMAGE_SUFFIXES:
                    stems.setdefault(stem, []).append(name)
            self._stems[folder] = stems
        return self._stems[folder]

    def find(self, name: str) -> Path:
        """The image file `name` (with or without its suffix)."""
        wanted = image_id(name)
        folder = (self.images_dir / wanted).parent  # ids may hold sub-folders; list only that one
        candidates = [folder / file for file in self._listing(folder).get(Path(wanted).name, ())
                      if (folder / file).is_file()]
        if not candidates:
            raise InputError(f"no image named {wanted!r} ({'/'.join(IMAGE_SUFFIXES)}) in {self.images_dir}")
        if len(candidates) > 1:
            raise InputError(f"image name {wanted!r} is ambiguous in {self.images_dir}: "
                             + ", ".join(path.name for path in candidates))
        return candidates[0]


def find_image(images_dir: str | os.PathLike, name: str) -> Path:
    """The image file `name` (with or without its suffix) in `images_dir`, by the rule of list_images."""
    return ImageFolder(images_dir).find(name)
