#!/usr/bin/env python3
"""Checks that a Multiblaster screenshot shows the game: a black sky, white line art (asteroids,
ships, text) and the player's own ship in gold. Standard library only (PNG decoded by hand)."""
import struct
import sys
import zlib


def read_png(path):
    data = open(path, "rb").read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        sys.exit(f"{path}: not a PNG")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    if depth != 8 or color not in (2, 6) or interlace:
        sys.exit(f"{path}: unsupported PNG (depth {depth}, colour type {color}, interlace {interlace})")
    channels = 3 if color == 2 else 4
    raw, stride = zlib.decompress(idat), width * channels
    rows, prev, at = [], bytearray(stride), 0
    for _ in range(height):
        kind, line = raw[at], bytearray(raw[at + 1:at + 1 + stride])
        at += 1 + stride
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, up_left = prev[i], prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)) & 255
        rows.append(line)
        prev = line
    return width, height, channels, rows


def main(path):
    width, height, channels, rows = read_png(path)
    total = width * height
    dark = white = gold = 0
    for row in rows:
        for i in range(0, len(row), channels):
            r, g, b = row[i], row[i + 1], row[i + 2]
            if r < 30 and g < 30 and b < 30:
                dark += 1
            if r > 200 and g > 200 and b > 200:
                white += 1
            if r > 200 and 140 < g < 230 and b < 90:
                gold += 1
    print(f"{path}: {width}x{height}, dark {dark / total:.1%}, white {white} px, gold {gold} px")
    problems = []
    if dark / total < 0.6:
        problems.append("the background is not the black sky")
    if white < 200:
        problems.append("too little white line art (asteroids, ships, text)")
    if gold < 10:
        problems.append("the player's own ship (gold) is not drawn")
    if problems:
        sys.exit(f"{path}: " + "; ".join(problems))


if __name__ == "__main__":
    main(sys.argv[1])
