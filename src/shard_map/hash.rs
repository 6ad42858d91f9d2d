//! PostgreSQL's extended hash functions, reproduced bit for bit, so that the proxy and
//! every server agree on which bucket of a hash keyspace a key falls in
//! (`bucket = H(key) & (buckets - 1)`, DESIGN.md section 4).
//!
//! The proxy uses [`key_hash`] and [`bucket`] to route; resharding and verification use
//! [`membership_sql`] to ask a server the same question in SQL. Both sides must give the
//! same answer for every key, so the functions here follow PostgreSQL's
//! `src/common/hashfn.c` (`hash_bytes_extended`, `hash_bytes_uint32_extended`) and the
//! type-specific wrappers (`hashint8extended`, `hashtextextended`, `uuid_hash_extended`)
//! exactly, including their quirks. `integration-tests/hashing.rs` proves equality with a
//! real server over thousands of values.
//!
//! The core is Bob Jenkins' lookup3 (2006, public domain) as adapted by PostgreSQL:
//! three 32-bit lanes `a`, `b`, `c` absorb the key twelve bytes at a time, with a
//! reversible `mix` between blocks and an avalanching `final` at the end; the 64-bit
//! result is `(b << 32) | c`.
//!
//! Byte order: PostgreSQL reads key words in the machine's byte order, so its hashes
//! differ between little- and big-endian servers. We always compute the little-endian
//! (x86_64, aarch64) result; big-endian servers are not supported.

/// lookup3's initial lane value: the golden ratio constant Jenkins uses.
const GOLDEN_RATIO: u32 = 0x9e37_79b9;
/// PostgreSQL adds this to the initial lane value on top of lookup3's `length`; it is
/// an arbitrary constant kept for compatibility with hashes already stored on disk.
const PG_INIT_EXTRA: u32 = 3_923_095;

/// The three lanes of lookup3's internal state.
struct Lanes {
    a: u32,
    b: u32,
    c: u32,
}

impl Lanes {
    /// The starting state for a key of `len` bytes. A non-zero seed perturbs `a` and `b`
    /// with its halves and is mixed in before any key data, so that seed 0 reproduces the
    /// unseeded (non-extended) hash and other seeds give independent hash functions.
    fn new(len: u32, seed: u64) -> Lanes {
        let init = GOLDEN_RATIO.wrapping_add(len).wrapping_add(PG_INIT_EXTRA);
        let mut lanes = Lanes {
            a: init,
            b: init,
            c: init,
        };
        if seed != 0 {
            lanes.a = lanes.a.wrapping_add((seed >> 32) as u32);
            lanes.b = lanes.b.wrapping_add(seed as u32);
            lanes.mix();
        }
        lanes
    }

    /// lookup3 `mix`: reversible, so no entropy is lost between blocks; each step
    /// subtracts, xors in a rotation of another lane and adds. The rotation amounts are
    /// Jenkins' tuned constants; changing any of them changes every hash.
    fn mix(&mut self) {
        let Lanes { a, b, c } = self;
        *a = a.wrapping_sub(*c);
        *a ^= c.rotate_left(4);
        *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a);
        *b ^= a.rotate_left(6);
        *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b);
        *c ^= b.rotate_left(8);
        *b = b.wrapping_add(*a);
        *a = a.wrapping_sub(*c);
        *a ^= c.rotate_left(16);
        *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a);
        *b ^= a.rotate_left(19);
        *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b);
        *c ^= b.rotate_left(4);
        *b = b.wrapping_add(*a);
    }

    /// lookup3 `final`: makes every input bit affect every bit of `b` and `c`. Unlike
    /// Jenkins' `hashlittle`, PostgreSQL runs it even when no tail bytes remain.
    fn finish(mut self) -> u64 {
        let Lanes { a, b, c } = &mut self;
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(14));
        *a ^= *c;
        *a = a.wrapping_sub(c.rotate_left(11));
        *b ^= *a;
        *b = b.wrapping_sub(a.rotate_left(25));
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(16));
        *a ^= *c;
        *a = a.wrapping_sub(c.rotate_left(4));
        *b ^= *a;
        *b = b.wrapping_sub(a.rotate_left(14));
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(24));
        (u64::from(self.b) << 32) | u64::from(self.c)
    }
}

/// A little-endian 32-bit word from exactly four bytes.
fn word(bytes: &[u8]) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(bytes);
    u32::from_le_bytes(w)
}

/// PostgreSQL's `hash_bytes_extended` (what `hash_any_extended` calls): the 64-bit
/// lookup3 hash of `data` with `seed`.
///
/// PostgreSQL has separate paths for word-aligned and unaligned keys; on a
/// little-endian machine both read the same little-endian words, so one path here
/// covers both.
pub fn hash_bytes_extended(data: &[u8], seed: u64) -> u64 {
    // PostgreSQL takes the length as a C int and adds it as uint32; values never exceed
    // 1 GB (varlena limit), so truncating keeps its result for every real key.
    let mut lanes = Lanes::new(data.len() as u32, seed);
    let mut blocks = data.chunks_exact(12);
    for block in &mut blocks {
        lanes.a = lanes.a.wrapping_add(word(&block[0..4]));
        lanes.b = lanes.b.wrapping_add(word(&block[4..8]));
        lanes.c = lanes.c.wrapping_add(word(&block[8..12]));
        lanes.mix();
    }

    // The last 0..=11 bytes. PostgreSQL's switch with fallthrough adds each present
    // byte at its position in a little-endian word; padding the tail with zeros and
    // adding whole words is the same sum, since absent bytes would add zero. The one
    // quirk: the tail's bytes 8..=10 go to bits 8..=31 of `c`, not 0..=23 ("the lowest
    // byte of c is reserved for the length", kept from lookup2), hence the shift. Byte
    // 11 is always zero here, so the shift loses nothing.
    let tail = blocks.remainder();
    let mut padded = [0u8; 12];
    padded[..tail.len()].copy_from_slice(tail);
    lanes.a = lanes.a.wrapping_add(word(&padded[0..4]));
    lanes.b = lanes.b.wrapping_add(word(&padded[4..8]));
    lanes.c = lanes.c.wrapping_add(word(&padded[8..12]) << 8);
    lanes.finish()
}

