//! The server half of SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (RFC 5802 / RFC 7677, channel
//! binding tls-server-end-point per RFC 5929) as PostgreSQL speaks it, used to
//! authenticate clients. The keys are derived once per configured user at start-up, so
//! a login costs two HMACs, not 4096 PBKDF2 rounds. (The client half, used towards
//! servers, comes from `postgres-protocol`.)
//!
//! Errors follow PostgreSQL's: a malformed or inconsistent message is a protocol
//! violation, authzid and mandatory extensions are unsupported features, and only a
//! proof that does not match is a failed password.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const MECHANISM: &str = "SCRAM-SHA-256";
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The only channel binding type PostgreSQL, and so every driver, uses.
const CHANNEL_BINDING_TYPE: &str = "tls-server-end-point";
/// PostgreSQL's default iteration count for stored SCRAM secrets.
const ITERATIONS: u32 = 4096;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    /// A protocol violation (SQLSTATE 08P01).
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// Something RFC 5802 allows and PostgreSQL refuses (0A000).
    #[error("{0}")]
    Unsupported(&'static str),
    /// A wrong password (28P01).
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

/// The AuthenticationSASL mechanism list (NUL-terminated names, then a NUL): PLUS
/// first, as PostgreSQL lists it, when offered.
pub fn mechanisms(plus_offered: bool) -> &'static [u8] {
    if plus_offered {
        b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"
    } else {
        b"SCRAM-SHA-256\0\0"
    }
}

/// What the server offered on a connection and the mechanism the client chose.
#[derive(Debug, Clone, Copy)]
pub struct Negotiation<'a> {
    /// The mechanism named in SASLInitialResponse.
    pub mechanism: &'a str,
    /// The connection's tls-server-end-point data when SCRAM-SHA-256-PLUS was offered
    /// (TLS with a certificate whose hash is known); None: only SCRAM-SHA-256 was.
    pub end_point: Option<&'a [u8]>,
}

/// State between the server-first and client-final messages.
pub struct ScramExchange {
    client_first_bare: String,
    server_first: String,
    nonce: String,
    /// What the client-final `c=` must decode to: the GS2 header, then the channel
    /// binding data when the client chose PLUS.
    binding: Vec<u8>,
}

/// The GS2 channel binding flag of a client-first-message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CbindFlag<'a> {
    /// "n": the client does not support channel binding.
    No,
    /// "y": the client supports it but thinks the server does not.
    ClientOnly,
    /// "p=type": the client binds to the channel with this type.
    Binds(&'a str),
}

/// A client-first-message taken apart.
struct ClientFirst<'a> {
    flag: CbindFlag<'a>,
    /// "n,," or "p=tls-server-end-point,," etc.: the part `c=` repeats.
    gs2_header: &'a str,
    bare: &'a str,
    nonce: &'a str,
}

/// Handles client-first-message on a connection where only SCRAM-SHA-256 was offered
/// (no TLS); returns the exchange state and server-first-message.
pub fn server_first(
    secret: &ScramSecret,
    client_first: &[u8],
) -> Result<(ScramExchange, String), ScramError> {
    let plain = Negotiation {
        mechanism: MECHANISM,
        end_point: None,
    };
    server_first_with(secret, plain, client_first)
}

/// Handles client-first-message after `negotiation`; returns the exchange state and
/// server-first-message.
pub fn server_first_with(
    secret: &ScramSecret,
    negotiation: Negotiation<'_>,
    client_first: &[u8],
) -> Result<(ScramExchange, String), ScramError> {
    let text = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
    let first = parse_client_first(text)?;
    let end_point = channel_binding(first.flag, negotiation)?;
    let client_nonce = first.nonce;
    let mut ours = [0u8; 18];
    rand::thread_rng().fill_bytes(&mut ours);
    let nonce = format!("{client_nonce}{}", B64.encode(ours));
    let server_first = format!(
        "r={nonce},s={},i={}",
        B64.encode(secret.salt),
        secret.iterations
    );
    let exchange = ScramExchange {
        client_first_bare: first.bare.to_owned(),
        server_first: server_first.clone(),
        nonce,
        binding: [first.gs2_header.as_bytes(), end_point.unwrap_or_default()].concat(),
    };
    Ok((exchange, server_first))
}

