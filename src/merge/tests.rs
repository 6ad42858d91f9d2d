use bytes::{BufMut, BytesMut};
use proptest::prelude::*;

use super::value::oid;
use super::*;
use crate::protocol::decode_frame;
use crate::protocol::messages::{put_cstr, put_msg};

// ---- frames the legs send ----

fn row_description(columns: &[(u32, i16)]) -> Vec<u8> {
    let mut b = BytesMut::new();
    put_msg(&mut b, b'T', |b| {
        b.put_i16(columns.len() as i16);
        for (i, (type_oid, format)) in columns.iter().enumerate() {
            put_cstr(b, &format!("c{i}"));
            b.put_i32(0);
            b.put_i16(0);
            b.put_u32(*type_oid);
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(*format);
        }
    });
    b.to_vec()
}

fn text_columns(oids: &[u32]) -> Vec<u8> {
    row_description(&oids.iter().map(|&o| (o, 0)).collect::<Vec<_>>())
}

fn data_row(fields: &[Option<&[u8]>]) -> Vec<u8> {
    let mut b = BytesMut::new();
    put_msg(&mut b, b'D', |b| {
        b.put_i16(fields.len() as i16);
        for f in fields {
            match f {
                None => b.put_i32(-1),
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v);
                }
            }
        }
    });
    b.to_vec()
}

/// A row of text values; "NULL" is NULL.
fn text_row(fields: &[&str]) -> Vec<u8> {
    let fields: Vec<Option<&[u8]>> = fields
        .iter()
        .map(|f| (*f != "NULL").then_some(f.as_bytes()))
        .collect();
    data_row(&fields)
}

fn complete(tag: &str) -> Vec<u8> {
    let mut b = BytesMut::new();
    messages::command_complete(&mut b, tag);
    b.to_vec()
}

fn error(code: &str) -> Vec<u8> {
    let mut b = BytesMut::new();
    messages::error_fields(&mut b, b'E', "ERROR", code, "boom");
    b.to_vec()
}

// ---- what the client receives ----

#[derive(Debug, PartialEq)]
enum Out {
    Description(usize),
    NoData,
    Row(Vec<Option<String>>),
    Complete(String),
    Error(String),
}

fn decode(out: &mut BytesMut) -> Vec<Out> {
    let mut msgs = Vec::new();
    while let Some(frame) = decode_frame(out, usize::MAX).unwrap() {
        let body = frame.body();
        msgs.push(match frame.tag {
            b'T' => Out::Description(i16::from_be_bytes([body[0], body[1]]) as usize),
            b'n' => Out::NoData,
            b'D' => {
                let row = wire::decode_data_row(
                    frame.raw.clone(),
                    i16::from_be_bytes([body[0], body[1]]) as usize,
                    0,
                )
                .unwrap();
                Out::Row(
                    (0..row.fields.len())
                        .map(|i| {
                            row.field(i)
                                .map(|v| String::from_utf8_lossy(&v).into_owned())
                        })
                        .collect(),
                )
            }
            b'C' => Out::Complete(String::from_utf8_lossy(&body[..body.len() - 1]).into_owned()),
            b'E' => Out::Error(messages::decode_error_fields(&frame).0),
            other => panic!("unexpected message {}", other as char),
        });
    }
    assert!(out.is_empty());
    msgs
}

fn drain(m: &mut Merger) -> Vec<Out> {
    let mut out = BytesMut::new();
    m.drain(&mut out);
    decode(&mut out)
}

