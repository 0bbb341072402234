"""A loss-curve PNG with no plotting library: a white canvas, axes with ticks, the training loss as a blue
line and eval losses as red dots, encoded with zlib + struct. Numbers for the axes are drawn with a 3x5
pixel font, so the picture reads on its own."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

_FONT = {  # 3x5 glyphs, rows top to bottom, 3 bits each
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0), "e": (0, 7, 7, 4, 7), " ": (0, 0, 0, 0, 0),
}
BLUE, RED, BLACK, GREY = (31, 119, 180), (214, 39, 40), (0, 0, 0), (225, 225, 225)


class Canvas:
    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, color) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            self.px[i:i + 3] = bytes(color)

    def line(self, x0: float, y0: float, x1: float, y1: float, color, width: int = 1) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for k in range(n + 1):
            t = k / n
            x, y = round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t)
            for dx in range(width):
                for dy in range(width):
                    self.dot(x + dx - width // 2, y + dy - width // 2, color)

    def text(self, x: int, y: int, s: str, color=BLACK, scale: int = 2) -> None:
        for c in s:
            for row, bits in enumerate(_FONT.get(c, _FONT[" "])):
                for col in range(3):
                    if bits >> (2 - col) & 1:
                        for dx in range(scale):
                            for dy in range(scale):
                                self.dot(x + col * scale + dx, y + row * scale + dy, color)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB
        body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        return b"\x89PNG\r\n\x1a\n" + body


def _label(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.1e}".replace("+", "")


def loss_curve(path, train: list[tuple[float, float]], evals: list[tuple[float, float]] = (),
               width: int = 640, height: int = 400) -> Path:
    """Write a PNG of (step, loss) points: train as a line, eval as dots."""
    c = Canvas(width, height)
    left, right, top, bottom = 70, width - 20, 20, height - 40
    points = list(train) + list(evals)
    if points:
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        x_lo, x_hi = min(xs), max(max(xs), min(xs) + 1)
        y_lo, y_hi = min(ys), max(ys)
        if y_hi - y_lo < 1e-9:
            y_lo, y_hi = y_lo - 0.5, y_hi + 0.5

        def sx(v):
            return left + (v - x_lo) / (x_hi - x_lo) * (right - left)

        def sy(v):
            return bottom - (v - y_lo) / (y_hi - y_lo) * (bottom - top)

        for k in range(5):  # grid and tick labels
            yv = y_lo + (y_hi - y_lo) * k / 4
            c.line(left, sy(yv), right, sy(yv), GREY)
            c.text(4, int(sy(yv)) - 5, _label(yv))
            xv = x_lo + (x_hi - x_lo) * k / 4
            c.text(int(sx(xv)) - 8, bottom + 10, _label(round(xv)))
        for (x0, y0), (x1, y1) in zip(train, list(train)[1:]):
            c.line(sx(x0), sy(y0), sx(x1), sy(y1), BLUE, 2)
        if len(train) == 1:
            c.line(sx(train[0][0]), sy(train[0][1]), sx(train[0][0]), sy(train[0][1]), BLUE, 3)
        for x, y in evals:
            c.line(sx(x), sy(y), sx(x), sy(y), RED, 6)
    c.line(left, top, left, bottom, BLACK)
    c.line(left, bottom, right, bottom, BLACK)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(c.png())
    tmp.replace(path)
    return path
