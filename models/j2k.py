"""Reduced-resolution decoding of JPEG 2000 pixel data (the wavelet's lower resolution levels).

A JPEG 2000 codestream holds the image as a pyramid of wavelet resolution levels: discarding the
``k`` finest levels yields the image at ``ceil(W / 2**k) x ceil(H / 2**k)`` pixels without entropy-
decoding the discarded sub-bands (about ``4**k`` times less work). OpenJPEG does this; Pillow exposes
it as ``Jpeg2KImageFile.reduce`` (set before ``load()``); pylibjpeg-openjpeg (pydicom's decoder)
cannot.

This module is pure: it never reads settings and never imports the app. ``models.preprocessing``
decides *when* to use it (``decode_dicom(target_size=...)``) and keeps the full decode as the fallback.

- ``codestream_of(frame)``: the raw J2K codestream inside one encapsulated DICOM frame (a frame
  may, non-conformingly, be a JP2 file: its codestream box is found).
- ``parse_header(codestream)``: ``J2KHeader`` from the SIZ, COD and COC marker segments of the main
  header (size, offsets, components, precision, signedness, decomposition levels).
- ``choose_reduction(header, min_side)``: the largest ``k`` whose decoded sides are both ≥ ``min_side``
  and that Pillow sizes correctly (see ``_pillow_side``).
- ``decode_reduced(codestream, header, k)``: stored values (H', W') int32 at level ``k``, with
  Pillow's 16-bit scaling and signed offset undone, so they equal what the full decode's
  ``pixel_array`` holds at that resolution (identical at ``k = 0``, tested).

Every failure raises ``J2KReduceError`` (or whatever OpenJPEG/Pillow raise); callers fall back to the
full decode on any exception.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np

__all__ = ["J2K_TRANSFER_SYNTAXES", "J2KHeader", "J2KReduceError", "codestream_of", "parse_header",
           "choose_reduction", "decode_reduced", "reduced_shape"]

# JPEG 2000 Image Compression (Lossless Only), JPEG 2000 Image Compression (lossy or lossless).
# HTJ2K (1.2.840.10008.1.2.4.201/.202/.203) is left out: OpenJPEG 2.5 in Pillow decodes it, but no
# encoder in this environment writes it, so the reduced path is untested there (full decode stays).
J2K_TRANSFER_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})

SOC_SIZ = b"\xff\x4f\xff\x51"  # start of codestream + SIZ marker
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


class J2KReduceError(ValueError):
    """The codestream does not qualify for (or failed) reduced-resolution decoding."""


@dataclass(frozen=True)
class J2KHeader:
    """Main-header facts of a JPEG 2000 codestream.

    ``width``/``height``: image size in pixels (Xsiz - XOsiz, Ysiz - YOsiz); ``x_offset``/``y_offset``:
    XOsiz/YOsiz (reference-grid origin); ``components``: Csiz; ``precision``: bits of component 0
    (1–38); ``signed``: component 0 is signed; ``levels``: wavelet decomposition levels of component 0
    (COD, overridden by a main-header COC for component 0); ``subsampled``: component 0 has XRsiz or
    YRsiz ≠ 1.
    """

    width: int
    height: int
    x_offset: int
    y_offset: int
    components: int
    precision: int
    signed: bool
    levels: int
    subsampled: bool


def codestream_of(frame: bytes) -> bytes:
    """The J2K codestream of one DICOM frame (itself, or the contents of a JP2 file's codestream)."""
    if frame[:4] == SOC_SIZ:
        return frame
    if frame[:12] == _JP2_SIGNATURE:
        at = frame.find(SOC_SIZ)
        if at > 0:
            return frame[at:]
    raise J2KReduceError("the frame is not a JPEG 2000 codestream (no SOC + SIZ marker)")


def parse_header(codestream: bytes) -> J2KHeader:
    """Parse SIZ, COD and (component 0) COC of the main header; ``J2KReduceError`` when malformed."""
    if codestream[:4] != SOC_SIZ:
        raise J2KReduceError("no SOC + SIZ marker at the start of the codestream")
    try:
        (lsiz,) = struct.unpack_from(">H", codestream, 4)
        if lsiz < 41:
            raise J2KReduceError(f"SIZ segment length {lsiz} is too short")
        _rsiz, xsiz, ysiz, xosiz, yosiz, _xt, _yt, _xto, _yto, csiz = struct.unpack_from(">HIIIIIIIIH", codestream, 6)
        ssiz, xrsiz, yrsiz = struct.unpack_from(">BBB", codestream, 42)  # component 0
        pos = 4 + lsiz
        levels = None
        coc_levels = None
        while pos + 4 <= len(codestream):
            marker, length = struct.unpack_from(">HH", codestream, pos)
            if marker in (0xFF90, 0xFFD9):  # SOT (first tile) or EOC: end of the main header
                break
            if marker == 0xFF52:  # COD: Scod(1) progression(1) layers(2) MCT(1) levels(1) ...
                levels = codestream[pos + 9]
            elif marker == 0xFF53:  # COC: component index is 1 byte when Csiz < 257
                comp = codestream[pos + 4] if csiz < 257 else struct.unpack_from(">H", codestream, pos + 4)[0]
                if comp == 0:
                    coc_levels = codestream[pos + 4 + (1 if csiz < 257 else 2) + 1]
            if length < 2:
                raise J2KReduceError("a marker segment declares a length below 2")
            pos += 2 + length
    except struct.error:
        raise J2KReduceError("the codestream main header is truncated") from None
    if levels is None:
        raise J2KReduceError("no COD marker segment in the main header")
    if coc_levels is not None:
        levels = coc_levels
    return J2KHeader(width=xsiz - xosiz, height=ysiz - yosiz, x_offset=xosiz, y_offset=yosiz, components=csiz,
                     precision=(ssiz & 0x7F) + 1, signed=bool(ssiz & 0x80), levels=int(levels),
                     subsampled=(xrsiz != 1 or yrsiz != 1))


def _ceil_side(offset: int, size: int, k: int) -> int:
    """OpenJPEG's side at reduction ``k``: ceil((offset + size) / 2**k) - ceil(offset / 2**k)."""
    p = 1 << k
    return -(-(offset + size) // p) - (-(-offset // p))


def _pillow_side(size: int, k: int) -> int:
    """The side Pillow (13.0) allocates for reduction ``k``: round-half-up of size / 2**k."""
    p = 1 << k
    return int((size + (p >> 1)) / p)


def reduced_shape(header: J2KHeader, k: int) -> tuple[int, int]:
    """(rows, columns) of the image decoded with ``k`` levels discarded."""
    return _ceil_side(header.y_offset, header.height, k), _ceil_side(header.x_offset, header.width, k)


def choose_reduction(header: J2KHeader, min_side: int) -> int:
    """Largest ``k`` ≤ ``header.levels`` with both decoded sides ≥ ``min_side``; 0 when none.

    Levels where Pillow's size (round half up) differs from OpenJPEG's (ceiling) are skipped: Pillow
    refuses to decode them ("broken data stream"), and the next smaller ``k`` is still ≥ ``min_side``.
    """
    best = 0
    for k in range(1, header.levels + 1):
        rows, cols = reduced_shape(header, k)
        if rows < min_side or cols < min_side:
            break
        if (rows, cols) == (_pillow_side(header.height, k), _pillow_side(header.width, k)):
            best = k
    return best


def decode_reduced(codestream: bytes, header: J2KHeader, k: int) -> np.ndarray:
    """Stored values (H', W') int32 with ``k`` resolution levels discarded (H' = ceil(H / 2**k)).

    Pillow returns 9–16-bit precision as ``I;16`` scaled up to 16 bits (``v << (16 - precision)``)
    and signed samples with ``2**(precision-1)`` added; both are undone here, so the values are in the
    DICOM stored-value range (``PixelRepresentation`` as the codestream says). 8-bit and lower come
    as ``L`` (``v << (8 - precision)``). Raises on anything unexpected (caller falls back).
    """
    from PIL import Image

    if header.components != 1 or header.subsampled:
        raise J2KReduceError("only single-component, non-subsampled codestreams are decoded reduced")
    if not 1 <= header.precision <= 16:
        raise J2KReduceError(f"precision {header.precision} bits is outside 1–16")
    if not 0 <= k <= header.levels:
        raise J2KReduceError(f"reduction {k} is outside 0–{header.levels}")
    im = Image.open(io.BytesIO(codestream), formats=["JPEG2000"])
    try:
        if im.size != (header.width, header.height):
            raise J2KReduceError("Pillow reads a different image size than the SIZ segment")
        expected_mode = "I;16" if header.precision > 8 else "L"
        if im.mode != expected_mode:
            raise J2KReduceError(f"Pillow mode {im.mode}; expected {expected_mode}")
        if k:
            im.reduce = k
        im.load()
        raw = np.asarray(im)
    finally:
        im.close()
    if raw.shape != reduced_shape(header, k):
        raise J2KReduceError(f"decoded shape {raw.shape}; expected {reduced_shape(header, k)}")
    shift = (16 if header.precision > 8 else 8) - header.precision
    arr = raw.astype(np.int32)
    if shift:
        arr >>= shift
    if header.signed:
        arr -= 1 << (header.precision - 1)
    return arr
