"""runtime.contract.load_image on generated files: cut-short files refused, 16-bit scaled, EXIF
orientation applied, grayscale and alpha as for arrays."""
from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest

from runtime import ImageError
from runtime.contract import load_image
from conftest import png_declaring
from scenes import held_out_scene


def encode(ext: str, image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def exif_app1(orientation: int, thumbnail: bytes = b"") -> bytes:
    """A JPEG APP1 segment: a big-endian TIFF IFD with the Orientation tag, then optional bytes
    (a thumbnail, which carries its own end-of-image marker)."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd + thumbnail
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


@pytest.fixture(scope="module")
def scene():
    return held_out_scene(0)[0]


def test_truncated_jpeg_is_refused(scene, tmp_path):
    data = encode(".jpg", scene)
    f = tmp_path / "x.jpg"
    f.write_bytes(data)
    assert load_image(f).shape == scene.shape
    for cut in (len(data) // 3, len(data) // 2, len(data) - 2, 100):
        f.write_bytes(data[:cut])
        with pytest.raises(ImageError, match="cannot decode image file .truncated JPEG.*x.jpg"):
            load_image(f)
    # Padding after the end marker, as some writers add, is fine.
    f.write_bytes(data + b"\x00" * 64)
    assert np.array_equal(load_image(f), cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))


def test_truncated_jpeg_with_a_thumbnail_is_refused(scene, tmp_path):
    """The EXIF thumbnail's own end marker does not make a cut-short file look complete."""
    data = encode(".jpg", scene)
    thumb = encode(".jpg", cv2.resize(scene, (16, 16), interpolation=cv2.INTER_AREA))
    full = data[:2] + exif_app1(1, thumb) + data[2:]
    f = tmp_path / "t.jpg"
    f.write_bytes(full)
    assert load_image(f).shape == scene.shape
    f.write_bytes(full[:len(full) * 2 // 3])
    with pytest.raises(ImageError, match="truncated JPEG: no end-of-image marker"):
        load_image(f)


def test_truncated_png_is_refused(scene, tmp_path):
    data = encode(".png", scene)
    f = tmp_path / "x.png"
    for cut, why in ((len(data) // 2, "IDAT chunk is cut short"), (len(data) - 12, "no IEND chunk"),
                     (len(data) - 1, "IEND chunk is cut short")):
        f.write_bytes(data[:cut])
        with pytest.raises(ImageError, match=f"truncated PNG: {why}"):
            load_image(f)
    f.write_bytes(b"")
    with pytest.raises(ImageError, match="empty image file"):
        load_image(f)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16_bit_files_are_scaled_to_8_bits(ext, tmp_path):
    values = np.array([0, 128, 129, 257, 385, 386, 32896, 65406, 65407, 65535], np.uint16)
    expected = np.array([0, 0, 1, 1, 1, 2, 128, 254, 255, 255], np.uint8)  # round(v / 257)
    colour = np.stack([values, values[::-1], values], axis=1)[None]  # 1 x 10 x 3, BGR
    (tmp_path / f"c{ext}").write_bytes(encode(ext, colour))
    got = load_image(tmp_path / f"c{ext}")
    assert got.dtype == np.uint8
    assert np.array_equal(got[0], np.stack([expected, expected[::-1], expected], axis=1))
    (tmp_path / f"g{ext}").write_bytes(encode(ext, values[None]))
    got = load_image(tmp_path / f"g{ext}")
    assert got.shape == (1, 10, 3) and np.array_equal(got[0], np.repeat(expected[:, None], 3, axis=1))


def test_float_files_are_refused(tmp_path):
    (tmp_path / "f.tif").write_bytes(encode(".tif", np.full((4, 5, 3), 0.5, np.float32)))
    with pytest.raises(ImageError, match="float32 samples; only 8- and 16-bit"):
        load_image(tmp_path / "f.tif")


def test_exif_orientation_is_applied(tmp_path):
    image = np.zeros((40, 60, 3), np.uint8)
    image[:10, :10] = 255  # a white top-left corner
    data = encode(".jpg", image)
    f = tmp_path / "o.jpg"
    f.write_bytes(data[:2] + exif_app1(6) + data[2:])  # 6: display rotated 90 degrees clockwise
    got = load_image(f)
    stored = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert got.shape == (60, 40, 3)
    assert np.array_equal(got, cv2.rotate(stored, cv2.ROTATE_90_CLOCKWISE))
    assert got[:10, -10:].mean() > 250  # the white corner is now top-right


def test_grayscale_and_alpha_files(scene, tmp_path):
    gray = cv2.cvtColor(scene, cv2.COLOR_BGR2GRAY)
    (tmp_path / "g.png").write_bytes(encode(".png", gray))
    assert np.array_equal(load_image(tmp_path / "g.png"), np.repeat(gray[:, :, None], 3, axis=2))
    bgra = np.dstack([scene, np.arange(scene.shape[1], dtype=np.uint8)[None].repeat(scene.shape[0], 0)])
    (tmp_path / "a.png").write_bytes(encode(".png", bgra))
    assert np.array_equal(load_image(tmp_path / "a.png"), scene)  # alpha dropped, colours untouched


# -- decompression bombs: the declared size is checked before any decoder runs ------------------

@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".webp", ".tif", ".ppm", ".pgm"])
@pytest.mark.parametrize("h,w", [(1, 1), (37, 53), (300, 7)])
def test_declared_size_is_what_the_decoder_makes(ext, h, w):
    from runtime.image_headers import declared_size

    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    data = encode(ext, img[:, :, 0] if ext == ".pgm" else img)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert declared_size(data) == decoded.shape[:2] == (h, w)


def test_lossless_webp_and_alpha_png_sizes():
    from runtime.image_headers import declared_size

    img = np.zeros((23, 41, 4), np.uint8)
    assert declared_size(encode(".png", img)) == (23, 41)
    ok, buf = cv2.imencode(".webp", img[:, :, :3], [cv2.IMWRITE_WEBP_QUALITY, 101])
    assert declared_size(buf.tobytes()) == (23, 41)


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    from runtime.errors import ImageTooLarge

    f = tmp_path / "bomb.png"
    f.write_bytes(png_declaring(70000, 70000, idat=b"garbage"))  # 4.9 G pixels in a few bytes; its data is not even valid
    with pytest.raises(ImageTooLarge) as e:
        load_image(f)
    assert str(f) in str(e.value) and e.value.pixels == 70000 * 70000 and e.value.limit == 100_000_000


def test_the_pixel_limit_is_configurable_and_checked_before_decoding(tmp_path):
    from runtime.errors import ImageTooLarge

    f = tmp_path / "ok.png"
    f.write_bytes(png_declaring(200, 100))
    with pytest.raises(ImageTooLarge, match="ok.png") as e:
        load_image(f, max_pixels=19_999)  # refused before its (invalid) data is decoded
    assert e.value.limit == 19_999
    with pytest.raises(ImageError, match="ok.png"):
        load_image(f, max_pixels=20_000)  # now decoded: its data is garbage


def test_decoder_errors_become_image_errors_naming_the_file(tmp_path):
    # Above OpenCV's own pixel limit (2^30) the decoder raises cv2.error: it must come out as ImageError.
    f = tmp_path / "big.png"
    f.write_bytes(png_declaring(40000, 40000))
    with pytest.raises(ImageError, match="big.png") as e:
        load_image(f, max_pixels=2 * 10**9)
    assert not isinstance(e.value, cv2.error)


def test_a_file_too_large_for_any_allowed_image_is_not_read(tmp_path):
    from runtime.errors import ImageTooLarge

    f = tmp_path / "huge.png"
    with open(f, "wb") as fh:  # sparse: 64 MB that take no disk
        fh.truncate(64 << 20)
    with pytest.raises(ImageTooLarge, match="huge.png"):
        load_image(f, max_pixels=1000)


def test_sixteen_bit_scaling_is_exact_for_every_value(tmp_path):
    x = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    cv2.imwrite(str(tmp_path / "s.png"), np.stack([x] * 3, axis=2))
    got = load_image(tmp_path / "s.png")[:, :, 0]
    assert np.array_equal(got, ((x.astype(np.uint32) + 128) // 257).astype(np.uint8))
