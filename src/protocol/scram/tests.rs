//! Unit tests of the SCRAM server half: full exchanges against postgres-protocol's
//! client, and each check (nonce, channel binding, negotiation) on its own.

use super::*;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

/// Runs our server against postgres-protocol's client, as a real driver would.
fn exchange(server_password: &str, client_password: &str) -> Result<(), ScramError> {
    let secret = ScramSecret::new(server_password);
    let mut client = ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
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
        server_first:
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
                .into(),
        nonce: "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into(),
        binding: b"n,,".to_vec(),
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

/// Runs our server, offered and chosen as `negotiation`, against postgres-protocol's
/// client binding as `binding`.
fn bound_exchange(negotiation: Negotiation<'_>, binding: ChannelBinding) -> Result<(), ScramError> {
    let secret = ScramSecret::new("pw");
    let mut client = ScramSha256::new(b"pw", binding);
    let (state, first) = server_first_with(&secret, negotiation, client.message())?;
    client.update(first.as_bytes()).expect("server-first");
    let last = state.server_final(&secret, client.message())?;
    client.finish(last.as_bytes()).expect("server signature");
    Ok(())
}

const END_POINT: &[u8] = &[7; 32];

fn plus(end_point: &[u8]) -> Negotiation<'_> {
    Negotiation {
        mechanism: MECHANISM_PLUS,
        end_point: Some(end_point),
    }
}

fn plain(end_point: Option<&[u8]>) -> Negotiation<'_> {
    Negotiation {
        mechanism: MECHANISM,
        end_point,
    }
}

#[test]
fn plus_binds_to_the_servers_end_point() {
    let ours = ChannelBinding::tls_server_end_point(END_POINT.to_vec());
    assert_eq!(bound_exchange(plus(END_POINT), ours), Ok(()));
    // A man in the middle with a TLS session of his own to us: the client binds to
    // the certificate it saw, his. Its proof is valid; only the binding check can
    // tell.
    let theirs = ChannelBinding::tls_server_end_point(vec![8; 32]);
    assert_eq!(
        bound_exchange(plus(END_POINT), theirs),
        Err(ScramError::Malformed("channel binding data does not match"))
    );
}

#[test]
fn plain_scram_is_still_accepted_where_plus_is_offered() {
    let none = ChannelBinding::unsupported;
    assert_eq!(bound_exchange(plain(Some(END_POINT)), none()), Ok(()));
    assert_eq!(bound_exchange(plain(None), none()), Ok(()));
    // "y": the client could bind but saw no PLUS offered; fine where there was none.
    let could = ChannelBinding::unrequested;
    assert_eq!(bound_exchange(plain(None), could()), Ok(()));
}

#[test]
fn a_client_that_could_bind_but_saw_no_plus_is_a_downgrade() {
    let secret = ScramSecret::new("pw");
    let result = server_first_with(&secret, plain(Some(END_POINT)), b"y,,n=,r=abc");
    assert!(
        matches!(result, Err(ScramError::Malformed(m)) if m.contains("negotiation")),
        "{:?}",
        result.err()
    );
}

#[test]
fn the_gs2_flag_must_agree_with_the_chosen_mechanism() {
    let secret = ScramSecret::new("pw");
    let cases: [(Negotiation, &[u8]); 5] = [
        // Binding data under plain SCRAM-SHA-256.
        (plain(Some(END_POINT)), b"p=tls-server-end-point,,n=,r=abc"),
        // PLUS chosen, but no binding in the message.
        (plus(END_POINT), b"n,,n=,r=abc"),
        (plus(END_POINT), b"y,,n=,r=abc"),
        // A channel binding type nobody offered.
        (plus(END_POINT), b"p=tls-unique,,n=,r=abc"),
        // PLUS chosen where it was not offered (no TLS).
        (
            Negotiation {
                mechanism: MECHANISM_PLUS,
                end_point: None,
            },
            b"p=tls-server-end-point,,n=,r=abc",
        ),
    ];
    for (negotiation, first) in cases {
        let result = server_first_with(&secret, negotiation, first);
        assert!(
            matches!(result, Err(ScramError::Malformed(_))),
            "{}: {:?}",
            String::from_utf8_lossy(first),
            result.err()
        );
    }
    let other = Negotiation {
        mechanism: "SCRAM-SHA-1",
        end_point: None,
    };
    assert!(server_first_with(&secret, other, b"n,,n=,r=abc").is_err());
}

#[test]
fn authzid_and_mandatory_extensions_are_unsupported() {
    let secret = ScramSecret::new("x");
    for first in [&b"n,a=admin,n=,r=abc"[..], b"n,,m=ext,n=,r=abc"] {
        assert!(
            matches!(
                server_first(&secret, first),
                Err(ScramError::Unsupported(_))
            ),
            "{}",
            String::from_utf8_lossy(first)
        );
    }
    // Optional extensions after the nonce are ignored, as PostgreSQL does.
    assert!(server_first(&secret, b"n,,n=,r=abc,x=ext").is_ok());
}

#[test]
fn garbage_is_a_protocol_error() {
    let secret = ScramSecret::new("x");
    let garbage: [&[u8]; 8] = [
        b"garbage",
        b"n,,n=,",
        b"n,,n=,r=",
        b"n,,r=abc",
        b"x,,n=,r=abc",
        b"n,zz,n=,r=abc",
        b"n,,n=,r=a\x01c",
        &[0xff, 0xfe],
    ];
    for first in garbage {
        assert!(
            matches!(server_first(&secret, first), Err(ScramError::Malformed(_))),
            "{}",
            String::from_utf8_lossy(first)
        );
    }
}

/// The fuzz target `scram_messages` as a property test on stable: any bytes as a
/// client-first-message, then any bytes as the client-final-message: never a panic, and
/// without the password no final message passes.
mod properties {
    use std::sync::OnceLock;

    use proptest::prelude::*;

    use super::super::{server_first, ScramSecret};

    fn secret() -> &'static ScramSecret {
        static SECRET: OnceLock<ScramSecret> = OnceLock::new();
        SECRET.get_or_init(|| ScramSecret::new("property"))
    }

    proptest! {
        #[test]
        fn scram_parsers_never_panic(
            first in proptest::collection::vec(any::<u8>(), 0..200),
            last in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let exchange = match server_first(secret(), &first) {
                Ok((exchange, _)) => exchange,
                Err(_) => server_first(secret(), b"n,,n=,r=propnonce").unwrap().0,
            };
            prop_assert!(exchange.server_final(secret(), &last).is_err());
        }

        #[test]
        fn plausible_client_finals_never_pass(
            tail in "[a-zA-Z0-9=,+/]{0,120}",
        ) {
            let (exchange, _) = server_first(secret(), b"n,,n=,r=propnonce").unwrap();
            let last = format!("c=biws,r=propnonce{tail}");
            prop_assert!(exchange.server_final(secret(), last.as_bytes()).is_err());
        }
    }
}
