//! The server half of SCRAM-SHA-256 (RFC 5802 / RFC 7677) as PostgreSQL speaks it, used
//! to authenticate clients. The keys are derived once per configured user at start-up,
//! so a login costs two HMACs, not 4096 PBKDF2 rounds. (The client half, used towards
//! servers, comes from `postgres-protocol`.)

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const MECHANISM: &str = "SCRAM-SHA-256";
/// PostgreSQL's default iteration count for stored SCRAM secrets.
const ITERATIONS: u32 = 4096;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("SCRAM proof does not match")]
    BadProof,
}

/// What the server keeps for a user: never the password itself after start-up.
#[derive(Clone)]
pub struct ScramSecret {
    salt: [u8; 16],
    iterations: u32,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramSecret(..)")
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail here.
    let mut mac = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA-256 with one output block ("Hi" in RFC 5802).
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password, salt, iterations)
}

impl ScramSecret {
    pub fn new(password: &str) -> ScramSecret {
        let mut salt = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut salt);
        Self::with_salt(password, salt, ITERATIONS)
    }

    fn with_salt(password: &str, salt: [u8; 16], iterations: u32) -> ScramSecret {
        let salted = hi(password.as_bytes(), &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        ScramSecret {
            salt,
            iterations,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }
}

impl ScramSecret {
    /// A stand-in secret for a user that does not exist, so that its exchange looks like
    /// a real user's with a wrong password (PostgreSQL's `scram_mock_salt`). `self` is
    /// the decoy made at start-up: its salt is never sent to anyone and keys the
    /// per-name salt, HMAC-SHA-256(decoy salt, user name) cut to 16 bytes. A name thus
    /// gets the same salt on every attempt and each name its own, like real users; only
    /// someone who knows the decoy can tell. The keys are the decoy's: no password can
    /// match them, and the caller refuses unknown users anyway.
    pub fn decoy_for(&self, user: &str) -> ScramSecret {
        let digest = hmac(&self.salt, user.as_bytes());
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&digest[..16]);
        ScramSecret {
            salt,
            ..self.clone()
        }
    }
}

/// State between the server-first and client-final messages.
pub struct ScramExchange {
    client_first_bare: String,
    server_first: String,
    nonce: String,
    gs2_header: String,
}

/// Handles client-first-message; returns the exchange state and server-first-message.
pub fn server_first(
    secret: &ScramSecret,
    client_first: &[u8],
) -> Result<(ScramExchange, String), ScramError> {
    let text = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
    let (gs2_header, bare) = split_gs2(text)?;
    let client_nonce = bare
        .split(',')
        .find_map(|a| a.strip_prefix("r="))
        .filter(|n| !n.is_empty())
        .ok_or(ScramError::Malformed("client nonce missing"))?;
    let mut ours = [0u8; 18];
    rand::thread_rng().fill_bytes(&mut ours);
    let nonce = format!("{client_nonce}{}", B64.encode(ours));
    let server_first = format!(
        "r={nonce},s={},i={}",
        B64.encode(secret.salt),
        secret.iterations
    );
    let exchange = ScramExchange {
        client_first_bare: bare.to_owned(),
        server_first: server_first.clone(),
        nonce,
        gs2_header: gs2_header.to_owned(),
    };
    Ok((exchange, server_first))
}

/// Splits "n,,n=user,r=nonce" into the GS2 header ("n,,") and the bare message.
fn split_gs2(text: &str) -> Result<(&str, &str), ScramError> {
    if text.starts_with("p=") {
        return Err(ScramError::ChannelBinding);
    }
    if !(text.starts_with("n,") || text.starts_with("y,")) {
        return Err(ScramError::Malformed("bad GS2 header"));
    }
    let second_comma = text[2..]
        .find(',')
        .map(|i| i + 2)
        .ok_or(ScramError::Malformed("bad GS2 header"))?;
    Ok((&text[..=second_comma], &text[second_comma + 1..]))
}

