//! Nightscout access tokens: how a subject's token is derived from API_SECRET and its
//! `_id`, and which subject a presented token names.

use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

/// Length of the digest part of a token, and the least a presented token must carry.
pub const TOKEN_DIGEST_LEN: usize = 16;

pub fn sha1_hex(text: &str) -> String {
    hex::encode(Sha1::digest(text.as_bytes()))
}

/// `hex(sha1(API_SECRET))`, the key every subject digest is derived from.
pub fn api_secret_hash(api_secret: &str) -> String {
    sha1_hex(api_secret)
}

/// `hex(sha1(hex(sha1(API_SECRET)) + _id))`.
pub fn subject_digest(api_secret_hash: &str, subject_id: &str) -> String {
    sha1_hex(&format!("{api_secret_hash}{subject_id}"))
}

/// The name in lower case, without characters outside `[A-Za-z0-9_]`, cut to 10.
pub fn abbreviation(name: &str) -> String {
    name.to_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(10)
        .collect()
}

pub fn access_token(name: &str, digest: &str) -> String {
    format!("{}-{}", abbreviation(name), &digest[..TOKEN_DIGEST_LEN])
}

/// The credentials of one subject a presented token is compared with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenKeys {
    pub digest: String,
    /// `hex(sha1(token))`: presenting a prefix of it also authenticates.
    pub token_digest: String,
}

impl TokenKeys {
    pub fn new(api_secret_hash: &str, subject_id: &str, name: &str) -> Self {
        let digest = subject_digest(api_secret_hash, subject_id);
        let token_digest = sha1_hex(&access_token(name, &digest));
        TokenKeys { digest, token_digest }
    }

    /// Nightscout's rule: the part after the last `-` (at least 16 characters) is a prefix
    /// of the digest, or the whole presented string is a prefix of the token's digest.
    pub fn matches(&self, presented: &Presented<'_>) -> bool {
        is_prefix(presented.whole, &self.token_digest) | is_prefix(presented.tail, &self.digest)
    }
}

/// A token as presented, checked for the minimum length once for all subjects.
pub struct Presented<'a> {
    whole: &'a str,
    tail: &'a str,
}

impl<'a> Presented<'a> {
    pub fn parse(token: &'a str) -> Option<Presented<'a>> {
        let tail = token.rsplit('-').next().unwrap_or(token);
        (tail.chars().count() >= TOKEN_DIGEST_LEN).then_some(Presented { whole: token, tail })
    }
}

/// `prefix` is a prefix of `secret`, compared in constant time over the prefix's length.
fn is_prefix(prefix: &str, secret: &str) -> bool {
    prefix.len() <= secret.len() && bool::from(secret.as_bytes()[..prefix.len()].ct_eq(prefix.as_bytes()))
}

/// A short, stable, non-reversible label for a presented token, for logs.
pub fn fingerprint(token: &str) -> String {
    sha1_hex(&format!("nsbridge log fingerprint\0{token}"))[..8].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "this is my long pass phrase";
    const ID: &str = "5f1e4b2a9c8d7e6f5a4b3c2d";

    #[test]
    fn spec_test_vector() {
        let digest = subject_digest(&api_secret_hash(SECRET), ID);
        assert_eq!(digest, "cee53db93200a08f2a6b61afcf047709d4ce4285");
        assert_eq!(
            access_token("Test Subject_AAPS!", &digest),
            "testsubjec-cee53db93200a08f"
        );
    }

    #[test]
    fn abbreviation_rule() {
        assert_eq!(abbreviation("Test Subject_AAPS!"), "testsubjec");
        assert_eq!(abbreviation("AB_c-d.e f"), "ab_cdef");
        assert_eq!(abbreviation("Ünïcødé Föllower"), "ncdfllower");
        assert_eq!(abbreviation("0123456789abc"), "0123456789");
        assert_eq!(abbreviation("!!!"), "");
    }

    fn keys() -> TokenKeys {
        TokenKeys::new(&api_secret_hash(SECRET), ID, "Test Subject_AAPS!")
    }

    fn matches(presented: &str) -> bool {
        Presented::parse(presented).is_some_and(|p| keys().matches(&p))
    }

    #[test]
    fn digest_prefix_rule_ignores_the_name_part() {
        assert!(matches("testsubjec-cee53db93200a08f"));
        assert!(matches("anything-cee53db93200a08f"));
        assert!(matches("a-b-cee53db93200a08f2a6b"));
        assert!(matches("cee53db93200a08f2a6b61afcf047709d4ce4285"));
        assert!(!matches("testsubjec-cee53db93200a08e"));
        assert!(!matches("testsubjec-cee53db93200a08f-"));
        assert!(!matches("cee53db93200a08f2a6b61afcf047709d4ce42850"));
    }

    #[test]
    fn sixteen_character_minimum() {
        assert!(Presented::parse("testsubjec-cee53db93200a08").is_none());
        assert!(!matches("testsubjec-cee53db93200a08"));
        assert!(!matches(""));
        assert!(!matches("-"));
    }

    #[test]
    fn token_digest_rule() {
        let token_digest = sha1_hex("testsubjec-cee53db93200a08f");
        assert_eq!(keys().token_digest, token_digest);
        assert!(matches(&token_digest));
        assert!(matches(&token_digest[..16]));
        assert!(!matches(&token_digest[..15]), "shorter than the minimum");
    }

    #[test]
    fn fingerprint_is_short_and_not_a_credential() {
        let fp = fingerprint("testsubjec-cee53db93200a08f");
        assert_eq!(fp.len(), 8);
        assert!(!"cee53db93200a08f2a6b61afcf047709d4ce4285".starts_with(&fp));
        assert!(!keys().token_digest.starts_with(&fp));
        assert_eq!(fp, fingerprint("testsubjec-cee53db93200a08f"));
    }
}
