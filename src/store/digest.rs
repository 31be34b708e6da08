//! Typed blake3 digests: an object's content digest and a step's cache key are
//! different things and must never stand in for each other. Both serialize as 64 hex
//! characters.

use std::fmt;
use std::str::FromStr;

macro_rules! digest_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 32]);

        impl $name {
            /// Wraps raw digest bytes.
            pub fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// The raw digest bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// The digest as 64 lowercase hex characters.
            pub fn to_hex(&self) -> String {
                blake3::Hash::from_bytes(self.0).to_hex().to_string()
            }

            /// The first 12 hex characters, for display.
            pub fn short(&self) -> String {
                self.to_hex()[..12].to_string()
            }
        }

        impl From<blake3::Hash> for $name {
            fn from(hash: blake3::Hash) -> Self {
                Self(*hash.as_bytes())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                blake3::Hash::from_hex(s)
                    .map(Self::from)
                    .map_err(|_| format!("`{s}` is not a 64-character hex digest"))
            }
        }
    };
}

digest_type!(
    /// blake3 digest of an object's content (file bytes, or a directory's Merkle hash).
    ObjectDigest
);
digest_type!(
    /// blake3 digest identifying one step execution: kind, version, params and inputs.
    CacheKey
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let d = ObjectDigest::from(blake3::hash(b"abc"));
        let parsed: ObjectDigest = d.to_hex().parse().unwrap();
        assert_eq!(d, parsed);
        assert_eq!(d.short().len(), 12);
        assert!("xyz".parse::<ObjectDigest>().is_err());
    }
}
