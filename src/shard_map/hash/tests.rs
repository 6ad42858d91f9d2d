//! Known answers taken from PostgreSQL 15 on x86_64 Linux (`SELECT hashint8extended(0, 0)`
//! and so on; the server prints the signed int8, hence the `as u64`), plus properties.
//! The exhaustive comparison against a live server is `integration-tests/hashing.rs`.

use super::*;
use proptest::prelude::*;

/// The server's signed int8 result as the unsigned value we compute.
fn pg(v: i64) -> u64 {
    v as u64
}

#[test]
fn int8_known_values() {
    let cases: [(i64, i64); 7] = [
        (0, 4154612158245552303),
        (1, -3670598878359251130),
        (-1, -1888257769727981238),
        (i32::MAX as i64, -9109110466470504941),
        (i32::MIN as i64, 1977219185673256887),
        // The fold makes these collide with i32::MIN / i32::MAX, as on the server.
        (i64::MAX, 1977219185673256887),
        (i64::MIN, -9109110466470504941),
    ];
    for (v, expected) in cases {
        assert_eq!(
            hashint8extended(v, 0),
            pg(expected),
            "hashint8extended({v}, 0)"
        );
    }
}

#[test]
fn int8_seeded_known_values() {
    // (value, seed, hashint8extended(value, seed)); seed -1 sets both seed halves.
    let cases: [(i64, i64, i64); 9] = [
        (0, 1, 434346878670890809),
        (0, 42, -8162688053457160230),
        (0, -1, -4140905993450701875),
        (1, 1, -7620678293940249823),
        (1, 42, 2207685931686633351),
        (1, -1, 1505930170527472848),
        (-1, 1, 3987656643895367148),
        (-1, 42, -2218543911767281624),
        (-1, -1, 6481520839006961279),
    ];
    for (v, seed, expected) in cases {
        assert_eq!(
            hashint8extended(v, seed as u64),
            pg(expected),
            "hashint8extended({v}, {seed})"
        );
    }
}

#[test]
fn int4_and_int2_hash_like_int8() {
    // hashint4extended(-5, 0) and hashint2extended(7::int2, 0) on the server.
    assert_eq!(
        hash_uint32_extended(-5i32 as u32, 0),
        pg(-9082176226831438310)
    );
    assert_eq!(hashint8extended(-5, 0), pg(-9082176226831438310));
    assert_eq!(hash_uint32_extended(7, 0), pg(-3288951424994980865));
    assert_eq!(hashint8extended(7, 0), pg(-3288951424994980865));
}

#[test]
fn text_known_values_cover_every_tail_length() {
    // hashtextextended(left('abcdefghijklmnopqrstuvwxyz', n), 0) for n = 0..=13: every
    // tail length 0..=11, a full block with no tail (12) and a block plus one byte (13).
    let expected: [i64; 14] = [
        -6939563903564495251,
        3591986179850072241,
        2833316173711343549,
        -6747756470228489321,
        -1038429303365892052,
        3076356108696143428,
        290958262752763840,
        -6158032784613548338,
        -8882191227074733005,
        -3278210106038014113,
        -3183301415634409076,
        3112909444737856467,
        -7556637188122330412,
        8871624171452417744,
    ];
    let alphabet = "abcdefghijklmnopqrstuvwxyz";
    for (n, want) in expected.into_iter().enumerate() {
        let s = &alphabet[..n];
        assert_eq!(
            hashtextextended(s, 0),
            pg(want),
            "hashtextextended({s:?}, 0)"
        );
    }
    assert_eq!(
        hashtextextended(&alphabet[..25], 0),
        pg(5649064133428767341)
    );
    assert_eq!(
        hashtextextended(&alphabet[..23], 7),
        pg(6303409506105276822)
    );
    assert_eq!(
        hashtextextended(&"x".repeat(1000), 0),
        pg(8373529910559647588)
    );
    assert_eq!(hashtextextended("", 1), pg(-150071773020461347));
}

