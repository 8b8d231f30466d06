//! Client authentication against the `[[users]]` table (or secrets looked
//! up with `[auth] query`): the server side of SCRAM-SHA-256 and md5, and
//! the client side of SCRAM with keys recovered from a client's proof, so
//! that pgheal logs in upstream as a looked-up user without ever holding a
//! password. Hashing comes from the RustCrypto crates and
//! `postgres-protocol`; this file only does the message exchange.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error(
        "invalid SCRAM secret: expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>"
    )]
    BadSecret,
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported without TLS")]
    ChannelBinding,
    #[error("SCRAM proof does not match")]
    WrongProof,
}

/// What PostgreSQL stores for a SCRAM user (`pg_authid.rolpassword`).
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(<redacted>)")
    }
}

impl ScramVerifier {
    pub fn parse(s: &str) -> Result<Self, ScramError> {
        let rest = s
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(ScramError::BadSecret)?;
        let (params, keys) = rest.split_once('$').ok_or(ScramError::BadSecret)?;
        let (iter, salt) = params.split_once(':').ok_or(ScramError::BadSecret)?;
        let (stored, server) = keys.split_once(':').ok_or(ScramError::BadSecret)?;
        let key = |k: &str| -> Result<[u8; 32], ScramError> {
            let v = B64.decode(k).map_err(|_| ScramError::BadSecret)?;
            v.try_into().map_err(|_| ScramError::BadSecret)
        };
        Ok(ScramVerifier {
            iterations: iter.parse().map_err(|_| ScramError::BadSecret)?,
            salt: B64.decode(salt).map_err(|_| ScramError::BadSecret)?,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }

    /// A verifier made from a plain password, with a random salt.
    pub fn from_password(password: &str) -> Self {
        let secret = postgres_protocol::password::scram_sha_256(password.as_bytes());
        // postgres-protocol always produces the form parse() reads.
        Self::parse(&secret).unwrap_or_else(|_| Self::mock())
    }

    /// A verifier no password matches, for users that do not exist, so that
    /// a client cannot tell an unknown user from a wrong password.
    pub fn mock() -> Self {
        let mut salt = vec![0u8; 16];
        let mut keys = [0u8; 64];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        rand::rngs::OsRng.fill_bytes(&mut keys);
        let mut stored_key = [0u8; 32];
        let mut server_key = [0u8; 32];
        stored_key.copy_from_slice(&keys[..32]);
        server_key.copy_from_slice(&keys[32..]);
        ScramVerifier {
            iterations: 4096,
            salt,
            stored_key,
            server_key,
        }
    }
}

/// The server's half of one SCRAM-SHA-256 exchange, between server-first
/// and client-final.
pub struct ScramExchange {
    verifier: ScramVerifier,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    gs2_header: String,
}

impl ScramExchange {
    /// Reads client-first and returns the exchange and server-first.
    pub fn start(
        verifier: ScramVerifier,
        client_first: &[u8],
    ) -> Result<(Self, String), ScramError> {
        let text =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (gs2_header, bare) = split_gs2(text)?;
        let client_nonce = attribute(bare, 'r').ok_or(ScramError::Malformed("no nonce"))?;
        let mut ours = [0u8; 18];
        rand::rngs::OsRng.fill_bytes(&mut ours);
        let nonce = format!("{client_nonce}{}", B64.encode(ours));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        let ex = ScramExchange {
            verifier,
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            nonce,
            gs2_header: gs2_header.to_string(),
        };
        Ok((ex, server_first))
    }

    /// Checks client-final; on success returns server-final (`v=...`) and
    /// the keys the client proved it has.
    pub fn finish(self, client_final: &[u8]) -> Result<(String, ScramKeys), ScramError> {
        let text =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let binding = attribute(without_proof, 'c').ok_or(ScramError::Malformed("no binding"))?;
        if B64.decode(binding).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err(ScramError::Malformed("channel binding does not match"));
        }
        if attribute(without_proof, 'r') != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        if proof.len() != signature.len() {
            return Err(ScramError::WrongProof);
        }
        let client_key: Vec<u8> = proof.iter().zip(signature).map(|(p, s)| p ^ s).collect();
        let stored = Sha256::digest(&client_key);
        if !bool::from(stored.as_slice().ct_eq(&self.verifier.stored_key)) {
            return Err(ScramError::WrongProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(&client_key);
        let keys = ScramKeys {
            iterations: self.verifier.iterations,
            salt: self.verifier.salt,
            client_key: key,
            server_key: self.verifier.server_key,
        };
        Ok((format!("v={}", B64.encode(server_signature)), keys))
    }
}

/// What a SCRAM client needs to log in without the password: the ClientKey
/// a client proved (proof XOR signature) and the ServerKey of its secret,
/// valid where the server stores the same salt and iteration count.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    iterations: u32,
    salt: Vec<u8>,
    client_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(<redacted>)")
    }
}

/// The client side of one SCRAM-SHA-256 exchange made with [`ScramKeys`].
pub struct ScramClient {
    keys: ScramKeys,
    client_first_bare: String,
    auth_message: Option<String>,
}

impl ScramClient {
    /// Starts an exchange; returns the client and client-first.
    pub fn start(keys: ScramKeys) -> (ScramClient, String) {
        let mut nonce = [0u8; 18];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let bare = format!("n=,r={}", B64.encode(nonce));
        let first = format!("n,,{bare}");
        let client = ScramClient {
            keys,
            client_first_bare: bare,
            auth_message: None,
        };
        (client, first)
    }

