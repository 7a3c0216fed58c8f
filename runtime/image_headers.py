"""What an image file's header says, read before any decoder runs (bytes only, no OpenCV).

``declared_size``: the height and width a file declares, so that a decompression bomb (a small file
declaring an enormous image) is refused before a decoder allocates for it. ``incomplete_file_reason``:
why a JPEG or PNG file is cut short (decoders fill the missing rows with grey and only warn).
"""
from __future__ import annotations

import struct
from typing import Optional, Tuple

Size = Optional[Tuple[int, int]]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8 and CC are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def declared_size(data: bytes) -> Size:
    """(height, width) that the header of a PNG, JPEG, BMP, WebP, GIF, TIFF or PNM file declares;
    None for other formats or a header too damaged to read (the decoder then decides)."""
    try:
        if data[:8] == PNG_SIGNATURE:
            if data[12:16] == b"IHDR":
                w, h = struct.unpack(">II", data[16:24])
                return h, w
            return None
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
        if data[:2] == b"BM":
            (dib,) = struct.unpack("<I", data[14:18])
            if dib == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sides
                w, h = struct.unpack("<HH", data[18:22])
            else:  # a negative height means rows stored top-down
                w, h = struct.unpack("<ii", data[18:26])
            return abs(h), abs(w)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_size(data)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack("<HH", data[6:10])
            return h, w
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(data)
        if data[:1] == b"P" and len(data) > 1 and data[1] in b"123456":
            return _pnm_size(data)
    except struct.error:  # a header cut short
        return None
    return None


def _jpeg_size(data: bytes) -> Size:
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in _JPEG_SOF:
            h, w = struct.unpack(">HH", data[pos + 5:pos + 9])
            return h, w
        if marker == 0xDA:  # scan data before any frame header: not a JPEG we can size
            return None
        pos += 2 + length
    return None


def _webp_size(data: bytes) -> Size:
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended: 24-bit canvas width-1, height-1
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return h, w
    if chunk == b"VP8 ":  # lossy: 14-bit sides after the frame tag and start code
        w, h = struct.unpack("<HH", data[26:30])
        return h & 0x3FFF, w & 0x3FFF
    if chunk == b"VP8L":  # lossless: 14-bit width-1 and height-1 after the signature byte
        (bits,) = struct.unpack("<I", data[21:25])
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    return None


def _tiff_size(data: bytes) -> Size:
    end = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(end + "I", data[4:8])
    (count,) = struct.unpack(end + "H", data[ifd:ifd + 2])
    found = {}
    for k in range(count):
        e = ifd + 2 + 12 * k
        tag, typ = struct.unpack(end + "HH", data[e:e + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT or LONG
            found[tag] = struct.unpack(end + ("H" if typ == 3 else "I"), data[e + 8:e + (10 if typ == 3 else 12)])[0]
    if 256 in found and 257 in found:
        return found[257], found[256]
    return None


def _pnm_size(data: bytes) -> Size:
    # "P6 <width> <height> ...": fields separated by whitespace, "#" comments to the end of a line.
    fields: list = []
    pos, n = 2, min(len(data), 4096)
    while len(fields) < 2 and pos < n:
        c = data[pos:pos + 1]
        if c == b"#":
            nl = data.find(b"\n", pos)
            pos = n if nl < 0 else nl + 1
        elif c.isspace():
            pos += 1
        else:
            start = pos
            while pos < n and not data[pos:pos + 1].isspace() and data[pos:pos + 1] != b"#":
                pos += 1
            if not data[start:pos].isdigit():
                return None
            fields.append(int(data[start:pos]))
    return (fields[1], fields[0]) if len(fields) == 2 else None


def incomplete_file_reason(data: bytes) -> str | None:
    """Why a JPEG or PNG file is cut short (None when complete or another format)."""
    if data[:2] == b"\xff\xd8":
        return _jpeg_problem(data)
    if data[:8] == PNG_SIGNATURE:
        return _png_problem(data)
    return None


def _jpeg_problem(data: bytes) -> str | None:
    # Walk the marker segments (their lengths skip EXIF thumbnails, which hold their own end
    # marker) to the first start-of-scan. Entropy-coded data never contains FF D9 (an FF there is
    # followed by 00 or a restart marker), so the end-of-image marker must follow; bytes after it
    # (padding, camera trailers) are allowed.
    pos, n = 2, len(data)
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return f"corrupt JPEG: no marker at byte {pos}"
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xD9:
            return None
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
        elif pos + 4 > n:
            break
        else:
            length = int.from_bytes(data[pos + 2:pos + 4], "big")
            if marker == 0xDA:
                return None if data.find(b"\xff\xd9", pos + 2 + length) >= 0 else \
                    "truncated JPEG: no end-of-image marker"
            pos += 2 + length
    return "truncated JPEG: it ends inside its headers"


def _png_problem(data: bytes) -> str | None:
    # Chunks are length, type, data, CRC; a complete file ends with the IEND chunk.
    pos, n = 8, len(data)
    while pos + 8 <= n:
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 12 + length
        if end > n:
            return f"truncated PNG: {data[pos + 4:pos + 8].decode('ascii', 'replace')} chunk is cut short"
        if data[pos + 4:pos + 8] == b"IEND":
            return None
        pos = end
    return "truncated PNG: no IEND chunk"
