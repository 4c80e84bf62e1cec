"""The tar-shard format written by ``data_prep/to_dali.py`` and read by the DALI and nvjpeg loaders.

A shard folder holds webdataset tar archives (Aizman et al., "High Performance I/O For Large
Scale Deep Learning", 2019), one DALI index file per archive, and ``manifest.json``::

    <dir>/shard-000000.tar    <key>.jpg + <key>.cls per sample, keys zero-padded, in order
    <dir>/shard-000000.idx    DALI's index: "v1.2 <N>", then per sample for each component
                              "<ext> <data offset> <size> <member name>"
    <dir>/manifest.json       shards, sample counts, labels, classes, checksums (:class:`Manifest`)

The index makes every sample addressable without scanning a tar: DALI's
``fn.readers.webdataset(paths, index_paths=...)`` uses it at start-up, and
:class:`ShardReader` reads a sample's bytes with one ``pread`` at its recorded offset, which is
all a torch-only loader needs. The same archives are plain POSIX (ustar) tars, so Python's
``tarfile``, GNU tar and the ``webdataset`` package read them too. :class:`ShardWriter` makes
them byte-for-byte deterministic: fixed member metadata (mtime 0, uid/gid 0, empty user and
group names, mode 0644) and no timestamps anywhere.

API::

    read_manifest(dir) -> Manifest              write_manifest(dir, manifest)
    Manifest.tar_paths(dir), .index_paths(dir)  absolute paths for fn.readers.webdataset
    Manifest.labels, .classes, .num_samples     labels of every sample without reading the tars
    read_index(path) -> [(key, {ext: (offset, size)})]
    write_index(path, samples)                  format_index(samples) -> str
    ShardWriter(tar_path, index_path)           .add(key, {ext: bytes}); .close() -> ShardEntry
    ShardReader(dir)                            len(r), r.labels, r.classes, r.read(i) -> (bytes, label)
                                                r.describe(i): "<tar> sample <key> (index i)"
    read_member(path, offset, size) -> bytes

Only the standard library and numpy are used: the GPU machines have no webdataset or DALI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

INDEX_VERSION = "v1.2"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "fastsiam-webdataset"
MANIFEST_VERSION = 1
TAR_BLOCK = 512

# One sample's index entry: its key and, per component extension, (data offset, size).
IndexEntry = tuple[str, dict[str, tuple[int, int]]]

__all__ = [
    "INDEX_VERSION",
    "MANIFEST_NAME",
    "IndexEntry",
    "Manifest",
    "ShardEntry",
    "ShardFormatError",
    "ShardReader",
    "ShardWriter",
    "format_index",
    "open_shard_folder",
    "parse_index",
    "read_index",
    "read_index_and_sha256",
    "read_manifest",
    "read_member",
    "tar_member_bytes",
    "ustar_header",
    "write_index",
    "write_manifest",
]


class ShardFormatError(ValueError):
    """A shard folder, index or manifest that does not match the format (one-line message)."""


# ----------------------------------------------------------------------------- index files


def format_index(samples: Sequence[tuple[str, Sequence[tuple[str, int, int]]]]) -> str:
    """DALI's v1.2 index text for ``[(key, [(ext, data_offset, size), ...]), ...]``.

    Member names are ``<key>.<ext>``, as :class:`ShardWriter` stores them.
    """
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for key, components in samples:
        lines.append(" ".join(f"{ext} {offset} {size} {key}.{ext}"
                              for ext, offset, size in components))
    return "\n".join(lines) + "\n"


def parse_index(text: str, where: str = "<index>") -> list[IndexEntry]:
    """Parse DALI's v1.2 index text into ``[(key, {ext: (offset, size)})]`` in sample order."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ShardFormatError(f"{where}: first line must be '{INDEX_VERSION} <num_samples>', "
                               f"got {lines[0] if lines else ''!r} (regenerate it with DALI's wds2idx)")
    body = [line for line in lines[1:] if line.strip()]
    if len(body) != int(head[1]):
        raise ShardFormatError(f"{where}: header says {head[1]} samples, found {len(body)} lines")
    entries: list[IndexEntry] = []
    for lineno, line in enumerate(body, 2):
        tokens = line.split()
        if not tokens or len(tokens) % 4:
            raise ShardFormatError(f"{where}:{lineno}: expected groups of 'ext offset size name', "
                                   f"got {len(tokens)} fields")
        key = None
        components: dict[str, tuple[int, int]] = {}
        for j in range(0, len(tokens), 4):
            ext, offset, size, name = tokens[j:j + 4]
            if not (offset.isdigit() and size.isdigit()):
                raise ShardFormatError(f"{where}:{lineno}: offset and size must be integers, "
                                       f"got {offset!r} {size!r}")
            # DALI's rule: the key is the member name up to the first dot of its base name.
            base = name.rsplit("/", 1)[-1]
            member_key = name[:len(name) - len(base)] + base.split(".", 1)[0]
            if key is None:
                key = member_key
            elif member_key != key:
                raise ShardFormatError(f"{where}:{lineno}: components of one sample have different "
                                       f"keys ({key!r}, {member_key!r})")
            if ext in components:
                raise ShardFormatError(f"{where}:{lineno}: extension {ext!r} appears twice")
            components[ext] = (int(offset), int(size))
        entries.append((key or "", components))
    return entries