    /// Reads server-first; returns client-final.
    pub fn update(&mut self, server_first: &[u8]) -> Result<String, ScramError> {
        let text =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let nonce = attribute(text, 'r').ok_or(ScramError::Malformed("no nonce"))?;
        let ours = attribute(&self.client_first_bare, 'r').unwrap_or_default();
        if !nonce.starts_with(ours) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let salt = attribute(text, 's').and_then(|s| B64.decode(s).ok());
        let iterations = attribute(text, 'i').and_then(|i| i.parse::<u32>().ok());
        if salt.as_deref() != Some(&self.keys.salt[..]) || iterations != Some(self.keys.iterations)
        {
            // The server's secret is not the one the client proved.
            return Err(ScramError::BadSecret);
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let stored_key = Sha256::digest(self.keys.client_key);
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = self
            .keys
            .client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks server-final: the server knows the secret too.
    pub fn finish(self, server_final: &[u8]) -> Result<(), ScramError> {
        let text =
            std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let sent = attribute(text, 'v')
            .and_then(|v| B64.decode(v).ok())
            .ok_or(ScramError::Malformed("no server signature"))?;
        let message = self
            .auth_message
            .ok_or(ScramError::Malformed("out of order"))?;
        let expected = hmac(&self.keys.server_key, message.as_bytes());
        if bool::from(expected.as_slice().ct_eq(&sent)) {
            Ok(())
        } else {
            Err(ScramError::WrongProof)
        }
    }
}

fn split_gs2(text: &str) -> Result<(&str, &str), ScramError> {
    match text.as_bytes().first() {
        Some(b'n') | Some(b'y') => {}
        Some(b'p') => return Err(ScramError::ChannelBinding),
        _ => return Err(ScramError::Malformed("bad gs2 header")),
    }
    let first = text
        .find(',')
        .ok_or(ScramError::Malformed("bad gs2 header"))?;
    let second = text[first + 1..]
        .find(',')
        .ok_or(ScramError::Malformed("bad gs2 header"))?;
    Ok(text.split_at(first + second + 2))
}

fn attribute(msg: &str, name: char) -> Option<&str> {
    msg.split(',').find_map(|part| {
        let mut chars = part.chars();
        (chars.next() == Some(name) && chars.next() == Some('=')).then(|| &part[2..])
    })
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
        // HMAC accepts keys of any length; this branch cannot be taken.
        return [0; 32];
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Checks an md5 PasswordMessage (`md5` + hex) against the plain password.
pub fn md5_matches(user: &str, password: &str, salt: [u8; 4], sent: &[u8]) -> bool {
    let expected =
        postgres_protocol::authentication::md5_hash(user.as_bytes(), password.as_bytes(), salt);
    bool::from(expected.as_bytes().ct_eq(sent))
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn exchange(verifier: ScramVerifier, password: &str) -> Result<(), ScramError> {
        keys_from(verifier, password).map(|_| ())
    }

    fn keys_from(verifier: ScramVerifier, password: &str) -> Result<ScramKeys, ScramError> {
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let (ex, server_first) = ScramExchange::start(verifier, client.message())?;
        client
            .update(server_first.as_bytes())
            .map_err(|_| ScramError::Malformed("client rejected server-first"))?;
        let (server_final, keys) = ex.finish(client.message())?;
        client
            .finish(server_final.as_bytes())
            .map_err(|_| ScramError::Malformed("client rejected server-final"))?;
        Ok(keys)
    }

    #[test]
    fn keys_a_client_proved_log_in_where_the_same_secret_is_stored() {
        let v = ScramVerifier::from_password("pw");
        let keys = keys_from(v.clone(), "pw").expect("right password");
        // pgheal as the client, the same secret on the other side.
        let (mut client, first) = ScramClient::start(keys.clone());
        let (ex, server_first) = ScramExchange::start(v, first.as_bytes()).expect("first");
        let last = client
            .update(server_first.as_bytes())
            .expect("server-first");
        let (server_final, again) = ex.finish(last.as_bytes()).expect("the proof holds");
        assert_eq!(again, keys);
        client
            .finish(server_final.as_bytes())
            .expect("server signature");
        // Another secret (other salt) is refused before any proof is sent.
        let other = ScramVerifier::from_password("pw");
        let (mut client, first) = ScramClient::start(keys);
        let (_, server_first) = ScramExchange::start(other, first.as_bytes()).expect("first");
        assert_eq!(
            client.update(server_first.as_bytes()),
            Err(ScramError::BadSecret)
        );
    }

    #[test]
    fn scram_accepts_the_right_password_only() {
        let v = ScramVerifier::from_password("s3cret");
        assert_eq!(exchange(v.clone(), "s3cret"), Ok(()));
        assert_eq!(exchange(v, "wrong"), Err(ScramError::WrongProof));
        assert_eq!(
            exchange(ScramVerifier::mock(), "anything"),
            Err(ScramError::WrongProof)
        );
    }

    #[test]
    fn scram_secret_parsing() {
        let secret = postgres_protocol::password::scram_sha_256(b"pw");
        let v = ScramVerifier::parse(&secret).expect("test input is valid");
        assert_eq!(exchange(v, "pw"), Ok(()));
        assert_eq!(
            ScramVerifier::parse("md5abc").unwrap_err(),
            ScramError::BadSecret
        );
        assert_eq!(
            ScramVerifier::parse("SCRAM-SHA-256$x:AA==$AA==:AA==").unwrap_err(),
            ScramError::BadSecret
        );
        assert!(!format!("{:?}", ScramVerifier::mock()).contains('='));
    }

    #[test]
    fn scram_rejects_channel_binding_and_junk() {
        let v = ScramVerifier::mock();
        assert!(matches!(
            ScramExchange::start(v.clone(), b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::ChannelBinding)
        ));
        assert!(ScramExchange::start(v.clone(), b"x").is_err());
        assert!(ScramExchange::start(v.clone(), b"n,,n=").is_err());
        let (ex, _) = ScramExchange::start(v, b"n,,n=,r=abc").expect("test input is valid");
        assert!(ex.finish(b"c=biws,r=abc,p=AAAA").is_err());
    }

    #[test]
    fn md5_check() {
        let hash = postgres_protocol::authentication::md5_hash(b"u", b"pw", [1, 2, 3, 4]);
        assert!(md5_matches("u", "pw", [1, 2, 3, 4], hash.as_bytes()));
        assert!(!md5_matches("u", "px", [1, 2, 3, 4], hash.as_bytes()));
    }
}
