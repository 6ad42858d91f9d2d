//! Exact PostgreSQL `numeric` values for the merge: parse the text and binary wire
//! forms, compare, add, divide by a row count with PostgreSQL's result-scale rule, and
//! write both forms back. No floating point anywhere: sums and averages of `numeric`
//! must come out digit for digit as one server would print them.
//!
//! Values are kept as decimal digits (one byte per digit). That is slower than
//! PostgreSQL's base-10000 arithmetic but simple to check, and a merge only adds one
//! value per leg per group and divides once per group.

use std::cmp::Ordering;

use bytes::{BufMut, BytesMut};

/// PostgreSQL's `NUMERIC_MIN_SIG_DIGITS`: a division yields at least this many
/// significant digits.
const MIN_SIG_DIGITS: i64 = 16;
/// PostgreSQL's `NUMERIC_MAX_DISPLAY_SCALE`.
const MAX_DISPLAY_SCALE: i64 = 1000;
/// Digits per base-10000 "NumericDigit" of the binary form.
const DEC_DIGITS: usize = 4;

const SIGN_POS: u16 = 0x0000;
const SIGN_NEG: u16 = 0x4000;
const SIGN_NAN: u16 = 0xC000;
const SIGN_PINF: u16 = 0xD000;
const SIGN_NINF: u16 = 0xF000;
/// A valid display scale fits in 14 bits (`NUMERIC_DSCALE_MASK`).
const DSCALE_MASK: u16 = 0x3FFF;

/// A `numeric` value, ordered as PostgreSQL orders it:
/// -Infinity < every finite value < Infinity < NaN (NaN equals NaN).
#[derive(Debug, Clone)]
pub(crate) enum Numeric {
    NegInf,
    Finite(Decimal),
    PosInf,
    NaN,
}

/// A finite decimal. Invariants: `digits` are 0..=9, most significant first; the
/// last `scale` of them are the fraction (`scale` is PostgreSQL's display scale);
/// the integer part has no leading zero; zero is never negative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decimal {
    neg: bool,
    digits: Vec<u8>,
    scale: usize,
}

impl Decimal {
    fn new(neg: bool, mut digits: Vec<u8>, scale: usize) -> Decimal {
        let int_len = digits.len() - scale;
        let zeros = digits[..int_len].iter().take_while(|&&d| d == 0).count();
        digits.drain(..zeros);
        let neg = neg && digits.iter().any(|&d| d != 0);
        Decimal { neg, digits, scale }
    }

    fn int_part(&self) -> &[u8] {
        &self.digits[..self.digits.len() - self.scale]
    }

    fn frac_part(&self) -> &[u8] {
        &self.digits[self.digits.len() - self.scale..]
    }

    fn cmp_magnitude(&self, other: &Decimal) -> Ordering {
        let (a, b) = (self.int_part().len(), other.int_part().len());
        a.cmp(&b).then_with(|| {
            let n = self.digits.len().max(other.digits.len());
            (0..n)
                .map(|i| {
                    let x = self.digits.get(i).copied().unwrap_or(0);
                    let y = other.digits.get(i).copied().unwrap_or(0);
                    x.cmp(&y)
                })
                .find(|o| o.is_ne())
                .unwrap_or(Ordering::Equal)
        })
    }

    /// The digits scaled to `scale` fraction digits (`scale >= self.scale`).
    fn scaled(&self, scale: usize) -> Vec<u8> {
        let mut v = self.digits.clone();
        v.resize(v.len() + scale - self.scale, 0);
        v
    }

    fn add(&self, other: &Decimal) -> Decimal {
        let scale = self.scale.max(other.scale);
        let (a, b) = (self.scaled(scale), other.scaled(scale));
        if self.neg == other.neg {
            return Decimal::new(self.neg, add_magnitudes(&a, &b), scale);
        }
        match self.cmp_magnitude(other) {
            Ordering::Less => Decimal::new(other.neg, sub_magnitudes(&b, &a), scale),
            _ => Decimal::new(self.neg, sub_magnitudes(&a, &b), scale),
        }
    }