def read_index(path: str | os.PathLike[str]) -> list[IndexEntry]:
    """Read a DALI index file: ``[(key, {ext: (data offset, size)})]`` in sample order."""
    return read_index_and_sha256(path)[0]


def read_index_and_sha256(path: str | os.PathLike[str]) -> tuple[list[IndexEntry], str]:
    """:func:`read_index` and the file's sha256, from one read (the reader checks the index
    against the manifest at open: a few bytes per sample, less than parsing them costs)."""
    try:
        data = Path(path).read_bytes()
        text = data.decode()
    except FileNotFoundError:
        raise ShardFormatError(f"index file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ShardFormatError(f"index file {path} is not readable text ({e})") from None
    return parse_index(text, str(path)), hashlib.sha256(data).hexdigest()


def write_index(path: str | os.PathLike[str],
                samples: Sequence[tuple[str, Sequence[tuple[str, int, int]]]]) -> str:
    """Write :func:`format_index`'s text atomically; returns the text's sha256."""
    from fastsiam.files import atomic_open

    data = format_index(samples).encode()
    with atomic_open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- tar writing


def tar_member_bytes(size: int) -> int:
    """Bytes a member of ``size`` bytes takes in a ustar archive (header + padded data)."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def _header_template() -> tuple[bytes, int]:
    info = tarfile.TarInfo("")
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
    buf = info.tobuf(tarfile.USTAR_FORMAT, "ascii", "strict")
    # The checksum counts its own 8-byte field as spaces (tarfile.calc_chksums).
    blank = buf[:148] + b" " * 8 + buf[156:]
    return blank, sum(blank)


_HEADER, _HEADER_SUM = _header_template()


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header tarfile writes for a regular file ``name`` of ``size`` bytes
    with the shards' fixed metadata (mtime 0, mode 0644, uid/gid 0, empty user/group names).

    Built from a template (only name, size and checksum vary): tarfile's ``TarInfo.tobuf``
    costs ~25 us per member, a noticeable share of writing a small JPEG.
    """
    raw = name.encode("utf-8")
    if not raw or len(raw) > 100:
        raise ValueError(f"tar member name {name!r}: must be 1-100 bytes for a ustar header")
    size_field = b"%011o\0" % size  # tarfile.itn(size, 12, USTAR_FORMAT)
    if len(size_field) != 12:
        raise ValueError(f"tar member {name!r}: {size} bytes is too large for a ustar header")
    checksum = _HEADER_SUM + sum(raw) + sum(size_field) - sum(_HEADER[124:136])
    return (raw + _HEADER[len(raw):124] + size_field + _HEADER[136:148]
            + b"%06o\0 " % checksum + _HEADER[156:])


@dataclass(frozen=True)
class ShardEntry:
    """One shard in the manifest; paths are relative to the shard folder.

    Attributes:
        tar, index: file names of the archive and its DALI index.
        samples: number of samples.
        bytes: size of the tar.
        sha256, index_sha256: checksums of the tar and the index file.
        labels: the class index of each sample (what its ``.cls`` member holds).
    """

    tar: str
    index: str
    samples: int
    bytes: int
    sha256: str
    index_sha256: str
    labels: list[int] = field(default_factory=list)


class ShardWriter:
    """Write one tar shard and its DALI index, deterministically and crash-safely.

    Both files are written under temporary names and renamed into place by :meth:`close`;
    :meth:`abort` (or an exception inside ``with``) removes them. Members are stored in the
    order added, with fixed metadata, so equal input gives byte-identical files.

    Args:
        tar_path: the archive to write (``shard-000000.tar``).
        index_path: its DALI index (``shard-000000.idx``).
    """

    def __init__(self, tar_path: str | os.PathLike[str], index_path: str | os.PathLike[str]):
        from fastsiam.files import atomic_path

        self.tar_path, self.index_path = Path(tar_path), Path(index_path)
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_path(self.tar_path))
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed in close/abort)
        self._sha256 = hashlib.sha256()  # of everything written: no second read of the tar
        self._offset = 0
        self._samples: list[tuple[str, list[tuple[str, int, int]]]] = []

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def bytes_written(self) -> int:
        """The archive's size so far, without the end-of-archive blocks."""
        return self._offset

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha256.update(data)
        self._offset += len(data)

    def add(self, key: str, components: Mapping[str, bytes]) -> None:
        """Append one sample: a member ``<key>.<ext>`` per component, in the mapping's order."""
        if not key or "." in key or "/" in key or any(c.isspace() for c in key):
            raise ValueError(f"shard key {key!r}: must be non-empty, without '.', '/' or spaces")
        if self._samples and key <= self._samples[-1][0]:
            raise ValueError(f"shard key {key!r} does not sort after {self._samples[-1][0]!r}")
        placed = []
        for ext, data in components.items():
            if not ext or any(c.isspace() for c in ext) or "/" in ext:
                raise ValueError(f"component extension {ext!r}: must be non-empty, without spaces or '/'")
            # What tarfile.TarFile.addfile writes (ustar header, data, zero padding to a block),
            # in one write instead of its block-by-block copy.
            placed.append((ext, self._offset + TAR_BLOCK, len(data)))
            self._write(ustar_header(f"{key}.{ext}", len(data)) + data + bytes(-len(data) % TAR_BLOCK))
        self._samples.append((key, placed))

    def close(self) -> ShardEntry:
        """Finish the archive and index, rename both into place, return the manifest entry."""
        try:
            # tarfile's end of archive: two zero blocks, then zeros up to a whole record.
            self._write(bytes(2 * TAR_BLOCK))
            self._write(bytes(-self._offset % tarfile.RECORDSIZE))
            self._file.close()
            sha, size = self._sha256.hexdigest(), self._offset
            index_sha = write_index(self.index_path, self._samples)
            self._stack.close()  # fsync + rename the tar
        except BaseException:
            self.abort()
            raise
        return ShardEntry(self.tar_path.name, self.index_path.name, len(self._samples), size,
                          sha, index_sha)

    def abort(self) -> None:
        """Drop the partial archive (the final names are never touched)."""
        self._file.close()
        # Leaving atomic_path through an exception makes it delete the temporary file.
        self._stack.__exit__(_Aborted, _Aborted(), None)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()