fn rows(msgs: &[Out]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter_map(|m| match m {
            Out::Row(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

/// The first column of every row, "NULL" for NULL.
fn firsts(msgs: &[Out]) -> Vec<String> {
    rows(msgs)
        .into_iter()
        .map(|r| r[0].clone().unwrap_or_else(|| "NULL".into()))
        .collect()
}

/// Runs a whole merge: each leg sends the description, its rows and "SELECT n".
fn run(plan: MergePlan, types: &[u32], legs: &[&[&[&str]]]) -> Vec<Out> {
    let mut m = Merger::new(plan, legs.len());
    let mut msgs = Vec::new();
    for (leg, leg_rows) in legs.iter().enumerate() {
        m.push(leg, &text_columns(types)).unwrap();
        for row in leg_rows.iter() {
            m.push(leg, &text_row(row)).unwrap();
        }
        m.push(leg, &complete(&format!("SELECT {}", leg_rows.len())))
            .unwrap();
    }
    msgs.extend(drain(&mut m));
    assert!(m.finished());
    msgs
}

fn sorted(column: usize, descending: bool, nulls_first: bool) -> MergePlan {
    MergePlan {
        sort: vec![SortKey {
            column,
            descending,
            nulls_first,
        }],
        ..MergePlan::default()
    }
}

// ---- plain and sorted merges ----

#[test]
fn unsorted_results_are_concatenated_under_one_description() {
    let mut m = Merger::new(MergePlan::default(), 2);
    m.push(0, &text_columns(&[oid::INT4])).unwrap();
    m.push(0, &text_row(&["1"])).unwrap();
    assert_eq!(
        drain(&mut m),
        [Out::Description(1), Out::Row(vec![Some("1".into())])]
    );
    m.push(1, &text_columns(&[oid::INT4])).unwrap();
    m.push(1, &text_row(&["2"])).unwrap();
    m.push(1, &text_row(&["3"])).unwrap();
    m.push(0, &complete("SELECT 1")).unwrap();
    assert_eq!(firsts(&drain(&mut m)), ["2", "3"]);
    assert!(!m.finished());
    m.push(1, &complete("SELECT 2")).unwrap();
    assert_eq!(drain(&mut m), [Out::Complete("SELECT 3".into())]);
    assert!(m.finished());
    assert!(drain(&mut m).is_empty());
}

#[test]
fn sorted_merge_ascending_nulls_last_across_three_legs() {
    let legs: [&[&[&str]]; 3] = [
        &[&["1"], &["4"], &["NULL"]],
        &[&["2"], &["2"], &["9"]],
        &[&["-3"], &["10"], &["NULL"]],
    ];
    let msgs = run(sorted(0, false, false), &[oid::INT4], &legs);
    assert_eq!(
        firsts(&msgs),
        ["-3", "1", "2", "2", "4", "9", "10", "NULL", "NULL"]
    );
    assert_eq!(msgs.first(), Some(&Out::Description(1)));
    assert_eq!(msgs.last(), Some(&Out::Complete("SELECT 9".into())));
}

#[test]
fn sorted_merge_descending_nulls_first_across_three_legs() {
    let legs: [&[&[&str]]; 3] = [
        &[&["NULL"], &["4"], &["1"]],
        &[&["9"], &["2"]],
        &[&["NULL"], &["10"], &["-3"]],
    ];
    let msgs = run(sorted(0, true, true), &[oid::INT8], &legs);
    assert_eq!(
        firsts(&msgs),
        ["NULL", "NULL", "10", "9", "4", "2", "1", "-3"]
    );
    // DESC NULLS LAST and ASC NULLS FIRST too.
    let msgs = run(
        sorted(0, true, false),
        &[oid::INT8],
        &[&[&["3"], &["NULL"]], &[&["5"], &["NULL"]]],
    );
    assert_eq!(firsts(&msgs), ["5", "3", "NULL", "NULL"]);
    let msgs = run(
        sorted(0, false, true),
        &[oid::INT8],
        &[&[&["NULL"], &["3"]], &[&["NULL"], &["5"]]],
    );
    assert_eq!(firsts(&msgs), ["NULL", "NULL", "3", "5"]);
}

#[test]
fn equal_keys_keep_leg_order() {
    let plan = sorted(0, false, false);
    let msgs = run(
        plan,
        &[oid::INT4, oid::TEXT],
        &[&[&["1", "a0"], &["2", "a1"]], &[&["1", "b0"], &["2", "b1"]]],
    );
    let second: Vec<_> = rows(&msgs)
        .into_iter()
        .map(|r| r[1].clone().unwrap())
        .collect();
    assert_eq!(second, ["a0", "b0", "a1", "b1"]);
}

#[test]
fn integers_compare_as_numbers_and_text_as_bytes() {
    let legs: [&[&[&str]]; 2] = [&[&["9"]], &[&["10"]]];
    assert_eq!(
        firsts(&run(sorted(0, false, false), &[oid::INT4], &legs)),
        ["9", "10"]
    );
    assert_eq!(
        firsts(&run(sorted(0, false, false), &[oid::TEXT], &legs)),
        ["10", "9"]
    );
    assert_eq!(
        firsts(&run(sorted(0, false, false), &[oid::VARCHAR], &legs)),
        ["10", "9"]
    );
    // Numeric and floats by value, not by text.
    let legs: [&[&[&str]]; 2] = [
        &[&["-1.5"], &["2.10"], &["NaN"]],
        &[&["-10"], &["2.0999"], &["Infinity"]],
    ];
    assert_eq!(
        firsts(&run(sorted(0, false, false), &[oid::NUMERIC], &legs)),
        ["-10", "-1.5", "2.0999", "2.10", "Infinity", "NaN"]
    );
    assert_eq!(
        firsts(&run(sorted(0, false, false), &[oid::FLOAT8], &legs)),
        ["-10", "-1.5", "2.0999", "2.10", "Infinity", "NaN"]
    );
}

#[test]
fn timestamptz_compares_as_instants_across_offsets() {
    // Each leg arrives in the server's order; the text alone would misplace 00:45+00.
    let legs: [&[&[&str]]; 2] = [
        &[&["2024-03-31 01:30:00+01"], &["2024-03-31 03:10:00+02"]],
        &[&["0044-03-15 12:00:00+00 BC"], &["2024-03-31 00:45:00+00"]],
    ];
    assert_eq!(
        firsts(&run(sorted(0, false, false), &[oid::TIMESTAMPTZ], &legs)),
        [
            "0044-03-15 12:00:00+00 BC",
            "2024-03-31 01:30:00+01",
            "2024-03-31 00:45:00+00",
            "2024-03-31 03:10:00+02"
        ]
    );
    let dates: [&[&[&str]]; 2] = [
        &[&["9999-12-31"], &["infinity"]],
        &[&["-infinity"], &["10000-01-01"]],
    ];
    assert_eq!(
        firsts(&run(sorted(0, false, false), &[oid::DATE], &dates)),
        ["-infinity", "9999-12-31", "10000-01-01", "infinity"]
    );
}

#[test]
fn binary_int8_and_text_columns_sort_by_type() {
    let mut m = Merger::new(
        MergePlan {
            sort: vec![
                SortKey {
                    column: 0,
                    descending: false,
                    nulls_first: false,
                },
                SortKey {
                    column: 1,
                    descending: true,
                    nulls_first: false,
                },
            ],
            ..MergePlan::default()
        },
        2,
    );
    let desc = row_description(&[(oid::INT8, 1), (oid::TEXT, 0)]);
    let row = |v: i64, s: &str| data_row(&[Some(&v.to_be_bytes()), Some(s.as_bytes())]);
    m.push(0, &desc).unwrap();
    m.push(1, &desc).unwrap();
    // Negative int8 in two's complement would sort after positives by bytes.
    for (leg, rows) in [
        (0, vec![(-5, "x"), (7, "b")]),
        (1, vec![(-5, "y"), (7, "a"), (300, "z")]),
    ] {
        for (v, s) in rows {
            m.push(leg, &row(v, s)).unwrap();
        }
        m.push(leg, &complete("SELECT 2")).unwrap();
    }
    let mut out = BytesMut::new();
    m.drain(&mut out);
    let mut got = Vec::new();
    while let Some(f) = decode_frame(&mut out, usize::MAX).unwrap() {
        if f.tag == b'D' {
            let row = wire::decode_data_row(f.raw, 2, 0).unwrap();
            let v = i64::from_be_bytes(row.field(0).unwrap()[..].try_into().unwrap());
            got.push((
                v,
                String::from_utf8(row.field(1).unwrap().to_vec()).unwrap(),
            ));
        }
    }
    let expected = [(-5, "y"), (-5, "x"), (7, "b"), (7, "a"), (300, "z")];
    assert_eq!(got, expected.map(|(v, s)| (v, s.to_owned())));
}

#[test]
fn limit_and_offset_apply_after_the_merge() {
    let mut plan = sorted(0, false, false);
    plan.limit = Some(3);
    plan.offset = 2;
    let mut m = Merger::new(plan, 2);
    m.push(0, &text_columns(&[oid::INT4])).unwrap();
    m.push(1, &text_columns(&[oid::INT4])).unwrap();
    for v in ["1", "3", "5", "7"] {
        m.push(0, &text_row(&[v])).unwrap();
    }
    for v in ["2", "4", "6"] {
        m.push(1, &text_row(&[v])).unwrap();
    }
    assert!(!m.satisfied());
    let msgs = drain(&mut m);
    // 1 and 2 skipped; 3, 4, 5 sent; leg 1 has 6 buffered, leg 0 has 7: enough.
    assert_eq!(firsts(&msgs), ["3", "4", "5"]);
    assert_eq!(msgs.last(), Some(&Out::Complete("SELECT 3".into())));
    assert!(m.satisfied() && m.finished());
    assert!(!m.wants(0) && !m.wants(1));
    // Late frames (e.g. a leg's answer to the cancel) are dropped.
    m.push(1, &error("57014")).unwrap();
    assert!(drain(&mut m).is_empty());
}

#[test]
fn limit_on_an_unsorted_merge_and_limit_zero() {
    let mut plan = MergePlan {
        limit: Some(2),
        ..MergePlan::default()
    };
    let msgs = run(plan.clone(), &[oid::INT4], &[&[&["1"]], &[&["2"], &["3"]]]);
    assert_eq!(firsts(&msgs), ["1", "2"]);
    assert_eq!(msgs.last(), Some(&Out::Complete("SELECT 2".into())));

    plan.limit = Some(0);
    let mut m = Merger::new(plan, 2);
    assert!(!m.satisfied(), "nothing to describe the result with yet");
    m.push(1, &text_columns(&[oid::INT4])).unwrap();
    assert!(m.satisfied());
    assert_eq!(
        drain(&mut m),
        [Out::Description(1), Out::Complete("SELECT 0".into())]
    );
}

#[test]
fn wants_follows_the_sort_and_buffers_stay_bounded() {
    let mut m = Merger::new(MergePlan::default(), 2);
    m.push(0, &text_columns(&[oid::INT4])).unwrap();
    m.push(0, &text_row(&["1"])).unwrap();
    assert!(m.wants(0) && m.wants(1), "unsorted: every unfinished leg");
    assert_eq!(m.buffered(0), 1);
    m.push(0, &complete("SELECT 1")).unwrap();
    assert!(!m.wants(0) && m.wants(1));

    let mut m = Merger::new(sorted(0, false, false), 2);
    assert!(m.wants(0) && m.wants(1));
    m.push(0, &text_columns(&[oid::INT4])).unwrap();
    m.push(0, &text_row(&["1"])).unwrap();
    assert!(
        !m.wants(0) && m.wants(1),
        "sorted: only legs with nothing buffered"
    );
    assert!(
        drain(&mut m).iter().all(|o| !matches!(o, Out::Row(_))),
        "leg 1 may hold a smaller row"
    );
    m.push(1, &text_columns(&[oid::INT4])).unwrap();
    m.push(1, &text_row(&["2"])).unwrap();
    assert_eq!(firsts(&drain(&mut m)), ["1"]);
    assert!(m.wants(0) && !m.wants(1));
    assert_eq!((m.buffered(0), m.buffered(1)), (0, 1));
    assert!(!m.wants(7));
    assert_eq!(m.buffered(7), 0);
}

/// A caller that reads a leg only while `wants` says so or its buffer is below a
/// bound: a big ORDER BY over two shards never holds more than the bound per leg.
#[test]
fn a_large_sorted_merge_streams_with_bounded_buffers() {
    const ROWS: i64 = 50_000;
    const BOUND: usize = 8;
    let mut m = Merger::new(sorted(0, false, false), 2);
    let mut next = [0i64; 2];
    let mut announced = [false; 2];
    let mut out = BytesMut::new();
    let (mut max_buffered, mut received, mut last) = (0, 0i64, i64::MIN);
    while !m.finished() {
        for leg in 0..2 {
            let may_read = m.wants(leg) || m.buffered(leg) < BOUND;
            if !may_read || next[leg] > ROWS {
                continue;
            }
            if !announced[leg] {
                m.push(leg, &text_columns(&[oid::INT8])).unwrap();
                announced[leg] = true;
            } else if next[leg] < ROWS {
                // Leg 0 holds even numbers, leg 1 odd ones.
                let v = 2 * next[leg] + leg as i64;
                m.push(leg, &text_row(&[&v.to_string()])).unwrap();
                next[leg] += 1;
            } else {
                m.push(leg, &complete(&format!("SELECT {ROWS}"))).unwrap();
                next[leg] += 1;
            }
            max_buffered = max_buffered.max(m.buffered(leg));
        }
        m.drain(&mut out);
        for msg in decode(&mut out) {
            if let Out::Row(r) = msg {
                let v: i64 = r[0].as_ref().unwrap().parse().unwrap();
                assert!(v > last);
                last = v;
                received += 1;
            }
        }
    }
    assert_eq!(received, 2 * ROWS);
    assert!(max_buffered <= BOUND, "held {max_buffered} rows on one leg");
}

// ---- the command tag ----

#[test]
fn command_tag_counts_rows_actually_sent() {
    let mut m = Merger::new(MergePlan::default(), 2);
    for leg in 0..2 {
        m.push(leg, &text_columns(&[oid::INT4])).unwrap();
        m.push(leg, &text_row(&["1"])).unwrap();
        m.push(leg, &complete("FETCH 1")).unwrap();
    }
    assert_eq!(drain(&mut m).last(), Some(&Out::Complete("FETCH 2".into())));

    let msgs = run(MergePlan::default(), &[oid::INT4], &[&[], &[]]);
    assert_eq!(
        msgs,
        [Out::Description(1), Out::Complete("SELECT 0".into())]
    );
}

#[test]
fn nodata_and_rows_without_description() {
    let mut m = Merger::new(MergePlan::default(), 2);
    let mut nodata = BytesMut::new();
    messages::empty_msg(&mut nodata, b'n');
    m.push(0, &nodata).unwrap();
    m.push(1, &nodata).unwrap();
    m.push(0, &complete("SELECT 0")).unwrap();
    m.push(1, &complete("SELECT 0")).unwrap();
    assert_eq!(
        drain(&mut m),
        [Out::NoData, Out::Complete("SELECT 0".into())]
    );

    // Extended protocol, Execute only: rows flow without a description...
    let mut m = Merger::new(MergePlan::default(), 2);
    m.push(0, &text_row(&["a"])).unwrap();
    m.push(1, &text_row(&["b"])).unwrap();
    m.push(0, &complete("SELECT 1")).unwrap();
    m.push(1, &complete("SELECT 1")).unwrap();
    assert_eq!(firsts(&drain(&mut m)), ["a", "b"]);
    // ...but a sort needs the types, which `describe` supplies.
    let mut m = Merger::new(sorted(0, false, false), 2);
    assert_eq!(
        m.push(0, &text_row(&["10"])),
        Err(MergeError::NoDescription)
    );
    let mut m = Merger::new(sorted(0, false, false), 2);
    m.describe(&text_columns(&[oid::INT4])).unwrap();
    for (leg, v) in [(0, "10"), (1, "9")] {
        m.push(leg, &text_row(&[v])).unwrap();
        m.push(leg, &complete("SELECT 1")).unwrap();
    }
    let msgs = drain(&mut m);
    assert_eq!(firsts(&msgs), ["9", "10"]);
    assert!(!msgs.contains(&Out::Description(1)));
}

// ---- errors ----

#[test]
fn an_error_on_one_leg_yields_exactly_one_error_response() {
    let mut m = Merger::new(sorted(0, false, false), 3);
    m.push(0, &text_columns(&[oid::INT4])).unwrap();
    m.push(0, &text_row(&["1"])).unwrap();
    m.push(1, &error("22012")).unwrap();
    assert!(!m.wants(0) && !m.wants(2));
    m.push(2, &error("57014")).unwrap();
    m.push(2, &text_columns(&[oid::INT4])).unwrap();
    assert_eq!(drain(&mut m), [Out::Error("22012".into())]);
    assert!(m.finished());
    m.push(0, &complete("SELECT 1")).unwrap();
    assert!(drain(&mut m).is_empty());
}

#[test]
fn mismatched_descriptions_are_errors() {
    let mut m = Merger::new(MergePlan::default(), 2);
    m.push(0, &text_columns(&[oid::INT4, oid::TEXT])).unwrap();
    let err = m
        .push(1, &text_columns(&[oid::INT8, oid::TEXT]))
        .unwrap_err();
    assert!(
        matches!(err, MergeError::DescriptionMismatch { leg: 1, .. }),
        "{err}"
    );
    assert_eq!(
        m.push(0, &text_row(&["1", "a"])),
        Err(err),
        "the merge stays failed"
    );
    assert!(drain(&mut m).is_empty());

    let mut m = Merger::new(MergePlan::default(), 2);
    m.push(0, &text_columns(&[oid::INT4])).unwrap();
    assert!(m.push(1, &text_columns(&[oid::INT4, oid::INT4])).is_err());

    let mut m = Merger::new(MergePlan::default(), 2);
    m.push(0, &row_description(&[(oid::INT4, 0)])).unwrap();
    assert!(
        m.push(1, &row_description(&[(oid::INT4, 1)])).is_err(),
        "format differs"
    );

    let mut m = Merger::new(MergePlan::default(), 2);
    m.push(0, &text_columns(&[oid::INT4])).unwrap();
    assert!(
        m.push(1, &text_row(&["1"])).is_err(),
        "rows before this leg's description"
    );
}

#[test]
fn malformed_input_is_an_error() {
    let mut m = Merger::new(MergePlan::default(), 1);
    assert!(matches!(
        m.push(3, &complete("SELECT 0")),
        Err(MergeError::NoSuchLeg { .. })
    ));
    let mut m = Merger::new(MergePlan::default(), 1);
    assert!(m.push(0, b"D\0\0").is_err());
    let mut m = Merger::new(MergePlan::default(), 1);
    m.push(0, &text_columns(&[oid::INT4])).unwrap();
    assert!(
        m.push(0, &text_row(&["1", "2"])).is_err(),
        "wrong field count"
    );
    let mut m = Merger::new(MergePlan::default(), 1);
    let mut ready = BytesMut::new();
    messages::ready_for_query(&mut ready, b'I');
    assert!(matches!(
        m.push(0, &ready),
        Err(MergeError::Unexpected { tag: b'Z', .. })
    ));
    let mut m = Merger::new(sorted(3, false, false), 1);
    assert!(matches!(
        m.push(0, &text_columns(&[oid::INT4])),
        Err(MergeError::Plan(_))
    ));
}

// ---- hidden columns and aggregates ----

#[test]
fn hidden_columns_never_reach_the_client() {
    let plan = MergePlan {
        hidden_columns: 2,
        ..sorted(2, false, false)
    };
    let msgs = run(
        plan,
        &[oid::TEXT, oid::INT4, oid::INT4, oid::INT8],
        &[&[&["a", "1", "2", "3"]], &[&["b", "4", "1", "6"]]],
    );
    assert_eq!(msgs[0], Out::Description(2));
    assert_eq!(
        rows(&msgs),
        [
            vec![Some("b".into()), Some("4".into())],
            vec![Some("a".into()), Some("1".into())]
        ]
    );
}

fn aggregate(columns: Vec<OutputColumn>, hidden: usize) -> MergePlan {
    MergePlan {
        aggregate: Some(AggregatePlan { columns }),
        hidden_columns: hidden,
        ..MergePlan::default()
    }
}

#[test]
fn keyless_count_sums_the_legs() {
    let msgs = run(
        aggregate(vec![OutputColumn::Count], 0),
        &[oid::INT8],
        &[&[&["40"]], &[&["2"]]],
    );
    assert_eq!(
        msgs,
        [
            Out::Description(1),
            Out::Row(vec![Some("42".into())]),
            Out::Complete("SELECT 1".into())
        ]
    );
}

#[test]
fn count_sum_min_max_avg_without_group_by() {
    use OutputColumn::*;
    // SELECT count(*), sum(x), min(x), max(x), avg(x) + hidden sum(x), count(x)
    // for x int4: sum -> int8, avg -> numeric.
    let plan = aggregate(
        vec![Count, Sum, Min, Max, Avg { sum: 5, count: 6 }, Sum, Count],
        2,
    );
    let types = [
        oid::INT8,
        oid::INT8,
        oid::INT4,
        oid::INT4,
        oid::NUMERIC,
        oid::INT8,
        oid::INT8,
    ];
    let msgs = run(
        plan,
        &types,
        &[
            &[&["2", "3", "1", "2", "1.5000000000000000", "3", "2"]],
            &[&["1", "NULL", "NULL", "NULL", "NULL", "NULL", "0"]],
            &[&["1", "-10", "-10", "-10", "-10.0000000000000000", "-10", "1"]],
        ],
    );
    assert_eq!(msgs[0], Out::Description(5));
    // avg(1, 2, -10) = -7/3 on a server: -2.3333333333333333.
    assert_eq!(
        rows(&msgs),
        [["4", "-7", "-10", "2", "-2.3333333333333333"]
            .map(|s| Some(s.to_owned()))
            .to_vec()]
    );
}

#[test]
fn avg_matches_the_servers_scale() {
    use OutputColumn::*;
    let plan = || aggregate(vec![Avg { sum: 1, count: 2 }, Sum, Count], 2);
    let avg = |types: [u32; 3], legs: &[&[&[&str]]]| firsts(&run(plan(), &types, legs))[0].clone();
    let ints = [oid::NUMERIC, oid::INT8, oid::INT8];
    // SELECT avg(x) FROM (VALUES (1),(2)) v(x) -> 1.5000000000000000
    assert_eq!(
        avg(ints, &[&[&["1", "1", "1"]], &[&["2", "2", "1"]]]),
        "1.5000000000000000"
    );
    assert_eq!(
        avg(ints, &[&[&["0", "10000", "1"]], &[&["0", "20001", "1"]]]),
        "15000.500000000000"
    );
    assert_eq!(avg(ints, &[&[&["0", "3", "3"]]]), "1.00000000000000000000");
    assert_eq!(
        avg(ints, &[&[&["0", "9999", "1"]], &[&["NULL", "NULL", "0"]]]),
        "9999.0000000000000000"
    );
    assert_eq!(avg(ints, &[&[&["NULL", "NULL", "0"]]]), "NULL");
    let numerics = [oid::NUMERIC, oid::NUMERIC, oid::INT8];
    assert_eq!(
        avg(
            numerics,
            &[&[&["0", "0.001", "1"]], &[&["0", "0.002", "1"]]]
        ),
        "0.00150000000000000000"
    );
    assert_eq!(
        avg(
            numerics,
            &[&[&["0", "0.00001", "1"]], &[&["0", "0.00003", "1"]]]
        ),
        "0.000020000000000000000000"
    );
    assert_eq!(
        avg(numerics, &[&[&["0", "1.25", "1"]], &[&["0", "1.5", "1"]]]),
        "1.37500000000000000000"
    );
    let floats = [oid::FLOAT8, oid::FLOAT8, oid::INT8];
    assert_eq!(
        avg(floats, &[&[&["0", "1", "1"]], &[&["0", "2.5", "2"]]]),
        "1.1666666666666667"
    );
}

#[test]
fn sums_are_exact() {
    use OutputColumn::*;
    let sum = |ty: u32, values: &[&str]| {
        let legs: Vec<Vec<Vec<&str>>> = values.iter().map(|v| vec![vec![*v]]).collect();
        let legs: Vec<Vec<&[&str]>> = legs
            .iter()
            .map(|l| l.iter().map(|r| r.as_slice()).collect())
            .collect();
        let legs: Vec<&[&[&str]]> = legs.iter().map(|l| l.as_slice()).collect();
        firsts(&run(aggregate(vec![Sum], 0), &[ty], &legs))[0].clone()
    };
    assert_eq!(sum(oid::NUMERIC, &["0.1", "0.2", "-0.30"]), "0.00");
    assert_eq!(
        sum(oid::NUMERIC, &["99999999999999999999999999999999.5", "0.5"]),
        "100000000000000000000000000000000.0"
    );
    assert_eq!(sum(oid::NUMERIC, &["1", "NaN"]), "NaN");
    assert_eq!(
        sum(oid::INT8, &["9223372036854775807", "-1"]),
        "9223372036854775806"
    );
    assert_eq!(sum(oid::FLOAT8, &["0.5", "1e+20"]), "1e+20");
    // int8 out of range across shards is the server's error, not a wrap-around.
    let msgs = run(
        aggregate(vec![Sum], 0),
        &[oid::INT8],
        &[&[&["9223372036854775807"]], &[&["1"]]],
    );
    assert_eq!(msgs, [Out::Description(1), Out::Error("22003".into())]);
}

#[test]
fn group_by_merges_groups_and_sorts_them() {
    use OutputColumn::*;
    let plan = MergePlan {
        sort: vec![SortKey {
            column: 1,
            descending: true,
            nulls_first: true,
        }],
        ..aggregate(vec![GroupKey, Count, Min, Max], 0)
    };
    let types = [oid::TEXT, oid::INT8, oid::NUMERIC, oid::TEXT];
    let msgs = run(
        plan,
        &types,
        &[
            &[&["a", "2", "1.5", "x"], &["NULL", "1", "3", "m"]],
            &[
                &["b", "5", "-2", "b"],
                &["a", "1", "1.25", "y"],
                &["NULL", "1", "NULL", "NULL"],
            ],
        ],
    );
    let s = |v: &[&str]| {
        v.iter()
            .map(|x| (*x != "NULL").then(|| x.to_string()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        rows(&msgs),
        [
            s(&["b", "5", "-2", "b"]),
            s(&["a", "3", "1.25", "y"]),
            s(&["NULL", "2", "3", "m"])
        ]
    );
    assert_eq!(msgs.last(), Some(&Out::Complete("SELECT 3".into())));
}

#[test]
fn binary_aggregates_encode_binary_values() {
    use OutputColumn::*;
    let plan = aggregate(vec![Count, Avg { sum: 2, count: 3 }, Sum, Count], 2);
    let desc = row_description(&[
        (oid::INT8, 1),
        (oid::NUMERIC, 1),
        (oid::NUMERIC, 1),
        (oid::INT8, 1),
    ]);
    let numeric = |text: &str| {
        let mut b = BytesMut::new();
        numeric::Numeric::parse_text(text.as_bytes())
            .unwrap()
            .encode_binary(&mut b)
            .unwrap();
        b.to_vec()
    };
    let mut m = Merger::new(plan, 2);
    for (leg, (n, sum)) in [(2i64, "1.5"), (1i64, "2.25")].into_iter().enumerate() {
        m.push(leg, &desc).unwrap();
        let avg = numeric("0");
        let sum = numeric(sum);
        m.push(
            leg,
            &data_row(&[
                Some(&n.to_be_bytes()),
                Some(&avg),
                Some(&sum),
                Some(&n.to_be_bytes()),
            ]),
        )
        .unwrap();
        m.push(leg, &complete("SELECT 1")).unwrap();
    }
    let mut out = BytesMut::new();
    m.drain(&mut out);
    let _description = decode_frame(&mut out, usize::MAX).unwrap().unwrap();
    let row = decode_frame(&mut out, usize::MAX).unwrap().unwrap();
    let row = wire::decode_data_row(row.raw, 2, 0).unwrap();
    assert_eq!(&row.field(0).unwrap()[..], 3i64.to_be_bytes());
    let avg = numeric::Numeric::decode_binary(&row.field(1).unwrap()).unwrap();
    // SELECT avg(x) FROM unnest(array[0.75, 1.5, 1.5]) x on a server.
    assert_eq!(avg.to_text(), "1.25000000000000000000");
}

// ---- values ----

#[test]
fn numeric_text_and_binary_round_trip() {
    for text in [
        "0",
        "0.00",
        "-1",
        "1.5",
        "-0.000123",
        "10000",
        "123456789.987654321",
        "0.0001",
        "NaN",
        "Infinity",
        "-Infinity",
        "99990000",
        "100000000.00000001",
    ] {
        let n = numeric::Numeric::parse_text(text.as_bytes()).unwrap();
        assert_eq!(n.to_text(), text);
        let mut b = BytesMut::new();
        n.encode_binary(&mut b).unwrap();
        let back = numeric::Numeric::decode_binary(&b).unwrap();
        assert_eq!(back.to_text(), text, "binary round trip");
    }
    assert_eq!(
        numeric::Numeric::parse_text(b"-0.0").unwrap().to_text(),
        "0.0"
    );
    assert!(numeric::Numeric::parse_text(b"1e5").is_none());
    assert!(numeric::Numeric::parse_text(b".").is_none());
    // 1.5 as numeric_send writes it: ndigits 2, weight 0, +, dscale 1, [1, 5000].
    let mut b = BytesMut::new();
    numeric::Numeric::parse_text(b"1.5")
        .unwrap()
        .encode_binary(&mut b)
        .unwrap();
    assert_eq!(&b[..], [0, 2, 0, 0, 0, 0, 0, 1, 0, 1, 0x13, 0x88]);
}

#[test]
fn floats_print_like_the_server() {
    // From a PostgreSQL 15 server: SELECT x::float8 / x::float4.
    let cases = [
        (1e14, "100000000000000"),
        (1e15, "1e+15"),
        (123456789012345.6, "123456789012345.6"),
        (1234567890123456.0, "1.234567890123456e+15"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (1.5e-7, "1.5e-07"),
        (-2.5e20, "-2.5e+20"),
        (0.0, "0"),
    ];
    for (v, text) in cases {
        assert_eq!(value::format_float(v, false), text);
    }
    assert_eq!(value::format_float(1e5, true), "100000");
    assert_eq!(value::format_float(1234567.0, true), "1.234567e+06");
    assert_eq!(value::format_float(f64::NAN, false), "NaN");
    assert_eq!(value::format_float(f64::NEG_INFINITY, false), "-Infinity");
}

// ---- never panic ----

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    put_msg(&mut b, tag, |b| b.put_slice(body));
    b.to_vec()
}

fn any_plan() -> impl Strategy<Value = MergePlan> {
    let column = prop_oneof![
        Just(OutputColumn::GroupKey),
        Just(OutputColumn::Count),
        Just(OutputColumn::Sum),
        Just(OutputColumn::Min),
        Just(OutputColumn::Max),
        (0usize..4, 0usize..4).prop_map(|(sum, count)| OutputColumn::Avg { sum, count }),
    ];
    (
        proptest::collection::vec((0usize..4, any::<bool>(), any::<bool>()), 0..3),
        proptest::option::of(0u64..5),
        0u64..3,
        proptest::option::of(proptest::collection::vec(column, 0..4)),
        0usize..3,
    )
        .prop_map(
            |(sort, limit, offset, aggregate, hidden_columns)| MergePlan {
                sort: sort
                    .into_iter()
                    .map(|(column, descending, nulls_first)| SortKey {
                        column,
                        descending,
                        nulls_first,
                    })
                    .collect(),
                limit,
                offset,
                aggregate: aggregate.map(|columns| AggregatePlan { columns }),
                hidden_columns,
            },
        )
}

/// Frames that are sometimes well-formed: a random header over random bytes, or a
/// real RowDescription/DataRow/CommandComplete with random contents.
fn any_frame() -> impl Strategy<Value = Vec<u8>> {
    let oids = prop_oneof![
        Just(oid::INT2),
        Just(oid::INT4),
        Just(oid::INT8),
        Just(oid::FLOAT4),
        Just(oid::FLOAT8),
        Just(oid::NUMERIC),
        Just(oid::DATE),
        Just(oid::TIMESTAMPTZ),
        Just(oid::TIMETZ),
        Just(oid::TEXT),
        Just(oid::BPCHAR),
        any::<u32>(),
    ];
    let value = proptest::option::of(prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..24),
        "-?[0-9]{0,3}(\\.[0-9]{0,3})?".prop_map(String::into_bytes),
        "[0-9]{4}-[0-9]{2}-[0-9]{2}( [0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,8})?([+-][0-9]{2})?)?( BC)?"
            .prop_map(String::into_bytes),
    ]);
    prop_oneof![
        (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(t, b)| frame(t, &b)),
        proptest::collection::vec(any::<u8>(), 0..12),
        proptest::collection::vec((oids, 0i16..2), 0..4).prop_map(|c| row_description(&c)),
        proptest::collection::vec(value, 0..4).prop_map(|fields| {
            let refs: Vec<Option<&[u8]>> = fields.iter().map(|f| f.as_deref()).collect();
            data_row(&refs)
        }),
        "(SELECT|FETCH)( [0-9]{1,3})?".prop_map(|t| complete(&t)),
        Just(error("XX000")),
    ]
}

proptest! {
    /// Whatever the legs send and whatever the plan, the merger answers with
    /// frames or a MergeError: it never panics, and never sends more than one
    /// RowDescription or more than one final message.
    #[test]
    fn merging_never_panics(
        plan in any_plan(),
        pushes in proptest::collection::vec((0usize..4, any_frame()), 0..24),
    ) {
        let mut m = Merger::new(plan, 3);
        let mut out = BytesMut::new();
        for (leg, frame) in &pushes {
            let _ = m.push(*leg, frame);
            let _ = m.wants(*leg);
            let _ = m.buffered(*leg);
            let _ = m.satisfied();
            m.drain(&mut out);
        }
        let (mut descriptions, mut finals) = (0, 0);
        while let Ok(Some(f)) = decode_frame(&mut out, usize::MAX) {
            match f.tag {
                b'T' | b'n' => descriptions += 1,
                b'C' | b'E' => finals += 1,
                _ => {}
            }
        }
        prop_assert!(descriptions <= 1);
        prop_assert!(finals <= 1);
        prop_assert_eq!(finals == 1, m.finished());
    }

    #[test]
    fn value_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
        let _ = numeric::Numeric::decode_binary(&bytes);
        let _ = numeric::Numeric::parse_text(&bytes);
        let _ = datetime::parse_timestamp_text(&bytes);
        let _ = datetime::parse_date_text(&bytes);
        let _ = datetime::parse_timetz_text(&bytes);
    }

    /// Exact addition agrees with i128 arithmetic on scaled integers.
    #[test]
    fn numeric_addition_is_exact(a in any::<i64>(), b in any::<i64>(), sa in 0u32..6, sb in 0u32..6) {
        let text = |v: i64, s: u32| {
            let digits = format!("{:0>width$}", v.unsigned_abs(), width = s as usize + 1);
            let (int, frac) = digits.split_at(digits.len() - s as usize);
            let sign = if v < 0 { "-" } else { "" };
            if s == 0 { format!("{sign}{int}") } else { format!("{sign}{int}.{frac}") }
        };
        let x = numeric::Numeric::parse_text(text(a, sa).as_bytes()).unwrap();
        let y = numeric::Numeric::parse_text(text(b, sb).as_bytes()).unwrap();
        let s = sa.max(sb);
        let expected = i128::from(a) * 10i128.pow(s - sa) + i128::from(b) * 10i128.pow(s - sb);
        let expected = {
            let digits = format!("{:0>width$}", expected.unsigned_abs(), width = s as usize + 1);
            let (int, frac) = digits.split_at(digits.len() - s as usize);
            let sign = if expected < 0 { "-" } else { "" };
            if s == 0 { format!("{sign}{int}") } else { format!("{sign}{int}.{frac}") }
        };
        prop_assert_eq!(x.add(&y).to_text(), expected);
        prop_assert_eq!(x.cmp(&y), (i128::from(a) * 10i128.pow(s - sa)).cmp(&(i128::from(b) * 10i128.pow(s - sb))));
    }
}

#[test]
fn division_of_very_fine_numerics_is_clamped_to_the_servers_limit() {
    // PostgreSQL caps a division's scale at 1000 digits; an input with more digits
    // is rounded to 1000, not a panic.
    let fine = format!("0.{}5", "0".repeat(1199));
    let n = numeric::Numeric::parse_text(fine.as_bytes()).unwrap();
    let text = n.div_count(1).to_text();
    assert_eq!(text, format!("0.{}", "0".repeat(1000)));
    let n = numeric::Numeric::parse_text(format!("0.{}6", "0".repeat(999)).as_bytes()).unwrap();
    assert_eq!(n.div_count(2).to_text(), format!("0.{}3", "0".repeat(999)));
}

#[test]
fn sort_keys_can_name_hidden_columns_relative_to_the_first_hidden_one() {
    // SELECT * ... ORDER BY x where x is appended as a hidden column: the caller does
    // not know how wide `*` is, so it names the key as hidden column 0.
    let plan = MergePlan {
        hidden_columns: 1,
        ..sorted(HIDDEN_SORT_COLUMN, false, false)
    };
    let msgs = run(
        plan,
        &[oid::TEXT, oid::TEXT, oid::INT4],
        &[&[&["a", "x", "9"]], &[&["b", "y", "10"]]],
    );
    assert_eq!(msgs[0], Out::Description(2));
    assert_eq!(firsts(&msgs), ["a", "b"]);
}

#[test]
fn an_error_after_a_legs_command_complete_still_fails_the_statement() {
    let mut m = Merger::new(MergePlan::default(), 2);
    m.push(0, &text_columns(&[oid::INT4])).unwrap();
    m.push(0, &complete("SELECT 0")).unwrap();
    m.push(0, &error("08006")).unwrap();
    m.push(1, &text_columns(&[oid::INT4])).unwrap();
    assert_eq!(drain(&mut m), [Out::Error("08006".into())]);
    assert!(m.finished());
}

#[test]
fn numeric_binary_matches_numeric_send() {
    // SELECT encode(numeric_send(v::numeric), 'hex') on PostgreSQL 15.
    let cases = [
        ("0", "0000000000000000"),
        ("0.00", "0000000000000002"),
        ("-0.000123", "0002ffff40000006000108fc"),
        ("10000", "00010001000000000001"),
        (
            "123456789.987654321",
            "0006000200000009000109291a852694153803e8",
        ),
        ("99990000", "0001000100000000270f"),
        ("0.0001", "0001ffff000000040001"),
        ("NaN", "00000000c0000000"),
    ];
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let unhex = |s: &str| {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect::<Vec<u8>>()
    };
    for (text, sent) in cases {
        let mut b = BytesMut::new();
        numeric::Numeric::parse_text(text.as_bytes())
            .unwrap()
            .encode_binary(&mut b)
            .unwrap();
        assert_eq!(hex(&b), sent, "{text}");
        let back = numeric::Numeric::decode_binary(&unhex(sent)).unwrap();
        assert_eq!(back.to_text(), text);
    }
    // The server fills the display-scale bits of infinities; they are ignored.
    let inf = numeric::Numeric::decode_binary(&unhex("00000000d0000020")).unwrap();
    assert_eq!(inf.to_text(), "Infinity");
}