impl ScramExchange {
    /// Verifies client-final-message; returns server-final-message ("v=...").
    pub fn server_final(
        &self,
        secret: &ScramSecret,
        client_final: &[u8],
    ) -> Result<String, ScramError> {
        let text =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof_b64) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("proof missing"))?;
        let mut binding = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(v) = attr.strip_prefix("c=") {
                binding = Some(v);
            } else if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            }
        }
        if binding != Some(B64.encode(&self.gs2_header).as_str()) {
            return Err(ScramError::Malformed("channel binding data does not match"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof = B64
            .decode(proof_b64)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::BadProof);
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&secret.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ signature[i];
        }
        let candidate: [u8; 32] = Sha256::digest(client_key).into();
        // Constant-time comparison: do not leak how many bytes matched.
        if !bool::from(candidate.ct_eq(&secret.stored_key)) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&secret.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs our server against postgres-protocol's client, as a real driver would.
    fn exchange(server_password: &str, client_password: &str) -> Result<(), ScramError> {
        let secret = ScramSecret::new(server_password);
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let (state, first) = server_first(&secret, client.message())?;
        client
            .update(first.as_bytes())
            .expect("client accepts server-first");
        let last = state.server_final(&secret, client.message())?;
        client
            .finish(last.as_bytes())
            .expect("client verifies the server signature");
        Ok(())
    }

    #[test]
    fn right_password_is_accepted_and_server_is_verified() {
        assert_eq!(exchange("app-secret", "app-secret"), Ok(()));
    }

    #[test]
    fn wrong_password_is_rejected() {
        assert_eq!(exchange("app-secret", "nope"), Err(ScramError::BadProof));
    }

    #[test]
    fn rfc7677_test_vector_keys() {
        // RFC 7677 section 3: password "pencil", salt W22ZaJ0SNY7soEsUEjb6gQ==, 4096 rounds.
        let salt: [u8; 16] = B64
            .decode("W22ZaJ0SNY7soEsUEjb6gQ==")
            .unwrap()
            .try_into()
            .unwrap();
        let secret = ScramSecret::with_salt("pencil", salt, 4096);
        let exchange = ScramExchange {
            client_first_bare: "n=user,r=rOprNGfwEbeRWgbNEkqO".into(),
            server_first: "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096".into(),
            nonce: "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into(),
            gs2_header: "n,,".into(),
        };
        let final_msg = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        assert_eq!(
            exchange.server_final(&secret, final_msg.as_bytes()),
            Ok("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=".to_string())
        );
    }

    /// A client-final-message for `exchange` with the given `c=` and `r=` values and a
    /// proof that is right for them and `password`: only the server's own checks of
    /// the binding and the nonce can reject it.
    fn client_final(password: &str, exchange: &ScramExchange, c: &str, r: &str) -> String {
        let (salt, i) = exchange
            .server_first
            .split(',')
            .fold((None, 0), |(salt, i), attr| match attr.split_at(2) {
                ("s=", v) => (B64.decode(v).ok(), i),
                ("i=", v) => (salt, v.parse().unwrap()),
                _ => (salt, i),
            });
        let salted = hi(password.as_bytes(), &salt.unwrap(), i);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c={c},r={r}");
        let auth_message = format!(
            "{},{},{without_proof}",
            exchange.client_first_bare, exchange.server_first
        );
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        format!("{without_proof},p={}", B64.encode(proof))
    }

    #[test]
    fn a_proof_for_another_nonce_is_a_protocol_error() {
        let secret = ScramSecret::new("pw");
        let (exchange, _) = server_first(&secret, b"n,,n=,r=abc").unwrap();
        let right = client_final("pw", &exchange, "biws", &exchange.nonce);
        assert!(exchange.server_final(&secret, right.as_bytes()).is_ok());
        // A replayed or forged final message carries a nonce this exchange never issued.
        for nonce in ["abc", "abcXYZ", &format!("{}x", exchange.nonce)] {
            let forged = client_final("pw", &exchange, "biws", nonce);
            assert_eq!(
                exchange.server_final(&secret, forged.as_bytes()),
                Err(ScramError::Malformed("nonce does not match")),
                "{nonce}"
            );
        }
    }

    #[test]
    fn a_channel_binding_other_than_the_gs2_header_is_a_protocol_error() {
        let secret = ScramSecret::new("pw");
        let (exchange, _) = server_first(&secret, b"n,,n=,r=abc").unwrap();
        // "y,," and "p=tls-server-end-point,," instead of the "n,," the client sent first
        // (a downgrade hidden from the first message), and garbage.
        for c in ["eSws", "cD10bHMtc2VydmVyLWVuZC1wb2ludCws", "!!", ""] {
            let forged = client_final("pw", &exchange, c, &exchange.nonce);
            assert_eq!(
                exchange.server_final(&secret, forged.as_bytes()),
                Err(ScramError::Malformed("channel binding data does not match")),
                "c={c}"
            );
        }
    }

    #[test]
    fn decoy_salts_are_stable_per_name_and_distinct_across_names_and_starts() {
        let decoy = ScramSecret::new("decoy");
        let ghost = decoy.decoy_for("ghost");
        assert_eq!(ghost.salt, decoy.decoy_for("ghost").salt);
        assert_ne!(ghost.salt, decoy.decoy_for("phantom").salt);
        assert_ne!(ghost.salt, decoy.salt, "the decoy's own salt stays secret");
        assert_eq!(ghost.iterations, ITERATIONS, "same rounds as real users");
        let next_start = ScramSecret::new("decoy");
        assert_ne!(ghost.salt, next_start.decoy_for("ghost").salt);
    }

    #[test]
    fn channel_binding_and_garbage_are_errors() {
        let secret = ScramSecret::new("x");
        assert!(matches!(
            server_first(&secret, b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::ChannelBinding)
        ));
        assert!(server_first(&secret, b"garbage").is_err());
        assert!(server_first(&secret, b"n,,n=,").is_err());
        assert!(server_first(&secret, &[0xff, 0xfe]).is_err());
    }
}
