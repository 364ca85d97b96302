"""Bounded decoding: no decompression inflates beyond what the DICOM header allows.

* Deflated transfer syntax: a ~1 MiB file that inflates to 1 GiB is refused (``decompression-bomb``)
  after inflating at most the header plus Rows x Columns x bytes + slack; Python's traced allocations
  stay small. The header is checked before the pixel data are inflated (a deflated CT is refused as
  ``wrong-modality`` without inflating its gigabyte), and a header that never reaches Pixel Data is
  refused at the header limit.
* Encapsulated frames: an RLE segment that decodes to more than Rows x Columns, and a JPEG / JPEG 2000
  codestream larger than the header's Rows x Columns, are refused before any decoder runs.
* The supine flag comes from the same parse (the API does not read the file a second time).

The same bomb through a real uvicorn server, with the server's peak RSS: tests/test_api_insider.py.
"""
from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib
from functools import lru_cache

import pytest
from dicom_factory import make_dataset, make_dicom

GIB = 1024 ** 3


def _meta_bytes(ts: str) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    ds = make_dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    meta.TransferSyntaxUID = ts
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + fp.getvalue()


def _header_bytes(**kw) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = make_dataset(**kw)
    del ds.file_meta
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


@lru_cache(maxsize=None)
def deflate_bomb(inflated: int = GIB, modality: str = "CR", rows: int = 512, cols: int = 512,
                 tag: bytes = b"\xe0\x7f\x10\x00") -> bytes:
    """A Deflated Explicit VR LE DICOM whose data set inflates to ``inflated`` bytes: a valid chest header
    declaring rows x cols at 16 bits, then an element (Pixel Data by default) of zeros."""
    head = _header_bytes(modality=modality, rows=rows, cols=cols, bits=12)
    n = inflated - len(head) - 12
    element = tag + b"OB\0\0" + struct.pack("<I", n)
    # raw deflate blocks ending in a full flush are byte-aligned and reference nothing before them:
    # one compressed 16 MiB run of zeros is repeated instead of compressing a gigabyte each time
    chunk = 16 * 1024 * 1024
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [z.compress(head + element) + z.flush(zlib.Z_FULL_FLUSH)]
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = z.compress(b"\0" * chunk) + z.flush(zlib.Z_FULL_FLUSH)
    parts += [zeros] * (n // chunk)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts.append(z.compress(b"\0" * (n % chunk)) + z.flush())
    return _meta_bytes("1.2.840.10008.1.2.1.99") + b"".join(parts)


def _refusal(data: bytes):
    from models.preprocessing import ImageRefused, decode_dicom

    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ImageRefused) as exc:
            decode_dicom(data, max_pixels=40_000_000)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return exc.value, peak, time.perf_counter() - t0


def test_the_bomb_is_what_it_claims():
    """The test file is one valid raw-deflate stream of 1 GiB (inflated piece by piece: the header piece,
    one 16 MiB run — the stream repeats it byte for byte — and the final piece)."""
    bomb = deflate_bomb()
    body = bomb[len(_meta_bytes("1.2.840.10008.1.2.1.99")):]
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = z.compress(b"\0" * 16 * 1024 * 1024) + z.flush(zlib.Z_FULL_FLUSH)
    first = body.index(zeros)
    count = 0
    while body.startswith(zeros, first + count * len(zeros)):
        count += 1
    tail = body[first + count * len(zeros):]
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    total = len(d.decompress(body[:first])) + count * len(zlib.decompressobj(-zlib.MAX_WBITS).decompress(zeros))
    total += len(d.decompress(zeros)) - 16 * 1024 * 1024  # the stream state carries over: still valid
    total += len(d.decompress(tail))
    assert d.eof and total == GIB, (total, count)


def test_a_one_mib_deflate_bomb_is_refused_with_bounded_memory():
    bomb = deflate_bomb()
    assert 0.5 * 1024 ** 2 < len(bomb) < 2 * 1024 ** 2, len(bomb)  # ~1 MiB on the wire
    assert len(zlib.decompressobj(-zlib.MAX_WBITS).decompress(bomb[len(_meta_bytes("1.2.840.10008.1.2.1.99")):],
                                                             4096)) == 4096  # it is a real deflate stream
    err, peak, seconds = _refusal(bomb)
    assert err.code == "decompression-bomb", err
    assert "512 x 512" in err.reason
    # header + 512*512*2 bytes + 1 MiB slack are inflated at most (plus the pydicom header parse)
    assert peak < 16 * 1024 ** 2, f"peak traced allocation {peak / 1e6:.1f} MB"
    assert seconds < 10


def test_header_checks_run_before_the_pixel_data_are_inflated():
    err, peak, _ = _refusal(deflate_bomb(modality="CT"))  # 1 GiB behind a CT header
    assert err.code == "wrong-modality", err
    assert peak < 4 * 1024 ** 2  # only the header was inflated
    err, _, _ = _refusal(deflate_bomb(rows=20000, cols=20000))
    assert err.code == "too-many-pixels", err


def test_a_header_that_never_reaches_pixel_data_is_refused_at_the_header_limit():
    # a 256 MiB private OB element before any Pixel Data
    err, peak, _ = _refusal(deflate_bomb(inflated=256 * 1024 ** 2, tag=b"\x09\x00\x10\x10"))
    assert err.code == "decompression-bomb" and "before its Pixel Data" in err.reason, err
    assert peak < 40 * 1024 ** 2


def test_ordinary_deflated_files_still_decode_and_say_supine():
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from models.preprocessing import decode_dicom

    data = make_dicom(rows=96, cols=80, transfer_syntax=DeflatedExplicitVRLittleEndian)
    d = decode_dicom(data)
    assert d.shape == (96, 80) and d.dicom_meta["supine"] is False
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PatientPosition = "SUPINE"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert decode_dicom(buf.getvalue()).dicom_meta["supine"] is True


def _encapsulated(frame: bytes, ts: str, rows: int, cols: int, bits: int = 8) -> bytes:
    from pydicom.encaps import encapsulate

    ds = make_dataset(rows=rows, cols=cols, bits=bits)
    ds.file_meta.TransferSyntaxUID = ts
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_an_rle_segment_larger_than_the_header_allows_is_refused_before_decoding():
    # one segment of 50 000 runs of "repeat 0 x 128": 100 kB that decode to 6.4 MB, for a 64 x 64 image
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    frame = header + b"\x81\x00" * 50_000
    err, peak, _ = _refusal(_encapsulated(frame, "1.2.840.10008.1.2.5", 64, 64))
    assert err.code == "decompression-bomb" and "RLE segment" in err.reason, err
    assert peak < 8 * 1024 ** 2


@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90"])
def test_a_codestream_larger_than_the_header_is_refused_before_decoding(ts):
    import pydicom
    from pydicom.encaps import generate_frames

    real = pydicom.dcmread(io.BytesIO(make_dicom(rows=256, cols=192, bits=8, transfer_syntax=ts)))
    frame = next(generate_frames(real.PixelData, number_of_frames=1))
    err, _, _ = _refusal(_encapsulated(frame, ts, 64, 64))  # header says 64 x 64, codestream 256 x 192
    assert err.code == "decompression-bomb" and "256 x 192" in err.reason, err
    # the same frame under its true dimensions decodes
    from models.preprocessing import decode_dicom

    assert decode_dicom(_encapsulated(frame, ts, 256, 192)).shape == (256, 192)