class _Aborted(Exception):
    pass


# ----------------------------------------------------------------------------- manifest


@dataclass
class Manifest:
    """``manifest.json``: what a shard folder contains.

    Attributes:
        num_samples: total samples over all shards.
        classes: class names in label order.
        shards: one :class:`ShardEntry` per archive, in sample order.
        components: member extensions of every sample (``["jpg", "cls"]``).
        key_digits: width of the zero-padded sample keys (the key of sample ``i`` is
            ``f"{i:0{key_digits}d}"``, global over all shards).
        source: where the samples came from (layout, root, labels file, counts).
        options: the converter options that shape the output.
        stats: counts of skipped and re-encoded images, by reason.
    """

    num_samples: int
    classes: list[str]
    shards: list[ShardEntry]
    components: list[str] = field(default_factory=lambda: ["jpg", "cls"])
    key_digits: int = 8
    source: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Deterministic JSON: fixed key order, one line per shard."""
        head = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
                "num_samples": self.num_samples, "num_classes": len(self.classes),
                "components": self.components, "key_digits": self.key_digits,
                "source": self.source, "options": self.options, "stats": self.stats,
                "classes": self.classes}
        text = json.dumps(head, indent=1)[:-2]  # reopen the object to append the shards
        shards = ",\n  ".join(json.dumps(dataclasses.asdict(s), separators=(",", ":"))
                              for s in self.shards)
        return f'{text},\n "shards": [\n  {shards}\n ]\n}}\n'

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_NAME) -> Manifest:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ShardFormatError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
            raise ShardFormatError(f"{where}: not a {MANIFEST_FORMAT} manifest (format is "
                                   f"{d.get('format') if isinstance(d, dict) else type(d).__name__!r})")
        if d.get("version") != MANIFEST_VERSION:
            raise ShardFormatError(f"{where}: manifest version {d.get('version')!r}, this code "
                                   f"reads version {MANIFEST_VERSION}")
        for key in ("num_samples", "classes", "shards", "components", "key_digits"):
            if key not in d:
                raise ShardFormatError(f"{where}: missing key {key!r}")
        try:
            shards = [ShardEntry(**s) for s in d["shards"]]
        except TypeError as e:
            raise ShardFormatError(f"{where}: bad shard entry ({e})") from None
        m = cls(int(d["num_samples"]), list(d["classes"]), shards, list(d["components"]),
                int(d["key_digits"]), d.get("source", {}), d.get("options", {}), d.get("stats", {}))
        counted = sum(s.samples for s in shards)
        if counted != m.num_samples:
            raise ShardFormatError(f"{where}: num_samples is {m.num_samples} but the shards hold {counted}")
        for s in shards:
            if len(s.labels) != s.samples:
                raise ShardFormatError(f"{where}: shard {s.tar} has {s.samples} samples but "
                                       f"{len(s.labels)} labels")
            bad = [y for y in s.labels if not 0 <= y < len(m.classes)]
            if bad:
                raise ShardFormatError(f"{where}: shard {s.tar} has label {bad[0]} outside "
                                       f"0..{len(m.classes) - 1}")
        return m

    def tar_paths(self, root: str | os.PathLike[str]) -> list[str]:
        """Absolute archive paths (``fn.readers.webdataset(paths=...)``)."""
        return [str(Path(root, s.tar).absolute()) for s in self.shards]

    def index_paths(self, root: str | os.PathLike[str]) -> list[str]:
        """Absolute index paths (``fn.readers.webdataset(index_paths=...)``)."""
        return [str(Path(root, s.index).absolute()) for s in self.shards]

    @property
    def labels(self) -> np.ndarray:
        """Every sample's label, int64, in sample order."""
        return np.fromiter((y for s in self.shards for y in s.labels), dtype=np.int64,
                           count=self.num_samples)