    /// PostgreSQL's weight (position of the leading base-10000 digit; 0 for the
    /// units group) and that leading base-10000 digit, as `select_div_scale` uses them.
    fn weight_and_first_digit(&self) -> (i64, u32) {
        let int = self.int_part();
        if !int.is_empty() {
            let weight = (int.len() - 1) / DEC_DIGITS;
            let first_len = int.len() - weight * DEC_DIGITS;
            return (weight as i64, digits_value(&int[..first_len]));
        }
        let frac = self.frac_part();
        match frac.iter().position(|&d| d != 0) {
            None => (0, 0),
            Some(p) => {
                let group = p / DEC_DIGITS;
                let start = group * DEC_DIGITS;
                let mut first = [0u8; DEC_DIGITS];
                for (i, d) in frac[start..].iter().take(DEC_DIGITS).enumerate() {
                    first[i] = *d;
                }
                (-(group as i64) - 1, digits_value(&first))
            }
        }
    }

    /// `self / count` rounded half away from zero to PostgreSQL's division scale.
    fn div_count(&self, count: u64) -> Decimal {
        let divisor = Decimal::from_i128(i128::from(count));
        let scale = division_scale(self, &divisor);
        // One guard digit beyond the result scale decides the rounding: the quotient
        // digits are exact (truncated), so "guard >= 5" is "remainder >= half".
        // An input finer than the (clamped) result scale is divided at its own scale
        // and the quotient truncated: truncating a floor is the floor at the coarser
        // scale.
        let work_scale = (scale + 1).max(self.scale);
        let dividend = self.scaled(work_scale);
        let mut quotient = Vec::with_capacity(dividend.len());
        let mut rem: u128 = 0;
        for d in dividend {
            rem = rem * 10 + u128::from(d);
            quotient.push((rem / u128::from(count)) as u8);
            rem %= u128::from(count);
        }
        quotient.truncate(quotient.len() - (work_scale - scale - 1));
        let guard = quotient.pop().unwrap_or(0);
        if guard >= 5 {
            quotient = add_magnitudes(&quotient, &[1]);
        }
        Decimal::new(self.neg, quotient, scale)
    }

    pub(crate) fn from_i128(v: i128) -> Decimal {
        let digits = v
            .unsigned_abs()
            .to_string()
            .bytes()
            .map(|b| b - b'0')
            .collect();
        Decimal::new(v < 0, digits, 0)
    }
}

/// PostgreSQL's `select_div_scale`: at least 16 significant digits, never fewer
/// fraction digits than either input shows.
fn division_scale(num: &Decimal, den: &Decimal) -> usize {
    let (w1, f1) = num.weight_and_first_digit();
    let (w2, f2) = den.weight_and_first_digit();
    let mut qweight = w1 - w2;
    if f1 <= f2 {
        qweight -= 1;
    }
    let scale = (MIN_SIG_DIGITS - qweight * DEC_DIGITS as i64)
        .max(num.scale as i64)
        .max(den.scale as i64)
        .clamp(0, MAX_DISPLAY_SCALE);
    scale as usize
}

fn digits_value(digits: &[u8]) -> u32 {
    digits.iter().fold(0, |acc, &d| acc * 10 + u32::from(d))
}

/// Sum of two big-endian digit strings.
fn add_magnitudes(a: &[u8], b: &[u8]) -> Vec<u8> {
    let n = a.len().max(b.len()) + 1;
    let mut out = vec![0u8; n];
    let mut carry = 0u8;
    for i in 0..n {
        let x = if i < a.len() { a[a.len() - 1 - i] } else { 0 };
        let y = if i < b.len() { b[b.len() - 1 - i] } else { 0 };
        let s = x + y + carry;
        out[n - 1 - i] = s % 10;
        carry = s / 10;
    }
    out
}

/// `a - b` for big-endian digit strings of equal scale with `a >= b`.
fn sub_magnitudes(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; a.len()];
    let mut borrow = 0i8;
    for i in 0..a.len() {
        let x = a[a.len() - 1 - i] as i8;
        let y = if i < b.len() {
            b[b.len() - 1 - i] as i8
        } else {
            0
        };
        let mut d = x - y - borrow;
        borrow = 0;
        if d < 0 {
            d += 10;
            borrow = 1;
        }
        out[a.len() - 1 - i] = d as u8;
    }
    out
}