/// Takes "n,,n=user,r=nonce" apart as PostgreSQL's `read_client_first_message` does:
/// GS2 flag, no authzid, no mandatory extension ("m="), a user name attribute (its
/// value is ignored: the startup packet's user counts), a printable nonce, then
/// optional extensions, which are ignored.
fn parse_client_first(text: &str) -> Result<ClientFirst<'_>, ScramError> {
    let bad_header = ScramError::Malformed("bad GS2 header");
    let (flag, rest) = text.split_once(',').ok_or(bad_header)?;
    let flag = match flag {
        "n" => CbindFlag::No,
        "y" => CbindFlag::ClientOnly,
        _ => CbindFlag::Binds(flag.strip_prefix("p=").ok_or(bad_header)?),
    };
    let (authzid, bare) = rest.split_once(',').ok_or(bad_header)?;
    if authzid.starts_with("a=") {
        return Err(ScramError::Unsupported(
            "client uses authorization identity, but it is not supported",
        ));
    }
    if !authzid.is_empty() {
        return Err(bad_header);
    }
    let mut attrs = bare.split(',');
    match attrs.next() {
        Some(a) if a.starts_with("m=") => {
            return Err(ScramError::Unsupported(
                "client requires an unsupported SCRAM extension",
            ))
        }
        Some(a) if a.starts_with("n=") => {}
        _ => return Err(ScramError::Malformed("user name attribute missing")),
    }
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(ScramError::Malformed("client nonce missing"))?;
    // RFC 5802 "printable": 0x21-0x7e except ','; the split already took the commas.
    if nonce.is_empty() || !nonce.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(ScramError::Malformed(
            "client nonce is empty or not printable",
        ));
    }
    Ok(ClientFirst {
        flag,
        gs2_header: &text[..text.len() - bare.len()],
        bare,
        nonce,
    })
}

/// Checks the client's GS2 flag against the mechanism it chose and what was offered,
/// as PostgreSQL does; returns the channel binding data the exchange binds to.
fn channel_binding<'a>(
    flag: CbindFlag<'_>,
    negotiation: Negotiation<'a>,
) -> Result<Option<&'a [u8]>, ScramError> {
    let plus = match (negotiation.mechanism, negotiation.end_point) {
        (MECHANISM, _) => false,
        (MECHANISM_PLUS, Some(_)) => true,
        _ => {
            return Err(ScramError::Malformed(
                "invalid SASL authentication mechanism",
            ))
        }
    };
    match (flag, plus) {
        (CbindFlag::No, false) => Ok(None),
        // Downgrade protection: a client that can bind was made to believe this server
        // cannot, so someone between them removed SCRAM-SHA-256-PLUS from the offer.
        (CbindFlag::ClientOnly, false) if negotiation.end_point.is_some() => Err(
            ScramError::Malformed("channel binding negotiation error: the client supports SCRAM channel binding but thinks the server does not, and this server does"),
        ),
        (CbindFlag::ClientOnly, false) => Ok(None),
        (CbindFlag::Binds(CHANNEL_BINDING_TYPE), true) => Ok(negotiation.end_point),
        (CbindFlag::Binds(_), true) => Err(ScramError::Malformed(
            "unsupported SCRAM channel-binding type",
        )),
        (CbindFlag::Binds(_), false) => Err(ScramError::Malformed(
            "the client selected SCRAM-SHA-256 without channel binding, but the message includes channel binding data",
        )),
        (CbindFlag::No | CbindFlag::ClientOnly, true) => Err(ScramError::Malformed(
            "the client selected SCRAM-SHA-256-PLUS, but the message does not include channel binding data",
        )),
    }
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
        // "c=...,r=...", then extensions (ignored, as PostgreSQL does), then the proof.
        let mut attrs = without_proof.split(',');
        let binding = attrs.next().and_then(|a| a.strip_prefix("c="));
        let nonce = attrs.next().and_then(|a| a.strip_prefix("r="));
        // The GS2 header again (a downgrade hidden from the first message shows here)
        // and, with PLUS, the channel this client really talks over: a man in the middle
        // holding its own TLS session with us sends his certificate's hash, not ours.
        if binding.and_then(|b| B64.decode(b).ok()).as_deref() != Some(&self.binding[..]) {
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
mod tests;
