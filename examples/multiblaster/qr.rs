//! A small QR code encoder for the terminal welcome: byte mode, error correction level L,
//! versions 1–6 (up to 134 bytes — a join link is about 90), with the mask chosen by the
//! standard's penalty rules 1, 2 and 4. Written here because a QR crate would be a new dependency.

/// (total codewords, EC codewords per block, blocks) for versions 1–6 at level L; every block of
/// a version has the same number of data codewords.
const VERSIONS_L: [(usize, usize, usize); 6] =
    [(26, 7, 1), (44, 10, 1), (70, 15, 1), (100, 20, 1), (134, 26, 1), (172, 18, 2)];

/// A QR code: `size`×`size` modules, `true` = dark.
pub struct QrCode {
    size: usize,
    modules: Vec<bool>,
}

/// Encodes `data` in byte mode at level L; `None` if it is longer than version 6 holds.
pub fn encode(data: &[u8]) -> Option<QrCode> {
    let (version, &(total, ec_len, blocks)) = VERSIONS_L
        .iter()
        .enumerate()
        .map(|(i, v)| (i + 1, v))
        .find(|(_, (total, ec, blocks))| data.len() + 2 <= total - ec * blocks)?;
    let data_len = total - ec_len * blocks;

    // Bit stream: mode 0100, 8-bit count, the bytes, terminator, padding.
    let mut bits: Vec<bool> = Vec::new();
    let push = |value: u32, count: usize, bits: &mut Vec<bool>| {
        for i in (0..count).rev() {
            bits.push((value >> i) & 1 == 1);
        }
    };
    push(0b0100, 4, &mut bits);
    push(data.len() as u32, 8, &mut bits);
    for &b in data {
        push(u32::from(b), 8, &mut bits);
    }
    let capacity = data_len * 8;
    let terminator = (capacity - bits.len()).min(4);
    push(0, terminator, &mut bits);
    while !bits.len().is_multiple_of(8) {
        bits.push(false);
    }
    let mut codewords: Vec<u8> =
        bits.chunks(8).map(|byte| byte.iter().fold(0u8, |acc, &bit| (acc << 1) | u8::from(bit))).collect();
    for pad in [0xEC, 0x11].into_iter().cycle() {
        if codewords.len() >= data_len {
            break;
        }
        codewords.push(pad);
    }

    // Blocks, error correction, interleaving.
    let per_block = data_len / blocks;
    let generator = rs_generator(ec_len);
    let data_blocks: Vec<&[u8]> = codewords.chunks(per_block).collect();
    let ec_blocks: Vec<Vec<u8>> = data_blocks.iter().map(|block| rs_remainder(block, &generator)).collect();
    let mut stream = Vec::with_capacity(total);
    for i in 0..per_block {
        stream.extend(data_blocks.iter().map(|b| b[i]));
    }
    for i in 0..ec_len {
        stream.extend(ec_blocks.iter().map(|b| b[i]));
    }

    let size = version * 4 + 17;
    let mut code = Matrix { size, modules: vec![false; size * size], function: vec![false; size * size] };
    code.draw_function_patterns(version);
    code.draw_codewords(&stream);
    let mut best: Option<(u32, Vec<bool>)> = None;
    for mask in 0..8 {
        let mut candidate = code.clone();
        candidate.apply_mask(mask);
        candidate.draw_format(mask);
        let penalty = candidate.penalty();
        if best.as_ref().is_none_or(|(p, _)| penalty < *p) {
            best = Some((penalty, candidate.modules));
        }
    }
    best.map(|(_, modules)| QrCode { size, modules })
}

impl QrCode {
    /// The code as text for a dark-background terminal: two modules per character (half blocks),
    /// light modules drawn, with a quiet zone of 2 modules.
    pub fn to_terminal(&self) -> String {
        let quiet = 2isize;
        let n = self.size as isize;
        let light = |x: isize, y: isize| {
            x < 0 || y < 0 || x >= n || y >= n || !self.modules[y as usize * self.size + x as usize]
        };
        let mut out = String::new();
        let mut y = -quiet;
        while y < n + quiet {
            for x in -quiet..n + quiet {
                out.push(match (light(x, y), light(x, y + 1)) {
                    (true, true) => '█',
                    (true, false) => '▀',
                    (false, true) => '▄',
                    (false, false) => ' ',
                });
            }
            out.push('\n');
            y += 2;
        }
        out
    }
}

#[derive(Clone)]
struct Matrix {
    size: usize,
    modules: Vec<bool>,
    function: Vec<bool>,
}

impl Matrix {
    fn set_function(&mut self, x: usize, y: usize, dark: bool) {
        self.modules[y * self.size + x] = dark;
        self.function[y * self.size + x] = true;
    }

    fn draw_function_patterns(&mut self, version: usize) {
        let size = self.size;
        for i in 0..size {
            self.set_function(6, i, i % 2 == 0);
            self.set_function(i, 6, i % 2 == 0);
        }
        for (cx, cy) in [(3, 3), (size - 4, 3), (3, size - 4)] {
            for dy in -4isize..=4 {
                for dx in -4isize..=4 {
                    let (x, y) = (cx as isize + dx, cy as isize + dy);
                    if x >= 0 && y >= 0 && (x as usize) < size && (y as usize) < size {
                        let dist = dx.abs().max(dy.abs());
                        self.set_function(x as usize, y as usize, dist != 2 && dist != 4);
                    }
                }
            }
        }
        if version >= 2 {
            // Versions 2–6 have one alignment pattern, at (p, p).
            let p = size - 7;
            for dy in -2isize..=2 {
                for dx in -2isize..=2 {
                    let dist = dx.abs().max(dy.abs());
                    self.set_function((p as isize + dx) as usize, (p as isize + dy) as usize, dist != 1);
                }
            }
        }
        // Reserve the format areas (drawn for real per mask).
        self.draw_format(0);
    }

