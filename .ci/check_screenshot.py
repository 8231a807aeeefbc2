#!/usr/bin/env python3
"""Checks Multiblaster screenshots. Standard library only (PNG decoded by hand).

    check_screenshot.py GAME.png          the game: a black sky, white line art (asteroids, ships,
                                          text) and the player's own ship in gold
    check_screenshot.py --qr GAME.png     the same, and the join link's QR code at the bottom right
                                          (a hosted game shows it)
    check_screenshot.py --lobby LOBBY.png the lobby: dark, a title and a column of text rows, the
                                          chosen row in gold on a blue-grey fill
"""
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


def is_dark(r, g, b):
    return r < 30 and g < 30 and b < 30


def is_white(r, g, b):
    return r > 200 and g > 200 and b > 200


def is_gold(r, g, b):
    return r > 200 and 140 < g < 230 and b < 90


def pixels(rows, channels):
    for y, row in enumerate(rows):
        for i in range(0, len(row), channels):
            yield i // channels, y, row[i], row[i + 1], row[i + 2]


def qr_at_bottom_right(width, height, channels, rows):
    """White pixels and white/dark edges along the rows of the bottom-right corner, where the QR
    code sits (about 150 px wide, above the link text): a QR code has thousands of edges, line
    art and text a few hundred."""
    box_x, box_y = max(0, width - 240), max(0, height - 260)
    white = edges = 0
    for row in rows[box_y:]:
        last = None
        for x in range(box_x, width):
            i = x * channels
            r, g, b = row[i], row[i + 1], row[i + 2]
            kind = "white" if is_white(r, g, b) else "dark" if is_dark(r, g, b) else None
            if kind == "white":
                white += 1
            if kind is not None:
                if last is not None and kind != last:
                    edges += 1
                last = kind
    return white, edges


def check_game(path, width, height, channels, rows, qr):
    total = width * height
    dark = white = gold = 0
    for _, _, r, g, b in pixels(rows, channels):
        if is_dark(r, g, b):
            dark += 1
        if is_white(r, g, b):
            white += 1
        if is_gold(r, g, b):
            gold += 1
    qr_white, qr_edges = qr_at_bottom_right(width, height, channels, rows)
    print(f"{path}: {width}x{height}, dark {dark / total:.1%}, white {white} px, gold {gold} px, "
          f"bottom right: white {qr_white} px, {qr_edges} edges")
    problems = []
    if dark / total < 0.6:
        problems.append("the background is not the black sky")
    if white < 200:
        problems.append("too little white line art (asteroids, ships, text)")
    if gold < 10:
        problems.append("the player's own ship (gold) is not drawn")
    if qr and (qr_white < 6000 or qr_edges < 1000):
        problems.append("no QR code at the bottom right")
    return problems


def check_lobby(path, width, height, channels, rows):
    total = width * height
    dark = bright = gold = focus = 0
    text_rows = [0] * height
    for x, y, r, g, b in pixels(rows, channels):
        if is_dark(r, g, b):
            dark += 1
        # The chosen row's fill, srgb(0.13, 0.15, 0.24) in lobby.rs.
        if 25 <= r <= 42 and 30 <= g <= 47 and 52 <= b <= 70:
            focus += 1
        if r > 150 and g > 150 and b > 150:
            bright += 1
            text_rows[y] += 1
        if is_gold(r, g, b):
            gold += 1
            text_rows[y] += 1
    # Lines of text: runs of pixel rows with bright or gold pixels, separated by empty rows.
    lines, inside = 0, False
    for count in text_rows:
        if count >= 2 and not inside:
            lines += 1
        inside = count >= 2
    print(f"{path}: {width}x{height}, dark {dark / total:.1%}, bright {bright} px, gold {gold} px, "
          f"chosen row fill {focus} px, {lines} lines of text")
    problems = []
    if dark / total < 0.5:
        problems.append("the background is not dark")
    if bright < 3000:
        problems.append("too little light text (title, rows)")
    if gold < 300 or focus < 8000:
        problems.append("no chosen row (gold label and border, blue-grey fill)")
    if lines < 10:
        problems.append(f"only {lines} lines of text, the lobby has a title and 8 rows and more")
    return problems


def main(args):
    mode = "game"
    if args and args[0] in ("--lobby", "--qr"):
        mode = args.pop(0)[2:]
    if len(args) != 1:
        sys.exit("usage: check_screenshot.py [--lobby | --qr] PNG")
    path = args[0]
    width, height, channels, rows = read_png(path)
    if mode == "lobby":
        problems = check_lobby(path, width, height, channels, rows)
    else:
        problems = check_game(path, width, height, channels, rows, qr=mode == "qr")
    if problems:
        sys.exit(f"{path}: " + "; ".join(problems))


if __name__ == "__main__":
    main(sys.argv[1:])
