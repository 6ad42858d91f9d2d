//! Proof that `shardgate::shard_map::hash` equals PostgreSQL's own extended hash
//! functions bit for bit: thousands of int, text and uuid values (edge values, every
//! tail length, multi-block and non-ASCII text, random values) are sent to a real server
//! in arrays, hashed there, and every row is compared with the proxy's result. Hash
//! keyspaces depend on this: the proxy routes by its value, servers filter by theirs.

mod common;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shardgate::shard_map::hash::{
    bucket, hashint8extended, hashtextextended, key_hash, membership_sql, uuid_hash_extended,
    KeyType, KeyValue,
};
use tokio_postgres::Client;

use common::{shared_cluster, superuser_client};

/// Fixed so that a failure reproduces; the values still cover far more than the unit
/// tests' known answers.
const RNG_SEED: u64 = 0x5ead_6a7e;

/// Seeds the seeded checks use; negative seeds exercise both halves of the 64-bit seed.
const SEEDS: [i64; 5] = [1, 42, -1, i64::MIN, 0x0123_4567_89ab_cdef];

async fn client() -> Client {
    let cluster = shared_cluster();
    superuser_client(cluster, cluster.primary.1, "postgres").await
}

fn int_values(rng: &mut StdRng) -> Vec<i64> {
    let mut values = vec![
        0,
        1,
        -1,
        2,
        -2,
        i64::from(i16::MIN),
        i64::from(i16::MAX),
        i64::from(i32::MIN),
        i64::from(i32::MAX),
        i64::from(i32::MIN) - 1,
        i64::from(i32::MAX) + 1,
        i64::from(u32::MAX),
        i64::MIN,
        i64::MIN + 1,
        i64::MAX,
        i64::MAX - 1,
    ];
    values.extend(-1000..1000);
    values.extend((0..2000).map(|_| rng.gen::<i64>()));
    values.extend((0..1000).map(|_| i64::from(rng.gen::<i32>())));
    values
}

/// Random text without NUL, which PostgreSQL text cannot hold.
fn random_text(rng: &mut StdRng, max_chars: usize) -> String {
    let len = rng.gen_range(0..=max_chars);
    let ascii = rng.gen_bool(0.5);
    (0..len)
        .map(|_| {
            if ascii {
                rng.gen_range('\u{1}'..='\u{7f}')
            } else {
                rng.gen_range('\u{1}'..=char::MAX)
            }
        })
        .collect()
}

fn text_values(rng: &mut StdRng) -> Vec<String> {
    let alphabet: String = ('!'..='~').collect();
    // Every length 0..=64: each tail length 0..=11 with zero to five full blocks.
    let mut values: Vec<String> = (0..=64).map(|n| alphabet[..n].to_owned()).collect();
    values.extend(
        [
            "é",
            "😀",
            "日本語",
            "naïve café",
            "Ünïcödé 🎉 テスト",
            " ",
            "\u{7f}",
        ]
        .map(String::from),
    );
    // Multi-byte characters straddling word and block boundaries at every offset.
    values.extend((0..24).map(|n| format!("{}é😀中", "a".repeat(n))));
    values.extend([1000, 1001, 4096, 10_007].map(|n| "x".repeat(n)));
    values.push("日本".repeat(700));
    values.extend((0..3000).map(|_| random_text(rng, 40)));
    values.extend((0..50).map(|_| random_text(rng, 2000)));
    values
}

fn uuid_values(rng: &mut StdRng) -> Vec<[u8; 16]> {
    let mut values = vec![[0u8; 16], [0xff; 16]];
    values.extend((0..16).map(|i| {
        let mut u = [0u8; 16];
        u[i] = 1;
        u
    }));
    values.extend((0..3000).map(|_| rng.gen::<[u8; 16]>()));
    values
}