#[test]
fn text_non_ascii_known_values() {
    // (text, seed 0, seed 42)
    let cases: [(&str, i64, i64); 4] = [
        ("é", -763932721387459829, -2538586268327829357),
        ("😀", -9149796522330800166, 6030932355784347341),
        ("日本語", 2870829529307104068, -7533093163681083669),
        ("hello, world", 3460972653678271855, 5814189933026107213),
    ];
    for (s, seed0, seed42) in cases {
        assert_eq!(hashtextextended(s, 0), pg(seed0), "{s:?}");
        assert_eq!(hashtextextended(s, 42), pg(seed42), "{s:?}");
        assert_eq!(
            hashtextextended(s.as_bytes(), 0),
            pg(seed0),
            "{s:?} as bytes"
        );
    }
}

#[test]
fn uuid_known_values() {
    let mut sample = [0u8; 16];
    for (i, pair) in "123e4567e89b12d3a456426614174000"
        .as_bytes()
        .chunks(2)
        .enumerate()
    {
        let hex = std::str::from_utf8(pair).expect("ASCII");
        sample[i] = u8::from_str_radix(hex, 16).expect("hex digits");
    }
    // (uuid, seed 0, seed 42)
    let cases: [([u8; 16], i64, i64); 3] = [
        ([0; 16], -6859010066814654381, -3882004234363783809),
        ([0xff; 16], 293445543803463785, -6666173708135232559),
        (sample, -1647950126005018481, 6754474498886723631),
    ];
    for (u, seed0, seed42) in cases {
        assert_eq!(uuid_hash_extended(&u, 0), pg(seed0), "{u:02x?}");
        assert_eq!(uuid_hash_extended(&u, 42), pg(seed42), "{u:02x?}");
    }
}

#[test]
fn key_hash_uses_each_types_function_with_seed_zero() {
    assert_eq!(key_hash(&KeyValue::Int(1)), hashint8extended(1, 0));
    assert_eq!(key_hash(&KeyValue::Text("é")), hashtextextended("é", 0));
    assert_eq!(
        key_hash(&KeyValue::Uuid([0; 16])),
        uuid_hash_extended(&[0; 16], 0)
    );
    assert_eq!(KeyValue::Text("x").key_type(), KeyType::Text);
}

#[test]
fn bucket_takes_the_low_bits() {
    assert_eq!(
        bucket(pg(4154612158245552303), 1024),
        (4154612158245552303u64 & 1023) as u32
    );
    // A negative server hash: `& 1023` on the signed value keeps the same low bits.
    assert_eq!(
        bucket(pg(-1888257769727981238), 1024) as i64,
        -1888257769727981238 & 1023
    );
    assert_eq!(bucket(u64::MAX, 1), 0);
    assert_eq!(bucket(u64::MAX, 1 << 31), (1 << 31) - 1);
}

#[test]
fn membership_sql_per_type() {
    assert_eq!(
        membership_sql("user_id", KeyType::Int, 1024, 512, 1023),
        "(hashint8extended(user_id, 0) & 1023) BETWEEN 512 AND 1023"
    );
    assert_eq!(
        membership_sql("\"Name\"", KeyType::Text, 16, 0, 7),
        "(hashtextextended(\"Name\", 0) & 15) BETWEEN 0 AND 7"
    );
    assert_eq!(
        membership_sql("t.id", KeyType::Uuid, 1, 0, 0),
        "(uuid_hash_extended(t.id, 0) & 0) BETWEEN 0 AND 0"
    );
}

proptest! {
    #[test]
    fn never_panics(
        data in proptest::collection::vec(any::<u8>(), 0..200),
        seed in any::<u64>(),
        v in any::<i64>(),
        u in any::<[u8; 16]>(),
        shift in 0u32..32,
    ) {
        let _ = hash_bytes_extended(&data, seed);
        let _ = hashtextextended(&data, seed);
        let _ = hashint8extended(v, seed);
        let _ = uuid_hash_extended(&u, seed);
        let text = String::from_utf8_lossy(&data);
        let h = key_hash(&KeyValue::Text(&text));
        prop_assert!(bucket(h, 1 << shift) < 1 << shift);
    }

    #[test]
    fn int4_values_hash_like_hashint4extended(v in any::<i32>(), seed in any::<u64>()) {
        prop_assert_eq!(
            hashint8extended(i64::from(v), seed),
            hash_uint32_extended(v as u32, seed)
        );
    }

    #[test]
    fn uint32_hash_is_the_hash_of_its_le_bytes(k in any::<u32>(), seed in any::<u64>()) {
        prop_assert_eq!(
            hash_uint32_extended(k, seed),
            hash_bytes_extended(&k.to_le_bytes(), seed)
        );
    }
}
