"""The shard format library (fastsiam.data.shards) against tarfile, DALI's wds2idx and readers."""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fastsiam.data.shards import (
    Manifest,
    ShardEntry,
    ShardFormatError,
    ShardReader,
    ShardWriter,
    format_index,
    parse_index,
    read_index,
    read_manifest,
    read_member,
    tar_member_bytes,
    ustar_header,
    write_manifest,
)

# Sizes around the 512-byte tar block boundaries, including an empty member.
SIZES = [0, 1, 511, 512, 513, 1024, 3000]


def _payload(i: int, size: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).tobytes()


def _write_folder(root: Path, per_shard: list[int], classes: int = 3) -> tuple[Manifest, list]:
    """A shard folder of len(per_shard) shards; returns the manifest and (payload, label)s."""
    root.mkdir(parents=True, exist_ok=True)
    samples, entries, k = [], [], 0
    for s, n in enumerate(per_shard):
        labels = []
        with ShardWriter(root / f"shard-{s:06d}.tar", root / f"shard-{s:06d}.idx") as w:
            for _ in range(n):
                data, label = _payload(k, SIZES[k % len(SIZES)] + k), k % classes
                w.add(f"{k:08d}", {"jpg": data, "cls": str(label).encode()})
                samples.append((data, label))
                labels.append(label)
                k += 1
            entry = w.close()
        entries.append(ShardEntry(**{**entry.__dict__, "labels": labels}))
    manifest = Manifest(num_samples=k, classes=[f"c{i}" for i in range(classes)], shards=entries)
    write_manifest(root, manifest)
    return manifest, samples


def test_tar_member_bytes_hand_computed():
    assert [tar_member_bytes(n) for n in (0, 1, 512, 513, 1024)] == [512, 1024, 1024, 1536, 1536]


def test_writer_output_is_a_plain_deterministic_tar(tmp_path):
    for run in ("a", "b"):
        with ShardWriter(tmp_path / run / "s.tar", tmp_path / run / "s.idx") as w:
            for i, size in enumerate(SIZES):
                w.add(f"{i:04d}", {"jpg": _payload(i, size), "cls": str(i).encode()})
            entry = w.close()
    tar_a, tar_b = (tmp_path / r / "s.tar" for r in "ab")
    assert tar_a.read_bytes() == tar_b.read_bytes()
    assert (tmp_path / "a" / "s.idx").read_bytes() == (tmp_path / "b" / "s.idx").read_bytes()
    assert entry.samples == len(SIZES)
    assert entry.bytes == tar_a.stat().st_size
    assert entry.sha256 == hashlib.sha256(tar_a.read_bytes()).hexdigest()
    assert entry.index_sha256 == hashlib.sha256((tmp_path / "a" / "s.idx").read_bytes()).hexdigest()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["s.idx", "s.tar"]  # no temporaries

    with tarfile.open(tar_a) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"{i:04d}.{e}" for i in range(len(SIZES)) for e in ("jpg", "cls")]
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.isreg()) == (0, 0, 0, "", "", 0o644, True)
        for i, size in enumerate(SIZES):
            assert tar.extractfile(f"{i:04d}.jpg").read() == _payload(i, size)
        # The index gives each member's data offset and size, as tarfile finds them.
        index = read_index(tmp_path / "a" / "s.idx")
        assert [(f"{k}.{e}", off, n) for k, comps in index for e, (off, n) in comps.items()] == \
               [(m.name, m.offset_data, m.size) for m in members]


