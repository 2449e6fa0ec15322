//! Sealing small secrets for the metadata store: AES-256-GCM with a random nonce, stored
//! as `hex(nonce | ciphertext and tag)`, with associated data that binds the sealed value
//! to what it belongs to.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::Aes256Gcm;

const NONCE: usize = 12;
const TAG: usize = 16;

/// Seals `msg` under `key`, bound to `aad`.
pub fn seal(key: &[u8; 32], msg: &[u8], aad: &[u8]) -> String {
    let cipher = Aes256Gcm::new_from_slice(key).expect("a 32-byte key fits AES-256");
    let nonce: [u8; NONCE] = rand::random();
    let sealed = cipher
        .encrypt(&nonce.into(), Payload { msg, aad })
        .expect("AES-GCM encrypts any message this small");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&sealed);
    hex::encode(out)
}

/// Opens what [`seal`] made; None when the key or the associated data is not the one it
/// was sealed with, or the text was altered.
pub fn open(key: &[u8; 32], sealed: &str, aad: &[u8]) -> Option<Vec<u8>> {
    let raw = hex::decode(sealed).ok()?;
    if raw.len() < NONCE + TAG {
        return None;
    }
    let (nonce, body) = raw.split_at(NONCE);
    let nonce: [u8; NONCE] = nonce.try_into().expect("split at the nonce length");
    let cipher = Aes256Gcm::new_from_slice(key).expect("a 32-byte key fits AES-256");
    cipher
        .decrypt(&nonce.into(), Payload { msg: body, aad })
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_only_with_its_key_and_associated_data() {
        let k = [7u8; 32];
        let s = seal(&k, b"secret", b"ctx");
        assert_ne!(seal(&k, b"secret", b"ctx"), s, "a fresh nonce each time");
        assert_eq!(open(&k, &s, b"ctx").unwrap(), b"secret");
        assert!(open(&[8u8; 32], &s, b"ctx").is_none());
        assert!(open(&k, &s, b"other").is_none());
        let mut t = s.clone().into_bytes();
        let last = t.len() - 1;
        t[last] = if t[last] == b'0' { b'1' } else { b'0' };
        assert!(open(&k, std::str::from_utf8(&t).unwrap(), b"ctx").is_none());
        assert!(open(&k, "abcd", b"ctx").is_none());
    }
}