def read_manifest(root: str | os.PathLike[str]) -> Manifest:
    """Load ``<root>/manifest.json`` (raises :class:`ShardFormatError` with the reason)."""
    path = Path(root) / MANIFEST_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ShardFormatError(f"{path} not found: {root} is not a shard folder written by "
                               f"data_prep/to_dali.py (or the conversion did not finish)") from None
    return Manifest.from_json(text, str(path))


def write_manifest(root: str | os.PathLike[str], manifest: Manifest) -> None:
    from fastsiam.files import atomic_open

    with atomic_open(Path(root) / MANIFEST_NAME, "w") as f:
        f.write(manifest.to_json())


# ----------------------------------------------------------------------------- reading


def read_member(path: str | os.PathLike[str], offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of a tar (a member's data, as the index gives them)."""
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), size, offset)
    if len(data) != size:
        raise ShardFormatError(f"{path}: short read at offset {offset} ({len(data)} of {size} "
                               f"bytes); the shard is truncated or the index is stale")
    return data


class ShardReader:
    """Random access to a shard folder's samples through the index files (no tar scan).

    Opening reads ``manifest.json`` and every ``.idx`` file; :meth:`read` is then one
    ``pread`` per sample. File handles are opened lazily and per process, so a reader can be
    pickled into DataLoader workers or used after ``fork``.

    Args:
        root: the shard folder.
        ext: the component :meth:`read` returns (``jpg``).
    """

    def __init__(self, root: str | os.PathLike[str], ext: str = "jpg"):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.ext = ext
        if ext not in self.manifest.components:
            raise ShardFormatError(f"{self.root}: samples have components "
                                   f"{self.manifest.components}, not {ext!r}")
        n = self.manifest.num_samples
        self._shard = np.empty(n, dtype=np.int32)
        self._offset = {c: np.empty(n, dtype=np.int64) for c in self.manifest.components}
        self._size = {c: np.empty(n, dtype=np.int64) for c in self.manifest.components}
        start = 0
        for s, entry in enumerate(self.manifest.shards):
            index, index_sha = read_index_and_sha256(self.root / entry.index)
            if len(index) != entry.samples:
                raise ShardFormatError(f"{self.root / entry.index}: {len(index)} samples, the "
                                       f"manifest says {entry.samples}")
            for j, (key, comps) in enumerate(index):
                missing = [c for c in self.manifest.components if c not in comps]
                if missing:
                    raise ShardFormatError(f"{self.root / entry.index}: sample {key!r} has no "
                                           f"{missing[0]!r} component")
                for c in self.manifest.components:
                    self._offset[c][start + j], self._size[c][start + j] = comps[c]
            self._check_files(entry, index_sha)
            self._shard[start:start + entry.samples] = s
            start += entry.samples
        self.labels = self.manifest.labels
        self.classes = self.manifest.classes
        self._paths = self.manifest.tar_paths(self.root)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def _check_files(self, entry: ShardEntry, index_sha: str) -> None:
        """The checks that cost O(files): the tar's size and the index's checksum against the
        manifest. A truncated, replaced or swapped file fails here, at open, and not as a short
        read or a wrong sample mid-epoch; flipped bytes inside a tar need ``fastsiam verify``."""
        if index_sha != entry.index_sha256:
            raise ShardFormatError(f"{self.root / entry.index}: sha256 {index_sha[:16]}... does "
                                   f"not match the manifest's {entry.index_sha256[:16]}... (the "
                                   "index was replaced or edited; re-run data_prep/to_dali.py)")
        tar = self.root / entry.tar
        try:
            size = tar.stat().st_size
        except FileNotFoundError:
            raise ShardFormatError(f"shard {tar} listed in the manifest is missing") from None
        if size != entry.bytes:
            raise ShardFormatError(f"{tar}: {size} bytes, {MANIFEST_NAME} says {entry.bytes} "
                                   "(a truncated or replaced shard; restore it or re-run "
                                   "data_prep/to_dali.py)")

    def __len__(self) -> int:
        return self.manifest.num_samples

    def describe(self, i: int) -> str:
        """Sample ``i`` for a message: its tar, key and index."""
        return f"{self._paths[self.shard_of(i)]} sample {self.key(i)} (index {i})"

    def read(self, i: int) -> tuple[bytes, int]:
        """Sample ``i``'s ``ext`` bytes (the encoded image) and its label."""
        return self.read_component(i, self.ext), int(self.labels[i])

    def read_component(self, i: int, ext: str) -> bytes:
        """The raw bytes of component ``ext`` of sample ``i``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples in {self.root}")
        i %= n
        shard, offset, size = int(self._shard[i]), int(self._offset[ext][i]), int(self._size[ext][i])
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise ShardFormatError(f"{self._paths[shard]}: short read at offset {offset} "
                                   f"({len(data)} of {size} bytes); truncated shard or stale index")
        return data

    def key(self, i: int) -> str:
        return f"{i % len(self):0{self.manifest.key_digits}d}"

    def shard_of(self, i: int) -> int:
        return int(self._shard[i])

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: descriptors are shared with the parent; reopen
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            try:
                fd = self._fds[shard] = os.open(self._paths[shard], os.O_RDONLY)
            except FileNotFoundError:
                raise ShardFormatError(f"shard {self._paths[shard]} listed in the manifest is "
                                       f"missing") from None
        return fd

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_shard_folder(path: str | os.PathLike[str], backend: str) -> ShardReader:
    """The :class:`ShardReader` of a folder written by ``data_prep/to_dali.py``, for a loader
    backend: a wrong path or format is a one-line ``ValueError`` naming ``backend``."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(
            f"{backend} loader: {path} is not a directory; expected a shard folder written by "
            "data_prep/to_dali.py (a .beton file is read by the ffcv backend)"
        )
    try:
        return ShardReader(path)
    except ShardFormatError as e:
        raise ValueError(f"{backend} loader: {e}") from None

