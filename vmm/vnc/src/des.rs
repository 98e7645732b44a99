//! DES encryption (FIPS 46-3), only as far as VNC Authentication needs it (RFC 6143 7.2.2):
//! single-block ECB encryption, and the VNC key quirk (each password byte is bit-reversed
//! before use as a DES key byte). Decryption and the other modes are not implemented.
//! Written from the published tables; it is not constant-time (VNC Authentication is weak
//! anyway and only suits trusted networks).

const IP: [u8; 64] = [
    58, 50, 42, 34, 26, 18, 10, 2, 60, 52, 44, 36, 28, 20, 12, 4, 62, 54, 46, 38, 30, 22, 14, 6,
    64, 56, 48, 40, 32, 24, 16, 8, 57, 49, 41, 33, 25, 17, 9, 1, 59, 51, 43, 35, 27, 19, 11, 3, 61,
    53, 45, 37, 29, 21, 13, 5, 63, 55, 47, 39, 31, 23, 15, 7,
];

const FP: [u8; 64] = [
    40, 8, 48, 16, 56, 24, 64, 32, 39, 7, 47, 15, 55, 23, 63, 31, 38, 6, 46, 14, 54, 22, 62, 30,
    37, 5, 45, 13, 53, 21, 61, 29, 36, 4, 44, 12, 52, 20, 60, 28, 35, 3, 43, 11, 51, 19, 59, 27,
    34, 2, 42, 10, 50, 18, 58, 26, 33, 1, 41, 9, 49, 17, 57, 25,
];

const EXPANSION: [u8; 48] = [
    32, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 8, 9, 10, 11, 12, 13, 12, 13, 14, 15, 16, 17, 16, 17, 18,
    19, 20, 21, 20, 21, 22, 23, 24, 25, 24, 25, 26, 27, 28, 29, 28, 29, 30, 31, 32, 1,
];

const P: [u8; 32] = [
    16, 7, 20, 21, 29, 12, 28, 17, 1, 15, 23, 26, 5, 18, 31, 10, 2, 8, 24, 14, 32, 27, 3, 9, 19,
    13, 30, 6, 22, 11, 4, 25,
];

const PC1: [u8; 56] = [
    57, 49, 41, 33, 25, 17, 9, 1, 58, 50, 42, 34, 26, 18, 10, 2, 59, 51, 43, 35, 27, 19, 11, 3, 60,
    52, 44, 36, 63, 55, 47, 39, 31, 23, 15, 7, 62, 54, 46, 38, 30, 22, 14, 6, 61, 53, 45, 37, 29,
    21, 13, 5, 28, 20, 12, 4,
];

const PC2: [u8; 48] = [
    14, 17, 11, 24, 1, 5, 3, 28, 15, 6, 21, 10, 23, 19, 12, 4, 26, 8, 16, 7, 27, 20, 13, 2, 41, 52,
    31, 37, 47, 55, 30, 40, 51, 45, 33, 48, 44, 49, 39, 56, 34, 53, 46, 42, 50, 36, 29, 32,
];

const SHIFTS: [u32; 16] = [1, 1, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1];