impl Numeric {
    /// Parses numeric_out's text: `[-]digits[.digits]`, `NaN`, `Infinity`,
    /// `-Infinity`. A leading `+` is accepted; exponents are not (the server never
    /// prints them).
    pub(crate) fn parse_text(s: &[u8]) -> Option<Numeric> {
        match s {
            b"NaN" => return Some(Numeric::NaN),
            b"Infinity" => return Some(Numeric::PosInf),
            b"-Infinity" => return Some(Numeric::NegInf),
            _ => {}
        }
        let (neg, rest) = match s.split_first() {
            Some((b'-', rest)) => (true, rest),
            Some((b'+', rest)) => (false, rest),
            _ => (false, s),
        };
        let (int, frac) = match rest.iter().position(|&b| b == b'.') {
            Some(dot) => (&rest[..dot], &rest[dot + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        if int.len() + frac.len() == 0 || !int.iter().chain(frac).all(u8::is_ascii_digit) {
            return None;
        }
        let digits = int.iter().chain(frac).map(|b| b - b'0').collect();
        Some(Numeric::Finite(Decimal::new(neg, digits, frac.len())))
    }

    /// Decodes numeric_send's binary form: ndigits, weight, sign, dscale (all 16-bit)
    /// and `ndigits` base-10000 digits.
    pub(crate) fn decode_binary(buf: &[u8]) -> Option<Numeric> {
        let word = |i: usize| {
            buf.get(2 * i..2 * i + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
        };
        let ndigits = usize::try_from(word(0)? as i16).ok()?;
        let weight = i64::from(word(1)? as i16);
        let sign = word(2)?;
        let dscale = word(3)?;
        if buf.len() != 8 + 2 * ndigits || dscale & !DSCALE_MASK != 0 {
            return None;
        }
        let neg = match sign {
            SIGN_POS => false,
            SIGN_NEG => true,
            SIGN_NAN => return Some(Numeric::NaN),
            SIGN_PINF => return Some(Numeric::PosInf),
            SIGN_NINF => return Some(Numeric::NegInf),
            _ => return None,
        };
        let groups: Vec<u16> = (0..ndigits).map(|i| word(4 + i)).collect::<Option<_>>()?;
        if groups.iter().any(|&g| g > 9999) {
            return None;
        }
        // The base-10000 digit of weight `w` (0 beyond the stored digits).
        let group_at = |w: i64| -> u16 {
            usize::try_from(weight - w)
                .ok()
                .and_then(|i| groups.get(i).copied())
                .unwrap_or(0)
        };
        let scale = usize::from(dscale);
        let frac_groups = scale.div_ceil(DEC_DIGITS) as i64;
        let mut digits = Vec::new();
        let mut push_group = |g: u16| {
            digits.extend_from_slice(&[
                (g / 1000) as u8,
                (g / 100 % 10) as u8,
                (g / 10 % 10) as u8,
                (g % 10) as u8,
            ])
        };
        for w in (0..=weight.max(-1)).rev() {
            push_group(group_at(w));
        }
        for w in 1..=frac_groups {
            push_group(group_at(-w));
        }
        // Drop fraction digits beyond the display scale (the server never sends any).
        digits.truncate(digits.len() - (frac_groups as usize * DEC_DIGITS - scale));
        Some(Numeric::Finite(Decimal::new(neg, digits, scale)))
    }

    pub(crate) fn to_text(&self) -> String {
        match self {
            Numeric::NaN => "NaN".into(),
            Numeric::PosInf => "Infinity".into(),
            Numeric::NegInf => "-Infinity".into(),
            Numeric::Finite(d) => {
                let mut s = String::with_capacity(d.digits.len() + 2);
                if d.neg {
                    s.push('-');
                }
                if d.int_part().is_empty() {
                    s.push('0');
                }
                s.extend(d.int_part().iter().map(|&x| char::from(b'0' + x)));
                if d.scale > 0 {
                    s.push('.');
                    s.extend(d.frac_part().iter().map(|&x| char::from(b'0' + x)));
                }
                s
            }
        }
    }

    /// numeric_send's form. `None` when the value cannot be represented (more than
    /// 32767 base-10000 digits): the caller reports it as out of range.
    pub(crate) fn encode_binary(&self, out: &mut BytesMut) -> Option<()> {
        let d = match self {
            Numeric::NaN => return put_header(out, 0, 0, SIGN_NAN, 0),
            Numeric::PosInf => return put_header(out, 0, 0, SIGN_PINF, 0),
            Numeric::NegInf => return put_header(out, 0, 0, SIGN_NINF, 0),
            Numeric::Finite(d) => d,
        };
        let int = d.int_part();
        let pad_left = (DEC_DIGITS - int.len() % DEC_DIGITS) % DEC_DIGITS;
        let pad_right = (DEC_DIGITS - d.scale % DEC_DIGITS) % DEC_DIGITS;
        let mut padded = vec![0u8; pad_left];
        padded.extend_from_slice(&d.digits);
        padded.resize(padded.len() + pad_right, 0);
        let mut groups: Vec<u16> = padded
            .chunks(DEC_DIGITS)
            .map(|c| c.iter().fold(0u16, |acc, &x| acc * 10 + u16::from(x)))
            .collect();
        let mut weight = ((pad_left + int.len()) / DEC_DIGITS) as i64 - 1;
        let leading = groups.iter().take_while(|&&g| g == 0).count();
        groups.drain(..leading);
        weight -= leading as i64;
        while groups.last() == Some(&0) {
            groups.pop();
        }
        if groups.is_empty() {
            weight = 0;
        }
        let ndigits = i16::try_from(groups.len()).ok()?;
        let weight = i16::try_from(weight).ok()?;
        let dscale = u16::try_from(d.scale)
            .ok()
            .filter(|s| s & !DSCALE_MASK == 0)?;
        let sign = if d.neg { SIGN_NEG } else { SIGN_POS };
        put_header(out, ndigits, weight, sign, dscale)?;
        for g in groups {
            out.put_u16(g);
        }
        Some(())
    }

    /// PostgreSQL's `numeric_add`, including its NaN and infinity rules.
    pub(crate) fn add(&self, other: &Numeric) -> Numeric {
        use Numeric::*;
        match (self, other) {
            (NaN, _) | (_, NaN) | (PosInf, NegInf) | (NegInf, PosInf) => NaN,
            (PosInf, _) | (_, PosInf) => PosInf,
            (NegInf, _) | (_, NegInf) => NegInf,
            (Finite(a), Finite(b)) => Finite(a.add(b)),
        }
    }

    /// `self / count` as `avg` computes it (`numeric_div` of the sum by the count);
    /// `count` must be positive.
    pub(crate) fn div_count(&self, count: u64) -> Numeric {
        match self {
            Numeric::Finite(d) if count > 0 => Numeric::Finite(d.div_count(count)),
            Numeric::Finite(_) => Numeric::NaN,
            other => other.clone(),
        }
    }
}

fn put_header(out: &mut BytesMut, ndigits: i16, weight: i16, sign: u16, dscale: u16) -> Option<()> {
    out.put_i16(ndigits);
    out.put_i16(weight);
    out.put_u16(sign);
    out.put_u16(dscale);
    Some(())
}

impl Ord for Numeric {
    fn cmp(&self, other: &Numeric) -> Ordering {
        use Numeric::*;
        let rank = |n: &Numeric| match n {
            NegInf => 0,
            Finite(_) => 1,
            PosInf => 2,
            NaN => 3,
        };
        match (self, other) {
            (Finite(a), Finite(b)) => match (a.neg, b.neg) {
                (false, true) => Ordering::Greater,
                (true, false) => Ordering::Less,
                (false, false) => a.cmp_magnitude(b),
                (true, true) => b.cmp_magnitude(a),
            },
            _ => rank(self).cmp(&rank(other)),
        }
    }
}

/// Equality is numeric equality (1.0 = 1.00), consistent with `Ord`.
impl PartialEq for Numeric {
    fn eq(&self, other: &Numeric) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Numeric {}

impl PartialOrd for Numeric {
    fn partial_cmp(&self, other: &Numeric) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