    fn draw_format(&mut self, mask: u32) {
        let data = (1 << 3) | mask; // level L = 01
        let mut rem = data;
        for _ in 0..10 {
            rem = (rem << 1) ^ ((rem >> 9) * 0x537);
        }
        let bits = ((data << 10) | rem) ^ 0x5412;
        let bit = |i: usize| (bits >> i) & 1 == 1;
        let size = self.size;
        for i in 0..6 {
            self.set_function(8, i, bit(i));
        }
        self.set_function(8, 7, bit(6));
        self.set_function(8, 8, bit(7));
        self.set_function(7, 8, bit(8));
        for i in 9..15 {
            self.set_function(14 - i, 8, bit(i));
        }
        for i in 0..8 {
            self.set_function(size - 1 - i, 8, bit(i));
        }
        for i in 8..15 {
            self.set_function(8, size - 15 + i, bit(i));
        }
        self.set_function(8, size - 8, true);
    }

    fn draw_codewords(&mut self, stream: &[u8]) {
        let size = self.size;
        let mut i = 0;
        let mut right = size as isize - 1;
        while right >= 1 {
            if right == 6 {
                right = 5;
            }
            for vert in 0..size {
                for j in 0..2 {
                    let x = (right - j) as usize;
                    let upward = (right + 1) & 2 == 0;
                    let y = if upward { size - 1 - vert } else { vert };
                    if !self.function[y * size + x] && i < stream.len() * 8 {
                        self.modules[y * size + x] = (stream[i >> 3] >> (7 - (i & 7))) & 1 == 1;
                        i += 1;
                    }
                }
            }
            right -= 2;
        }
    }

    fn apply_mask(&mut self, mask: u32) {
        let size = self.size;
        for y in 0..size {
            for x in 0..size {
                let invert = match mask {
                    0 => (x + y) % 2 == 0,
                    1 => y % 2 == 0,
                    2 => x % 3 == 0,
                    3 => (x + y) % 3 == 0,
                    4 => (x / 3 + y / 2) % 2 == 0,
                    5 => x * y % 2 + x * y % 3 == 0,
                    6 => (x * y % 2 + x * y % 3) % 2 == 0,
                    _ => ((x + y) % 2 + x * y % 3) % 2 == 0,
                };
                if invert && !self.function[y * size + x] {
                    self.modules[y * size + x] ^= true;
                }
            }
        }
    }

    /// Penalty rules 1 (runs of 5+), 2 (2×2 blocks) and 4 (dark/light balance).
    fn penalty(&self) -> u32 {
        let size = self.size;
        let at = |x: usize, y: usize| self.modules[y * size + x];
        let mut penalty = 0;
        for horizontal in [true, false] {
            for a in 0..size {
                let mut run = 1;
                for b in 1..size {
                    let (cur, prev) = if horizontal { (at(b, a), at(b - 1, a)) } else { (at(a, b), at(a, b - 1)) };
                    if cur == prev {
                        run += 1;
                        if run == 5 {
                            penalty += 3;
                        } else if run > 5 {
                            penalty += 1;
                        }
                    } else {
                        run = 1;
                    }
                }
            }
        }
        for y in 0..size - 1 {
            for x in 0..size - 1 {
                let c = at(x, y);
                if c == at(x + 1, y) && c == at(x, y + 1) && c == at(x + 1, y + 1) {
                    penalty += 3;
                }
            }
        }
        let dark = self.modules.iter().filter(|&&m| m).count();
        let total = size * size;
        let k = ((dark * 20).abs_diff(total * 10)).div_ceil(total).saturating_sub(1);
        penalty + k as u32 * 10
    }
}

const fn gf_mul(mut a: u8, mut b: u8) -> u8 {
    let mut product = 0u8;
    while b != 0 {
        if b & 1 != 0 {
            product ^= a;
        }
        let carry = a & 0x80 != 0;
        a <<= 1;
        if carry {
            a ^= 0x1D;
        }
        b >>= 1;
    }
    product
}

/// The Reed–Solomon generator polynomial of `degree` (coefficients after the leading 1).
fn rs_generator(degree: usize) -> Vec<u8> {
    let mut result = vec![0u8; degree];
    result[degree - 1] = 1;
    let mut root = 1u8;
    for _ in 0..degree {
        for j in 0..degree {
            result[j] = gf_mul(result[j], root);
            if j + 1 < degree {
                result[j] ^= result[j + 1];
            }
        }
        root = gf_mul(root, 2);
    }
    result
}

fn rs_remainder(data: &[u8], generator: &[u8]) -> Vec<u8> {
    let mut result = vec![0u8; generator.len()];
    for &b in data {
        let factor = b ^ result[0];
        result.remove(0);
        result.push(0);
        for (r, &g) in result.iter_mut().zip(generator) {
            *r ^= gf_mul(g, factor);
        }
    }
    result
}