const SBOXES: [[u8; 64]; 8] = [
    [
        14, 4, 13, 1, 2, 15, 11, 8, 3, 10, 6, 12, 5, 9, 0, 7, 0, 15, 7, 4, 14, 2, 13, 1, 10, 6, 12,
        11, 9, 5, 3, 8, 4, 1, 14, 8, 13, 6, 2, 11, 15, 12, 9, 7, 3, 10, 5, 0, 15, 12, 8, 2, 4, 9,
        1, 7, 5, 11, 3, 14, 10, 0, 6, 13,
    ],
    [
        15, 1, 8, 14, 6, 11, 3, 4, 9, 7, 2, 13, 12, 0, 5, 10, 3, 13, 4, 7, 15, 2, 8, 14, 12, 0, 1,
        10, 6, 9, 11, 5, 0, 14, 7, 11, 10, 4, 13, 1, 5, 8, 12, 6, 9, 3, 2, 15, 13, 8, 10, 1, 3, 15,
        4, 2, 11, 6, 7, 12, 0, 5, 14, 9,
    ],
    [
        10, 0, 9, 14, 6, 3, 15, 5, 1, 13, 12, 7, 11, 4, 2, 8, 13, 7, 0, 9, 3, 4, 6, 10, 2, 8, 5,
        14, 12, 11, 15, 1, 13, 6, 4, 9, 8, 15, 3, 0, 11, 1, 2, 12, 5, 10, 14, 7, 1, 10, 13, 0, 6,
        9, 8, 7, 4, 15, 14, 3, 11, 5, 2, 12,
    ],
    [
        7, 13, 14, 3, 0, 6, 9, 10, 1, 2, 8, 5, 11, 12, 4, 15, 13, 8, 11, 5, 6, 15, 0, 3, 4, 7, 2,
        12, 1, 10, 14, 9, 10, 6, 9, 0, 12, 11, 7, 13, 15, 1, 3, 14, 5, 2, 8, 4, 3, 15, 0, 6, 10, 1,
        13, 8, 9, 4, 5, 11, 12, 7, 2, 14,
    ],
    [
        2, 12, 4, 1, 7, 10, 11, 6, 8, 5, 3, 15, 13, 0, 14, 9, 14, 11, 2, 12, 4, 7, 13, 1, 5, 0, 15,
        10, 3, 9, 8, 6, 4, 2, 1, 11, 10, 13, 7, 8, 15, 9, 12, 5, 6, 3, 0, 14, 11, 8, 12, 7, 1, 14,
        2, 13, 6, 15, 0, 9, 10, 4, 5, 3,
    ],
    [
        12, 1, 10, 15, 9, 2, 6, 8, 0, 13, 3, 4, 14, 7, 5, 11, 10, 15, 4, 2, 7, 12, 9, 5, 6, 1, 13,
        14, 0, 11, 3, 8, 9, 14, 15, 5, 2, 8, 12, 3, 7, 0, 4, 10, 1, 13, 11, 6, 4, 3, 2, 12, 9, 5,
        15, 10, 11, 14, 1, 7, 6, 0, 8, 13,
    ],
    [
        4, 11, 2, 14, 15, 0, 8, 13, 3, 12, 9, 7, 5, 10, 6, 1, 13, 0, 11, 7, 4, 9, 1, 10, 14, 3, 5,
        12, 2, 15, 8, 6, 1, 4, 11, 13, 12, 3, 7, 14, 10, 15, 6, 8, 0, 5, 9, 2, 6, 11, 13, 8, 1, 4,
        10, 7, 9, 5, 0, 15, 14, 2, 3, 12,
    ],
    [
        13, 2, 8, 4, 6, 15, 11, 1, 10, 9, 3, 14, 5, 0, 12, 7, 1, 15, 13, 8, 10, 3, 7, 4, 12, 5, 6,
        11, 0, 14, 9, 2, 7, 11, 4, 1, 9, 12, 14, 2, 0, 6, 10, 13, 15, 3, 5, 8, 2, 1, 14, 7, 4, 10,
        8, 13, 15, 12, 9, 0, 3, 5, 6, 11,
    ],
];

/// Permutes `input` (its significant bits are the low `in_bits`, bit 1 = most significant)
/// by `table` (1-based positions).
fn permute(input: u64, in_bits: u32, table: &[u8]) -> u64 {
    table.iter().fold(0u64, |out, &position| {
        let bit = (input >> (in_bits - u32::from(position))) & 1;
        (out << 1) | bit
    })
}

fn subkeys(key: [u8; 8]) -> [u64; 16] {
    let permuted = permute(u64::from_be_bytes(key), 64, &PC1);
    let mut c = (permuted >> 28) & 0x0fff_ffff;
    let mut d = permuted & 0x0fff_ffff;
    let mut keys = [0u64; 16];
    for (round, shift) in SHIFTS.iter().enumerate() {
        c = ((c << shift) | (c >> (28 - shift))) & 0x0fff_ffff;
        d = ((d << shift) | (d >> (28 - shift))) & 0x0fff_ffff;
        keys[round] = permute((c << 28) | d, 56, &PC2);
    }
    keys
}

