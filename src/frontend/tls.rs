//! TLS towards clients: the rustls acceptor for the configured certificate and key, and
//! the certificate's tls-server-end-point hash (RFC 5929), the channel binding data that
//! SCRAM-SHA-256-PLUS signs (startup.rs, protocol/scram.rs).

use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

pub struct ClientTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// The server certificate's tls-server-end-point hash; None when its signature
    /// algorithm names no hash known here (Ed25519, RSA-PSS, DSA): SCRAM-SHA-256-PLUS is
    /// then not offered, and clients that require channel binding cannot log in.
    pub server_end_point: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

/// Reads the PEM certificate chain (leaf first) and private key.
pub fn load(cert: &Path, key: &Path) -> Result<ClientTls, TlsError> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| TlsError(format!("{}: {e}", p.display())));
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("{}: {e}", cert.display())))?;
    let leaf = certs
        .first()
        .ok_or_else(|| TlsError(format!("{}: no certificate found", cert.display())))?;
    let server_end_point = server_end_point(leaf.as_ref());
    if server_end_point.is_none() {
        tracing::warn!(cert = %cert.display(), "unknown certificate signature hash: SCRAM-SHA-256-PLUS (channel binding) is not offered");
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| TlsError(format!("{}: {e}", key.display())))?
        .ok_or_else(|| TlsError(format!("{}: no private key found", key.display())))?;
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| TlsError(e.to_string()))?;
    Ok(ClientTls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        server_end_point,
    })
}

/// RFC 5929 section 4.1: the hash of the DER certificate, with the hash function of its
/// signature algorithm, except that MD5 and SHA-1 become SHA-256 (as OpenSSL, and so
/// PostgreSQL and libpq, compute it). RSA PKCS#1 v1.5 and ECDSA signatures are known;
/// anything else is None.
pub fn server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01]; // 1.2.840.113549.1.1
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01]; // 1.2.840.10045.4.1
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03]; // 1.2.840.10045.4.3
    let oid = signature_algorithm(cert_der)?;
    let hash = match oid.split_last()? {
        // md5, sha1, sha256, sha384, sha512, sha224 WithRSAEncryption
        (4 | 5 | 11, RSA) => Sha256::digest(cert_der).to_vec(),
        (12, RSA) => Sha384::digest(cert_der).to_vec(),
        (13, RSA) => Sha512::digest(cert_der).to_vec(),
        (14, RSA) => Sha224::digest(cert_der).to_vec(),
        _ if oid == ECDSA_SHA1 => Sha256::digest(cert_der).to_vec(),
        (1, ECDSA_SHA2) => Sha224::digest(cert_der).to_vec(),
        (2, ECDSA_SHA2) => Sha256::digest(cert_der).to_vec(),
        (3, ECDSA_SHA2) => Sha384::digest(cert_der).to_vec(),
        (4, ECDSA_SHA2) => Sha512::digest(cert_der).to_vec(),
        _ => return None,
    };
    Some(hash)
}

const SEQUENCE: u8 = 0x30;
const OBJECT_IDENTIFIER: u8 = 0x06;

/// The OID of `Certificate.signatureAlgorithm` (RFC 5280 section 4.1): the second
/// element of the outer SEQUENCE, after tbsCertificate.
fn signature_algorithm(cert_der: &[u8]) -> Option<&[u8]> {
    let (SEQUENCE, certificate, _) = der_element(cert_der)? else {
        return None;
    };
    let (SEQUENCE, _tbs, rest) = der_element(certificate)? else {
        return None;
    };
    let (SEQUENCE, algorithm, _) = der_element(rest)? else {
        return None;
    };
    let (OBJECT_IDENTIFIER, oid, _) = der_element(algorithm)? else {
        return None;
    };
    Some(oid)
}

/// The tag, contents and what follows of the DER element at the start of `der`.
fn der_element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        // Long form: the low bits say how many length bytes follow.
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(tag: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match contents.len() {
            n @ 0..=0x7f => out.push(n as u8),
            n => out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend_from_slice(contents);
        out
    }

    /// A certificate's outline: a tbsCertificate of `tbs_len` bytes, the signature
    /// algorithm `oid`, and a signature.
    fn cert(oid: &[u8], tbs_len: usize) -> Vec<u8> {
        let tbs = der(SEQUENCE, &vec![0x05; tbs_len]);
        let algorithm = der(SEQUENCE, &der(OBJECT_IDENTIFIER, oid));
        let signature = der(0x03, &[0, 1, 2, 3]);
        der(SEQUENCE, &[tbs, algorithm, signature].concat())
    }

    const SHA256_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
    const SHA384_ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];

    #[test]
    fn the_hash_follows_the_signature_algorithm() {
        // A long tbsCertificate needs the long length form.
        let c = cert(SHA256_RSA, 300);
        assert_eq!(server_end_point(&c), Some(Sha256::digest(&c).to_vec()));
        let c = cert(SHA384_ECDSA, 10);
        assert_eq!(server_end_point(&c), Some(Sha384::digest(&c).to_vec()));
        let sha512_rsa = [&SHA256_RSA[..8], &[0x0d]].concat();
        let c = cert(&sha512_rsa, 10);
        assert_eq!(server_end_point(&c), Some(Sha512::digest(&c).to_vec()));
    }

    #[test]
    fn md5_and_sha1_become_sha256() {
        let md5_rsa = [&SHA256_RSA[..8], &[0x04]].concat();
        let sha1_rsa = [&SHA256_RSA[..8], &[0x05]].concat();
        let sha1_ecdsa = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
        for oid in [&md5_rsa[..], &sha1_rsa, &sha1_ecdsa] {
            let c = cert(oid, 10);
            assert_eq!(server_end_point(&c), Some(Sha256::digest(&c).to_vec()));
        }
    }

    #[test]
    fn unknown_algorithms_and_broken_der_give_none() {
        let ed25519 = [0x2b, 0x65, 0x70];
        let rsa_pss = [&SHA256_RSA[..8], &[0x0a]].concat();
        for oid in [&ed25519[..], &rsa_pss, &[]] {
            assert_eq!(server_end_point(&cert(oid, 10)), None, "{oid:x?}");
        }
        let c = cert(SHA256_RSA, 300);
        for cut in [0, 1, 4, 300, c.len() - 1] {
            assert_eq!(server_end_point(&c[..cut]), None, "cut at {cut}");
        }
        assert_eq!(
            server_end_point(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            None
        );
    }
}