/// The canonical text form PostgreSQL prints, e.g. `123e4567-e89b-12d3-a456-426614174000`.
fn uuid_text(u: &[u8; 16]) -> String {
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Runs `sql` (returning `(value, seed, hash)` rows in input order) and checks every row
/// against `ours`, failing with the first mismatch.
async fn compare<T>(
    client: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    expected_rows: usize,
    ours: impl Fn(&T, u64) -> u64,
    describe: impl Fn(&T) -> String,
) where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    let rows = client
        .query(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    assert_eq!(rows.len(), expected_rows, "{sql}: row count");
    for row in &rows {
        let value: T = row.get(0);
        let seed: i64 = row.get(1);
        let server: i64 = row.get(2);
        assert_eq!(
            ours(&value, seed as u64),
            server as u64,
            "hash of {} with seed {seed}: proxy differs from PostgreSQL",
            describe(&value)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn int_hashes_equal_hashint8extended() {
    let client = client().await;
    let values = int_values(&mut StdRng::seed_from_u64(RNG_SEED));
    compare(
        &client,
        "SELECT v, 0::int8, hashint8extended(v, 0) FROM unnest($1::int8[]) v",
        &[&values],
        values.len(),
        |v: &i64, seed| {
            assert_eq!(seed, 0);
            key_hash(&KeyValue::Int(*v))
        },
        |v| v.to_string(),
    )
    .await;

    // int4 and int2 columns hash through hashint4extended/hashint2extended on their own
    // opclass; the proxy uses hashint8extended for all of them, which must agree.
    let small: Vec<i32> = values
        .iter()
        .filter_map(|&v| i32::try_from(v).ok())
        .collect();
    compare(
        &client,
        "SELECT v::int8, 0::int8, hashint4extended(v, 0) FROM unnest($1::int4[]) v",
        &[&small],
        small.len(),
        |v: &i64, _| hashint8extended(*v, 0),
        |v| format!("int4 {v}"),
    )
    .await;
    let smallest: Vec<i16> = values
        .iter()
        .filter_map(|&v| i16::try_from(v).ok())
        .collect();
    compare(
        &client,
        "SELECT v::int8, 0::int8, hashint2extended(v, 0) FROM unnest($1::int2[]) v",
        &[&smallest],
        smallest.len(),
        |v: &i64, _| hashint8extended(*v, 0),
        |v| format!("int2 {v}"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_hashes_equal_hashtextextended() {
    let client = client().await;
    let values = text_values(&mut StdRng::seed_from_u64(RNG_SEED));
    compare(
        &client,
        "SELECT v, 0::int8, hashtextextended(v, 0) FROM unnest($1::text[]) v",
        &[&values],
        values.len(),
        |v: &String, _| key_hash(&KeyValue::Text(v)),
        |v| format!("{:?} ({} bytes)", truncate(v), v.len()),
    )
    .await;
    // varchar columns cast to text for hashing, with the same result.
    compare(
        &client,
        "SELECT v::text, 0::int8, hashtextextended(v, 0) FROM unnest($1::varchar[]) v",
        &[&values],
        values.len(),
        |v: &String, _| hashtextextended(v, 0),
        |v| format!("varchar {:?}", truncate(v)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uuid_hashes_equal_uuid_hash_extended() {
    let client = client().await;
    let values = uuid_values(&mut StdRng::seed_from_u64(RNG_SEED));
    let texts: Vec<String> = values.iter().map(uuid_text).collect();
    // tokio-postgres has no uuid type without a feature, so uuids travel as text; the
    // server's text form coming back must be ours, proving the bytes it hashed.
    let rows = client
        .query(
            "SELECT v::text, uuid_hash_extended(v, 0) \
             FROM unnest($1::text[]::uuid[]) WITH ORDINALITY AS t(v, n) ORDER BY n",
            &[&texts],
        )
        .await
        .unwrap_or_else(|e| panic!("uuid hashes: {e}"));
    assert_eq!(rows.len(), values.len());
    for (row, (u, text)) in rows.iter().zip(values.iter().zip(&texts)) {
        assert_eq!(row.get::<_, String>(0), *text, "uuid order or text form");
        let server: i64 = row.get(1);
        assert_eq!(key_hash(&KeyValue::Uuid(*u)), server as u64, "uuid {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_hashes_equal_the_server() {
    let client = client().await;
    let mut rng = StdRng::seed_from_u64(RNG_SEED ^ 1);
    let seeds = SEEDS.to_vec();
    let ints: Vec<i64> = int_values(&mut rng).into_iter().take(300).collect();
    compare(
        &client,
        "SELECT v, s, hashint8extended(v, s) FROM unnest($1::int8[]) v, unnest($2::int8[]) s",
        &[&ints, &seeds],
        ints.len() * seeds.len(),
        |v: &i64, seed| hashint8extended(*v, seed),
        |v| v.to_string(),
    )
    .await;
    let texts: Vec<String> = text_values(&mut rng).into_iter().take(120).collect();
    compare(
        &client,
        "SELECT v, s, hashtextextended(v, s) FROM unnest($1::text[]) v, unnest($2::int8[]) s",
        &[&texts, &seeds],
        texts.len() * seeds.len(),
        |v: &String, seed| hashtextextended(v, seed),
        |v| format!("{:?}", truncate(v)),
    )
    .await;
    let uuids: Vec<String> = uuid_values(&mut rng)
        .iter()
        .take(100)
        .map(uuid_text)
        .collect();
    compare(
        &client,
        "SELECT v::text, s, uuid_hash_extended(v, s) \
         FROM unnest($1::text[]::uuid[]) v, unnest($2::int8[]) s",
        &[&uuids, &seeds],
        uuids.len() * seeds.len(),
        |v: &String, seed| uuid_hash_extended(&parse_uuid(v), seed),
        |v| v.clone(),
    )
    .await;
}

/// The server's membership condition selects exactly the keys the proxy puts in those
/// buckets, negative int8 hashes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_sql_selects_the_proxys_buckets() {
    let client = client().await;
    let values = int_values(&mut StdRng::seed_from_u64(RNG_SEED ^ 2));
    let (buckets, lo, hi) = (1024, 512, 1023);
    let condition = membership_sql("v", KeyType::Int, buckets, lo, hi);
    let sql = format!(
        "SELECT v FROM unnest($1::int8[]) WITH ORDINALITY AS t(v, n) WHERE {condition} ORDER BY n"
    );
    let rows = client
        .query(sql.as_str(), &[&values])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let server: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let ours: Vec<i64> = values
        .iter()
        .copied()
        .filter(|v| (lo..=hi).contains(&bucket(key_hash(&KeyValue::Int(*v)), buckets)))
        .collect();
    assert!(!ours.is_empty() && ours.len() < values.len());
    assert_eq!(server, ours, "{condition}");
}

fn parse_uuid(text: &str) -> [u8; 16] {
    let hex: Vec<u8> = text.bytes().filter(|b| *b != b'-').collect();
    let mut u = [0u8; 16];
    for (byte, pair) in u.iter_mut().zip(hex.chunks(2)) {
        let digits = std::str::from_utf8(pair).unwrap_or_else(|e| panic!("{text}: {e}"));
        *byte = u8::from_str_radix(digits, 16).unwrap_or_else(|e| panic!("{text}: {e}"));
    }
    u
}

/// At most 40 characters of `s`, for readable failure messages.
fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}