fn feistel(right: u32, subkey: u64) -> u32 {
    let expanded = permute(u64::from(right), 32, &EXPANSION) ^ subkey;
    let mut substituted = 0u32;
    for (index, sbox) in SBOXES.iter().enumerate() {
        let six = ((expanded >> (42 - 6 * index)) & 0x3f) as usize;
        let row = ((six & 0x20) >> 4) | (six & 1);
        let column = (six >> 1) & 0x0f;
        substituted = (substituted << 4) | u32::from(sbox[row * 16 + column]);
    }
    permute(u64::from(substituted), 32, &P) as u32
}

/// Encrypts one 8-byte block with DES.
pub fn encrypt_block(key: [u8; 8], block: [u8; 8]) -> [u8; 8] {
    let keys = subkeys(key);
    let permuted = permute(u64::from_be_bytes(block), 64, &IP);
    let mut left = (permuted >> 32) as u32;
    let mut right = permuted as u32;
    for subkey in keys {
        let next = left ^ feistel(right, subkey);
        left = right;
        right = next;
    }
    let preoutput = (u64::from(right) << 32) | u64::from(left);
    permute(preoutput, 64, &FP).to_be_bytes()
}

/// The DES key VNC derives from a password: the first 8 bytes (zero padded), each with its
/// bits reversed.
pub fn vnc_key(password: &str) -> [u8; 8] {
    let mut key = [0u8; 8];
    for (slot, byte) in key.iter_mut().zip(password.bytes()) {
        *slot = byte.reverse_bits();
    }
    key
}

/// The response a client must send to `challenge` for `password`.
pub fn vnc_response(password: &str, challenge: &[u8; 16]) -> [u8; 16] {
    let key = vnc_key(password);
    let mut out = [0u8; 16];
    for (chunk_out, chunk_in) in out.chunks_exact_mut(8).zip(challenge.chunks_exact(8)) {
        let mut block = [0u8; 8];
        block.copy_from_slice(chunk_in);
        chunk_out.copy_from_slice(&encrypt_block(key, block));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len() / 2)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn fips_known_answer() {
        let key: [u8; 8] = hex("133457799BBCDFF1").try_into().unwrap();
        let block: [u8; 8] = hex("0123456789ABCDEF").try_into().unwrap();
        assert_eq!(encrypt_block(key, block).to_vec(), hex("85E813540F0AB405"));
    }

    #[test]
    fn classic_vector_all_zero_key() {
        // "Now is t" under 0123456789abcdef (from the DES validation set).
        let key: [u8; 8] = hex("0123456789abcdef").try_into().unwrap();
        let block: [u8; 8] = hex("4e6f772069732074").try_into().unwrap();
        assert_eq!(encrypt_block(key, block).to_vec(), hex("3fa40e8a984d4815"));
    }

    #[test]
    fn vnc_key_reverses_bits() {
        assert_eq!(vnc_key("password").to_vec(), hex("0e86ceceeef64e26"));
        assert_eq!(vnc_key("").to_vec(), vec![0u8; 8]);
        // Longer passwords are truncated to 8 bytes.
        assert_eq!(vnc_key("secret12345"), vnc_key("secret12"));
    }

    #[test]
    fn vnc_response_matches_other_implementations() {
        let challenge: [u8; 16] = std::array::from_fn(|i| i as u8);
        assert_eq!(
            vnc_response("password", &challenge).to_vec(),
            hex("b866924125c8eebb9debc1db61c538e2")
        );
        let mut challenge = [0u8; 16];
        challenge[..8].fill(0xff);
        assert_eq!(
            vnc_response("secret12345", &challenge).to_vec(),
            hex("e39ff02bf27983d340377308e205e622")
        );
    }
}