def test_writer_bytes_equal_tarfiles_own_archive(tmp_path):
    import io

    with ShardWriter(tmp_path / "s.tar", tmp_path / "s.idx") as w:
        for i, size in enumerate(SIZES):
            w.add(f"{i:04d}", {"jpg": _payload(i, size), "cls": str(i).encode()})
        w.close()
    with tarfile.open(tmp_path / "ref.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, size in enumerate(SIZES):
            for ext, data in (("jpg", _payload(i, size)), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
                tar.addfile(info, io.BytesIO(data))
    assert (tmp_path / "s.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()


@pytest.mark.parametrize(("name", "size"), [("0.cls", 0), ("00000001.jpg", 123457), ("n" * 100, 8**11 - 1)])
def test_ustar_header_equals_tarfiles(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "", ""
    assert ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    with pytest.raises(ValueError, match="1-100 bytes"):
        ustar_header("n" * 101, size)
    with pytest.raises(ValueError, match="too large"):
        ustar_header(name, 8**11)


def test_index_equals_dalis_wds2idx(tmp_path):
    wds2idx = pytest.importorskip("wds2idx", reason="DALI's wds2idx tool is not installed")
    with ShardWriter(tmp_path / "s.tar", tmp_path / "s.idx") as w:
        for i, size in enumerate(SIZES):
            w.add(f"{i:08d}", {"jpg": _payload(i, size), "cls": str(i % 5).encode()})
        w.close()
    with wds2idx.IndexCreator(str(tmp_path / "s.tar"), str(tmp_path / "dali.idx"), verbose=False) as ic:
        ic.create_index()
    assert (tmp_path / "s.idx").read_text() == (tmp_path / "dali.idx").read_text()


def test_format_and_parse_index_round_trip():
    samples = [("00000000", [("jpg", 512, 10), ("cls", 1536, 1)]), ("00000001", [("jpg", 2560, 0)])]
    text = format_index(samples)
    assert text == ("v1.2 2\njpg 512 10 00000000.jpg cls 1536 1 00000000.cls\n"
                    "jpg 2560 0 00000001.jpg\n")
    assert parse_index(text) == [("00000000", {"jpg": (512, 10), "cls": (1536, 1)}),
                                 ("00000001", {"jpg": (2560, 0)})]


@pytest.mark.parametrize(("text", "message"), [
    ("", "first line must be 'v1.2 <num_samples>'"),
    ("v1.1 1\njpg 512 3 a.jpg\n", "first line must be 'v1.2 <num_samples>'"),
    ("v1.2 2\njpg 512 3 a.jpg\n", "header says 2 samples, found 1"),
    ("v1.2 1\njpg 512 3\n", "expected groups of 'ext offset size name'"),
    ("v1.2 1\njpg x 3 a.jpg\n", "offset and size must be integers"),
    ("v1.2 1\njpg 512 3 a.jpg cls 1024 1 b.cls\n", "different keys"),
    ("v1.2 1\njpg 512 3 a.jpg jpg 1024 1 a.jpg\n", "appears twice"),
])
def test_malformed_index_is_a_one_line_error_naming_the_file(text, message):
    with pytest.raises(ShardFormatError, match=message) as e:
        parse_index(text, "x/s.idx")
    assert str(e.value).startswith("x/s.idx") and "\n" not in str(e.value)


def test_reader_reads_by_offset_without_scanning_the_tar(tmp_path):
    manifest, samples = _write_folder(tmp_path / "d", [5, 4, 3])
    reader = ShardReader(tmp_path / "d")
    assert len(reader) == 12
    assert reader.classes == ["c0", "c1", "c2"]
    np.testing.assert_array_equal(reader.labels, [y for _, y in samples])
    # Zero every tar header block: to tarfile each archive now ends before its first member,
    # while the index still addresses every member.
    for entry in manifest.shards:
        path = tmp_path / "d" / entry.tar
        data = bytearray(path.read_bytes())
        for _, comps in read_index(tmp_path / "d" / entry.index):
            for off, _ in comps.values():
                data[off - 512:off] = bytes(512)
        path.write_bytes(bytes(data))
    with tarfile.open(tmp_path / "d" / manifest.shards[0].tar) as tar:
        assert tar.getmembers() == []
    for i, (data, label) in enumerate(samples):
        assert reader.read(i) == (data, label)
        assert reader.read_component(i, "cls") == str(label).encode()
        assert reader.key(i) == f"{i:08d}"
    assert reader.read(-1) == samples[-1]
    assert [reader.shard_of(i) for i in (0, 4, 5, 8, 9, 11)] == [0, 0, 1, 1, 2, 2]
    # Picklable (DataLoader workers); a copy opens its own file handles.
    copy = pickle.loads(pickle.dumps(reader))
    assert copy.read(7) == samples[7]
    with pytest.raises(IndexError, match="sample 12 out of range for 12 samples"):
        reader.read(12)
    reader.close()
    entry = manifest.shards[1]
    off, size = read_index(tmp_path / "d" / entry.index)[0][1]["jpg"]
    assert read_member(tmp_path / "d" / entry.tar, off, size) == samples[5][0]


def test_reader_detects_a_truncated_shard_and_a_stale_manifest(tmp_path):
    from fastsiam.verify import verify

    manifest, _ = _write_folder(tmp_path / "d", [4])
    reader = ShardReader(tmp_path / "d")
    assert verify(tmp_path / "d").problems == []
    tar = tmp_path / "d" / manifest.shards[0].tar
    tar.write_bytes(tar.read_bytes()[:1500])
    with pytest.raises(ShardFormatError, match="short read"):
        reader.read(3)
    assert [p.split(": ")[0] for p in verify(tmp_path / "d").problems] == [str(tar)]
    tar.unlink()
    with pytest.raises(ShardFormatError, match="is missing"):
        ShardReader(tmp_path / "d").read(0)
    # An index that disagrees with the manifest's sample count.
    (tmp_path / "d" / manifest.shards[0].index).write_text("v1.2 1\njpg 512 3 00000000.jpg cls 1536 1 00000000.cls\n")
    with pytest.raises(ShardFormatError, match="1 samples, the manifest says 4"):
        ShardReader(tmp_path / "d")


def test_manifest_round_trip_and_validation(tmp_path):
    manifest, _ = _write_folder(tmp_path / "d", [3, 2])
    text = (tmp_path / "d" / "manifest.json").read_text()
    assert read_manifest(tmp_path / "d") == manifest
    assert Manifest.from_json(manifest.to_json()).to_json() == text  # stable text
    assert manifest.tar_paths(tmp_path / "d") == [str((tmp_path / "d" / f"shard-{i:06d}.tar").absolute()) for i in range(2)]
    assert manifest.index_paths(tmp_path / "d")[1].endswith("shard-000001.idx")
    np.testing.assert_array_equal(manifest.labels, [0, 1, 2, 0, 1])

    def broken(**change):
        import json

        d = json.loads(text)
        d.update(change)
        return json.dumps(d)

    for doc, message in [
        ("nope", "not valid JSON"),
        (broken(format="other"), "not a fastsiam-webdataset manifest"),
        (broken(version=99), "manifest version 99"),
        (broken(num_samples=6), "num_samples is 6 but the shards hold 5"),
        (broken(classes=["a", "b"]), "label 2 outside 0..1"),
    ]:
        with pytest.raises(ShardFormatError, match=message):
            Manifest.from_json(doc)
    with pytest.raises(ShardFormatError, match=r"manifest\.json not found"):
        read_manifest(tmp_path)


def test_writer_abort_and_bad_keys_leave_nothing(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "s.tar", tmp_path / "s.idx") as w:
        w.add("0001", {"jpg": b"x"})
        raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []
    w = ShardWriter(tmp_path / "s.tar", tmp_path / "s.idx")
    with pytest.raises(ValueError, match=r"without '\.'"):
        w.add("a.b", {"jpg": b"x"})
    w.add("0002", {"jpg": b"x"})
    with pytest.raises(ValueError, match="does not sort after"):
        w.add("0001", {"jpg": b"x"})
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_webdataset_and_dali_read_the_shards(tmp_path):
    manifest, samples = _write_folder(tmp_path / "d", [5, 4])
    wds = pytest.importorskip("webdataset")
    got = [(s["__key__"], s["jpg"], int(s["cls"]))
           for s in wds.WebDataset(manifest.tar_paths(tmp_path / "d"), shardshuffle=False)]
    assert got == [(f"{i:08d}", d, y) for i, (d, y) in enumerate(samples)]

    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn

    @dali.pipeline_def(batch_size=len(samples), num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=manifest.tar_paths(tmp_path / "d"),
                                         index_paths=manifest.index_paths(tmp_path / "d"),
                                         ext=["jpg", "cls"], missing_component_behavior="error")
        return jpg, cls

    p = pipe()
    p.build()
    jpgs, clss = p.run()
    assert [(bytes(np.asarray(jpgs.at(i))), int(bytes(np.asarray(clss.at(i))))) for i in range(len(samples))] == samples


def test_reader_after_fork_reads_with_its_own_handles(tmp_path):
    _, samples = _write_folder(tmp_path / "d", [3])
    reader = ShardReader(tmp_path / "d")
    assert reader.read(0) == samples[0]  # opens a handle in the parent
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must reopen, read, and not close the parent's descriptor
        ok = reader.read(2) == samples[2]
        reader.close()
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"
    assert reader.read(1) == samples[1]  # the parent's handle still works
