"""QR codes in both directions: drawn in the terminal or as PNG files
(qrcode), and read back from image files (zxing-cpp, through Pillow).

Reading happens in the command, not the daemon: the file is the user's,
relative to their working directory.  Every way a file can fail to hold one
QR code is one clear error.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from pigeon.protocol import PigeonError

# Pillow refuses images past twice this many pixels as decompression bombs;
# a phone photo is 12-50 megapixels, a QR code export far less.
MAX_PIXELS = 64_000_000


class QRError(PigeonError):
    """A file that does not hold one readable QR code."""


def write_png(text: str, path: str | Path) -> None:
    import qrcode
    from qrcode.image.pure import PyPNGImage

    image = qrcode.make(text, image_factory=PyPNGImage)
    with open(path, "wb") as file:  # qrcode, given a name, leaves the file open
        image.save(file)


def print_terminal(text: str) -> None:
    import qrcode

    code = qrcode.QRCode(border=2)
    code.add_data(text)
    code.print_ascii(invert=True)


def read(path: str | Path) -> str:
    """The text of the one QR code in the image file at ``path``."""
    import zxingcpp
    from PIL import Image, UnidentifiedImageError

    where = Path(path)
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(where) as image:
                gray = image.convert("L")
    except FileNotFoundError:
        raise QRError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise QRError(f"{where} is a directory, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise QRError(f"{where} is too large an image (over {MAX_PIXELS:,} pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise QRError(f"{where} is not an image file this can read (PNG, JPEG, ...)") from None
    codes = zxingcpp.read_barcodes(
        gray, formats=zxingcpp.BarcodeFormats(zxingcpp.BarcodeFormat.QRCode)
    )
    texts = sorted({code.text for code in codes if code.valid})
    if not texts:
        raise QRError(f"no readable QR code in {where} (a sharper or larger picture may help)")
    if len(texts) > 1:
        raise QRError(f"{where} holds {len(texts)} different QR codes: crop it to one")
    return texts[0]