/// PostgreSQL's `hash_bytes_uint32_extended` (`hash_uint32_extended`): the hash of a
/// single 32-bit value. It is lookup3 with a 4-byte length and the word added to `a`;
/// PostgreSQL keeps it separate only to skip the generic loop, so on little-endian
/// machines it equals [`hash_bytes_extended`] of `k.to_le_bytes()`.
pub fn hash_uint32_extended(k: u32, seed: u64) -> u64 {
    let mut lanes = Lanes::new(4, seed);
    lanes.a = lanes.a.wrapping_add(k);
    lanes.finish()
}

/// PostgreSQL's `hashint8extended(int8, int8)`.
///
/// It folds the high half into the low half so that an int8 holding an int4 value hashes
/// like that int4 (`hashint4extended`): for `v >= 0` the high half is 0, for `v < 0` it is
/// all ones and is inverted to 0 first. Int2, int4 and int8 keys can therefore share one
/// keyspace and one function.
pub fn hashint8extended(v: i64, seed: u64) -> u64 {
    let hihalf = (v >> 32) as u32;
    let folded = if v >= 0 { hihalf } else { !hihalf };
    hash_uint32_extended(v as u32 ^ folded, seed)
}

/// PostgreSQL's `hashtextextended(text, int8)` for deterministic collations: the hash of
/// the text's bytes in the database encoding (UTF-8 for `&str`).
///
/// Nondeterministic (ICU, case- or accent-insensitive) collations hash a sort key instead
/// and are not supported: a column using one would route differently from the server.
pub fn hashtextextended<T: AsRef<[u8]> + ?Sized>(text: &T, seed: u64) -> u64 {
    hash_bytes_extended(text.as_ref(), seed)
}

/// PostgreSQL's `uuid_hash_extended(uuid, int8)`: the hash of the 16 bytes in network
/// (RFC 4122, as written) order.
pub fn uuid_hash_extended(uuid: &[u8; 16], seed: u64) -> u64 {
    hash_bytes_extended(uuid, seed)
}

/// The SQL type family of a sharding key, which picks the server's hash function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// smallint, integer, bigint: `hashint8extended`.
    Int,
    /// text, varchar (deterministic collations only): `hashtextextended`.
    Text,
    /// uuid: `uuid_hash_extended`.
    Uuid,
}

impl KeyType {
    /// The server's seeded hash function for this type.
    pub fn sql_function(self) -> &'static str {
        match self {
            KeyType::Int => "hashint8extended",
            KeyType::Text => "hashtextextended",
            KeyType::Uuid => "uuid_hash_extended",
        }
    }
}

/// A sharding key's value as the router sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyValue<'a> {
    /// Any smallint, integer or bigint value.
    Int(i64),
    /// Text in the database encoding (UTF-8).
    Text(&'a str),
    /// The 16 bytes of a uuid in the order it is written.
    Uuid([u8; 16]),
}

impl KeyValue<'_> {
    pub fn key_type(&self) -> KeyType {
        match self {
            KeyValue::Int(_) => KeyType::Int,
            KeyValue::Text(_) => KeyType::Text,
            KeyValue::Uuid(_) => KeyType::Uuid,
        }
    }
}

/// The hash a hash keyspace places `key` by: the server's function with seed 0.
pub fn key_hash(key: &KeyValue<'_>) -> u64 {
    match key {
        KeyValue::Int(v) => hashint8extended(*v, 0),
        KeyValue::Text(s) => hashtextextended(*s, 0),
        KeyValue::Uuid(u) => uuid_hash_extended(u, 0),
    }
}

/// The bucket of `hash` among `buckets`: its low bits.
///
/// `buckets` must be a power of two (the shard map validates it); otherwise the mask
/// would skip buckets. The server's `hash & (buckets - 1)` on its signed int8 result
/// keeps the same low bits, so both agree.
pub fn bucket(hash: u64, buckets: u32) -> u32 {
    debug_assert!(buckets.is_power_of_two(), "bucket count {buckets}");
    (hash & u64::from(buckets.wrapping_sub(1))) as u32
}

/// The SQL condition a server evaluates to tell whether a row's key is in buckets
/// `lo..=hi` of a keyspace with `buckets` buckets, e.g.
/// `(hashint8extended(user_id, 0) & 1023) BETWEEN 512 AND 1023`.
///
/// `column_sql` is inserted as is: the caller passes an already quoted identifier or
/// expression. PostgreSQL's hash is a signed int8, but `& mask` with a non-negative mask
/// yields the same non-negative low bits as [`bucket`].
pub fn membership_sql(
    column_sql: &str,
    key_type: KeyType,
    buckets: u32,
    lo: u32,
    hi: u32,
) -> String {
    debug_assert!(buckets.is_power_of_two(), "bucket count {buckets}");
    format!(
        "({}({column_sql}, 0) & {}) BETWEEN {lo} AND {hi}",
        key_type.sql_function(),
        buckets.wrapping_sub(1)
    )
}

#[cfg(test)]
mod tests;
