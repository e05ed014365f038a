//! Tests against pickles written by CPython 3.11 + numpy 2.4.6
//! (`tests/data/pickle/make_pickles.py`), a round-trip property test through a tiny pickle
//! writer, and robustness tests (truncation, corruption, hostile nesting).

use super::numpy::{ndarray, scalar_f64, scalar_i64, ArrayData};
use super::*;
use proptest::prelude::*;

fn data_file(name: &str) -> Vec<u8> {
    let p = format!("{}/tests/data/pickle/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("cannot read {p}: {e}"))
}

fn s(x: &str) -> Value {
    Value::Str(x.into())
}

fn ints(v: &[i64]) -> Value {
    Value::List(v.iter().map(|&i| Value::Int(i)).collect())
}

#[test]
fn basic_values_all_protocols() {
    for p in 2..=5 {
        let v = parse(&data_file(&format!("basic_p{p}.pkl"))).unwrap();
        let g = |k: &str| {
            v.get(k)
                .unwrap_or_else(|| panic!("p{p}: no key {k}"))
                .clone()
        };
        assert_eq!(g("none"), Value::None);
        assert_eq!(g("t"), Value::Bool(true));
        assert_eq!(g("f"), Value::Bool(false));
        assert_eq!(
            g("ints"),
            ints(&[
                0,
                1,
                -1,
                255,
                256,
                65535,
                65536,
                -70000,
                i32::MAX as i64,
                i32::MIN as i64,
                1 << 40,
                i64::MIN,
                i64::MAX
            ])
        );
        // 2**70 = 0x40 followed by 70/8 zero bytes, little-endian
        let mut big = vec![0u8; 9];
        big[8] = 0x40;
        assert_eq!(g("big"), Value::BigInt(big));
        assert!(matches!(g("negbig"), Value::BigInt(b) if b[b.len()-1] & 0x80 != 0));
        assert_eq!(
            g("floats"),
            Value::List(vec![
                Value::Float(0.0),
                Value::Float(-1.5),
                Value::Float(1e-300),
                Value::Float(f64::INFINITY)
            ])
        );
        assert_eq!(g("str"), s("héllo ☃"));
        assert_eq!(g("long_str"), s(&"x".repeat(300)));
        assert_eq!(as_bytes(&g("bytes")).unwrap().as_ref(), &[0u8, 1, 255]);
        assert_eq!(as_bytes(&g("empty_bytes")).unwrap().as_ref(), b"");
        assert_eq!(as_bytes(&g("bytearray")).unwrap().as_ref(), b"abc");
        assert_eq!(
            g("tuple"),
            Value::Tuple(vec![
                Value::Int(1),
                s("a"),
                Value::Tuple(vec![Value::Float(2.5), Value::None])
            ])
        );
        assert_eq!(g("empty_tuple"), Value::Tuple(vec![]));
        // protocol 2 pickles sets as REDUCE(builtins.set, ([7],)); 4+ use EMPTY_SET/FROZENSET
        if p >= 4 {
            assert_eq!(g("set"), Value::Set(vec![Value::Int(7)]));
            assert_eq!(g("frozenset"), Value::Set(vec![Value::Int(8)]));
        }
        assert_eq!(
            g("shared"),
            Value::List(vec![ints(&[1, 2, 3]), ints(&[1, 2, 3])])
        );
        let many = g("many");
        let many = many.as_seq().unwrap();
        assert_eq!(many.len(), 600);
        assert_eq!(many[299], s("s299"));
        assert_eq!(many[300], s("s0"));
        assert_eq!(many[599], s("s299"));
        assert_eq!(
            g("odict"),
            Value::Dict(vec![(s("b"), Value::Int(1)), (s("a"), Value::Int(2))])
        );
        assert_eq!(g("ddict"), Value::Dict(vec![(s("k"), ints(&[1]))]));
        let c = g("nested");
        let c = c.get("a").unwrap().get("b").unwrap().get("c").unwrap();
        assert_eq!(
            *c,
            Value::List(vec![
                Value::Int(1),
                Value::List(vec![Value::Int(2), ints(&[3])])
            ])
        );
    }
}

#[test]
fn numpy_arrays_all_protocols() {
    for f in [
        "numpy_p2.pkl",
        "numpy_p2_core.pkl",
        "numpy_p4.pkl",
        "numpy_p5.pkl",
    ] {
        let v = parse(&data_file(f)).unwrap();
        let a = |k: &str| ndarray(v.get(k).unwrap()).unwrap_or_else(|e| panic!("{f} {k}: {e}"));
        let f8 = a("f8");
        assert_eq!(f8.shape, vec![2, 3]);
        assert_eq!(
            f8.data,
            ArrayData::F64((0..6).map(|i| i as f64 / 8.0).collect())
        );
        let f4 = a("f4F");
        assert_eq!(f4.shape, vec![3, 2]);
        assert_eq!(
            f4.data,
            ArrayData::F32((0..6).map(|i| i as f32).collect()),
            "{f}: Fortran order must come back as C order"
        );
        assert_eq!(a("i4").data, ArrayData::I32(vec![-1, 0, 7]));
        assert_eq!(a("i8").data, ArrayData::I64(vec![1 << 40, -3]));
        assert_eq!(a("u1").data, ArrayData::U8(vec![0, 255]));
        assert_eq!(a("bool").data, ArrayData::Bool(vec![true, false, true]));
        assert_eq!(
            a("U").to_strings().unwrap(),
            vec!["ab".to_string(), "ü".into(), "".into()]
        );
        assert_eq!(a("U").dtype.kind, 'U');
        let obj = a("obj");
        assert_eq!(obj.dtype.kind, 'O');
        assert_eq!(obj.to_strings().unwrap(), vec!["gene1", "gene2"]);
        assert_eq!(a("be").data, ArrayData::F64(vec![1.5, -2.0]));
        assert_eq!(a("f2").data, ArrayData::F32(vec![1.0, -2.0]));
        assert_eq!(scalar_f64(v.get("sc_f8").unwrap()), Some(2.5));
        assert_eq!(scalar_i64(v.get("sc_i8").unwrap()), Some(-7));
        assert_eq!(scalar_f64(v.get("sc_f4").unwrap()), Some(0.25));
        assert_eq!(a("sc_f8").shape, Vec::<usize>::new());
        let e = a("empty");
        assert_eq!((e.shape.clone(), e.len()), (vec![0, 3], 0));
        assert_eq!(a("zero_d").data, ArrayData::F64(vec![3.0]));
        let i3 = a("i8F3");
        assert_eq!(i3.shape, vec![2, 3, 4]);
        assert_eq!(i3.data, ArrayData::I64((0..24).collect()));

        // an sklearn-like object: NEWOBJ of __main__.Opaque + BUILD with its __dict__
        let op = v.get("opaque").unwrap().as_object().unwrap();
        assert_eq!(op.callable_name(), Some(("__main__", "Opaque")));
        let st = op.state.as_ref().unwrap();
        let coef = ndarray(st.get("coef_").unwrap()).unwrap();
        assert_eq!(
            coef.to_f64().unwrap(),
            vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
        );
        assert_eq!(
            ndarray(st.get("classes_").unwrap())
                .unwrap()
                .to_strings()
                .unwrap(),
            vec!["B cell", "T cell"]
        );
        assert_eq!(st.get("n_features_in_"), Some(&Value::Int(3)));
    }
}

#[test]
fn core_module_name_is_accepted() {
    let raw = data_file("numpy_p2_core.pkl");
    assert!(raw.windows(11).any(|w| w == b"numpy.core."));
    assert!(!raw.windows(12).any(|w| w == b"numpy._core."));
}

fn all_files() -> Vec<Vec<u8>> {
    [
        "basic_p2.pkl",
        "basic_p3.pkl",
        "basic_p4.pkl",
        "basic_p5.pkl",
        "numpy_p2.pkl",
        "numpy_p4.pkl",
        "numpy_p5.pkl",
    ]
    .iter()
    .map(|f| data_file(f))
    .collect()
}

#[test]
fn every_truncation_is_a_format_error() {
    for d in all_files() {
        for n in 0..d.len() {
            match parse(&d[..n]) {
                Err(ScError::Format(_)) => {}
                other => panic!("prefix of {n} bytes gave {other:?}"),
            }
        }
    }
}

#[test]
fn byte_flips_never_panic() {
    // deterministic pseudo-random corruption of every file
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for d in all_files() {
        for _ in 0..400 {
            let mut c = d.clone();
            for _ in 0..(1 + next() % 4) {
                let i = (next() as usize) % c.len();
                c[i] = next() as u8;
            }
            // Ok or Err, never a panic; numpy decoding of whatever came out must not panic
            if let Ok(v) = parse(&c) {
                if let Some(d) = v.as_dict() {
                    for (_, x) in d {
                        let _ = ndarray(x);
                    }
                }
            }
        }
    }
}

#[test]
fn format_errors_say_what_is_wrong() {
    let e = parse(b"").unwrap_err();
    assert_eq!(e.kind(), "format");
    assert!(e.to_string().contains("empty"));
    let e = parse(b"\x80\x06N.").unwrap_err();
    assert!(e.to_string().contains("protocol 6"), "{e}");
    let e = parse(b"\x80\x02\xffN.").unwrap_err();
    assert!(e.to_string().contains("unknown opcode 0xff"), "{e}");
    let e = parse(b"\x80\x02X\xff\xff\x00\x00ab").unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    let e = parse(b"\x80\x02h\x05.").unwrap_err();
    assert!(e.to_string().contains("memo entry 5"), "{e}");
    let e = parse(b"\x80\x02.").unwrap_err();
    assert!(e.to_string().contains("stack is empty"), "{e}");
    // a value pushed before a MARK cannot be popped inside it
    let e = parse(b"\x80\x02K\x01(\x85.").unwrap_err();
    assert!(e.to_string().contains("stack is empty"), "{e}");
}

#[test]
fn unknown_globals_are_opaque_objects() {
    // cpandas.core.frame\nDataFrame\n)\x81}b.  => NEWOBJ + BUILD of an unknown class
    let p = b"\x80\x02cpandas.core.frame\nDataFrame\n)\x81}X\x01\x00\x00\x00aK\x01sb.";
    let v = parse(p).unwrap();
    let o = v.as_object().unwrap();
    assert!(o.new_obj);
    assert_eq!(o.callable_name(), Some(("pandas.core.frame", "DataFrame")));
    assert_eq!(o.state.as_ref().unwrap().get("a"), Some(&Value::Int(1)));
    assert_eq!(v.describe(), "pandas.core.frame.DataFrame object");
}

#[test]
fn persistent_ids_are_kept() {
    // ('storage', torch.FloatStorage, '0', 'cpu', 6) as BINPERSID
    let p = b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ.";
    let v = parse(p).unwrap();
    let Value::PersId(pid) = v else {
        panic!("not a persid")
    };
    let t = pid.as_seq().unwrap();
    assert_eq!(t[0], s("storage"));
    assert_eq!(t[1].global(), Some(("torch", "FloatStorage")));
    assert_eq!(t[4], Value::Int(6));
}

#[test]
fn recursive_structures_do_not_loop() {
    // l = []; l.append(l)
    let p = b"\x80\x02]q\x00h\x00a.";
    assert_eq!(parse(p).unwrap(), Value::List(vec![Value::Recursive]));
}

#[test]
fn deep_nesting_is_refused() {
    let mut p = b"\x80\x02".to_vec();
    p.extend(std::iter::repeat_n(b']', 1000));
    p.extend(std::iter::repeat_n(b'a', 999));
    p.push(b'.');
    let e = parse(&p).unwrap_err();
    assert!(e.to_string().contains("deep"), "{e}");
}

#[test]
fn shared_reference_blowup_is_bounded() {
    // x0 = [1]; x{k+1} = [x_k, x_k]: 2^60 values when copied
    let mut p = b"\x80\x02K\x01\x85q\x00".to_vec();
    for k in 0..60u8 {
        p.extend([b'h', k, b'h', k, 0x86, b'q', k + 1]);
    }
    p.push(b'.');
    let limits = Limits {
        max_values: 1_000_000,
        ..Limits::default()
    };
    let e = parse_with_limits(&p, limits).unwrap_err();
    assert!(e.to_string().contains("shared"), "{e}");
    // a handful of levels is fine
    let mut q = b"\x80\x02K\x01\x85q\x00".to_vec();
    for k in 0..3u8 {
        q.extend([b'h', k, b'h', k, 0x86, b'q', k + 1]);
    }
    q.push(b'.');
    assert!(parse(&q).is_ok());
}

#[test]
fn build_on_dict_is_ignored_and_codecs_bytes_decode() {
    // OrderedDict() with BUILD {'_metadata': {}}  (torch state dicts)
    let p = b"\x80\x02ccollections\nOrderedDict\n)R}X\t\x00\x00\x00_metadata}sb.";
    assert_eq!(parse(p).unwrap(), Value::Dict(vec![]));
    // _codecs.encode('\xff\x00', 'latin1')
    let p =
        b"\x80\x02c_codecs\nencode\nX\x04\x00\x00\x00\xc3\xbf\x00aX\x06\x00\x00\x00latin1\x86R.";
    let v = parse(p).unwrap();
    assert_eq!(as_bytes(&v).unwrap().as_ref(), &[0xff, 0x00, b'a']);
}

#[test]
fn protocol_zero_text_opcodes() {
    // (lp0\nI1\naF2.5\naS'a\\'b'\naV\u00e9\naL12345678901234567890L\na.
    let p = b"(lp0\nI1\naF2.5\naS'a\\'b'\naV\\u00e9\naL12345678901234567890L\nag0\na.";
    let v = parse(p).unwrap();
    let items = v.as_seq().unwrap();
    assert_eq!(items[0], Value::Int(1));
    assert_eq!(items[1], Value::Float(2.5));
    assert_eq!(items[2], s("a'b"));
    assert_eq!(items[3], s("é"));
    assert!(matches!(items[4], Value::BigInt(_)));
    assert_eq!(items[5], Value::Recursive);
}

// ---------------------------------------------------------------- round trip through a writer

/// A minimal pickle writer for the value kinds the property test generates.
fn write(v: &Value, proto: u8, out: &mut Vec<u8>, memo: &mut u32) {
    let put = |out: &mut Vec<u8>, memo: &mut u32| {
        if proto >= 4 {
            out.push(0x94);
        } else if *memo < 256 {
            out.extend([b'q', *memo as u8]);
        } else {
            out.push(b'r');
            out.extend(memo.to_le_bytes());
        }
        *memo += 1;
    };
    match v {
        Value::None => out.push(b'N'),
        Value::Bool(b) => out.push(if *b { 0x88 } else { 0x89 }),
        Value::Int(i) => {
            if (0..256).contains(i) {
                out.extend([b'K', *i as u8]);
            } else if (0..65536).contains(i) {
                out.push(b'M');
                out.extend((*i as u16).to_le_bytes());
            } else if let Ok(j) = i32::try_from(*i) {
                out.push(b'J');
                out.extend(j.to_le_bytes());
            } else {
                out.extend([0x8a, 8]);
                out.extend(i.to_le_bytes());
            }
        }
        Value::Float(f) => {
            out.push(b'G');
            out.extend(f.to_be_bytes());
        }
        Value::Str(st) => {
            if proto >= 4 && st.len() < 256 {
                out.extend([0x8c, st.len() as u8]);
            } else {
                out.push(b'X');
                out.extend((st.len() as u32).to_le_bytes());
            }
            out.extend(st.as_bytes());
            put(out, memo);
        }
        Value::Bytes(b) => {
            if b.len() < 256 {
                out.extend([b'C', b.len() as u8]);
            } else {
                out.push(b'B');
                out.extend((b.len() as u32).to_le_bytes());
            }
            out.extend(b);
        }
        Value::List(items) => {
            out.push(b']');
            put(out, memo);
            if !items.is_empty() {
                out.push(b'(');
                for x in items {
                    write(x, proto, out, memo);
                }
                out.push(b'e');
            }
        }
        Value::Tuple(items) => {
            if items.is_empty() {
                out.push(b')');
            } else {
                out.push(b'(');
                for x in items {
                    write(x, proto, out, memo);
                }
                out.push(b't');
            }
        }
        Value::Dict(pairs) => {
            out.push(b'}');
            put(out, memo);
            if !pairs.is_empty() {
                out.push(b'(');
                for (k, x) in pairs {
                    write(k, proto, out, memo);
                    write(x, proto, out, memo);
                }
                out.push(b'u');
            }
        }
        other => panic!("writer does not support {other:?}"),
    }
}

fn dump(v: &Value, proto: u8) -> Vec<u8> {
    let mut out = vec![0x80, proto];
    let mut memo = 0;
    write(v, proto, &mut out, &mut memo);
    out.push(b'.');
    out
}

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::None),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        (0i64..300).prop_map(Value::Int),
        any::<f64>()
            .prop_filter("NaN != NaN", |f| !f.is_nan())
            .prop_map(Value::Float),
        ".{0,300}".prop_map(Value::Str),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Value::Bytes),
    ];
    leaf.prop_recursive(5, 200, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::List),
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Tuple),
            // unique string keys (a repeated key would collapse, as in Python)
            proptest::collection::btree_map("[a-z]{0,6}", inner, 0..6).prop_map(|m| {
                Value::Dict(m.into_iter().map(|(k, v)| (Value::Str(k), v)).collect())
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn round_trip(v in arb_value(), proto in prop_oneof![Just(2u8), Just(3), Just(4)]) {
        let p = dump(&v, proto);
        prop_assert_eq!(parse(&p).unwrap(), v);
    }

    #[test]
    fn random_truncation_or_noise_never_panics(
        v in arb_value(),
        cut in any::<prop::sample::Index>(),
        noise in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let p = dump(&v, 4);
        let n = cut.index(p.len());
        prop_assert!(parse(&p[..n]).is_err());
        let mut q = p[..n].to_vec();
        q.extend(noise);
        let _ = parse(&q);
    }
}

// -------------------------------------------------------- the protocol-2 writer (torch.save)

/// `Bytes` as a protocol-2 reader gives them back: `_codecs.encode(...)` / `bytes()` calls.
fn bytes_as_read(v: &Value) -> Value {
    match v {
        Value::Object(o) if as_bytes(v).is_some() && o.callable_name().is_some() => {
            Value::Bytes(as_bytes(v).unwrap().into_owned())
        }
        Value::List(x) => Value::List(x.iter().map(bytes_as_read).collect()),
        Value::Tuple(x) => Value::Tuple(x.iter().map(bytes_as_read).collect()),
        Value::Dict(x) => Value::Dict(
            x.iter()
                .map(|(k, v)| (bytes_as_read(k), bytes_as_read(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The opcodes of a pickle with their argument bytes skipped (for the opcodes it writes).
fn opcodes(p: &[u8]) -> Vec<u8> {
    let mut ops = Vec::new();
    let mut i = 2; // PROTO n
    while i < p.len() {
        let op = p[i];
        ops.push(op);
        i += 1;
        let u32_at = |i: usize| u32::from_le_bytes(p[i..i + 4].try_into().unwrap()) as usize;
        i += match op {
            b'K' => 1,
            b'M' => 2,
            b'J' => 4,
            0x8a => 1 + p[i] as usize,
            b'G' => 8,
            b'X' | b'B' => 4 + u32_at(i),
            0x8c | b'C' => 1 + p[i] as usize,
            b'c' => {
                let a = p[i..].iter().position(|&b| b == b'\n').unwrap() + 1;
                a + p[i + a..].iter().position(|&b| b == b'\n').unwrap() + 1
            }
            _ => 0,
        };
    }
    ops
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn protocol2_writer_round_trips(v in arb_value()) {
        let p = writer::write_protocol2(&v).unwrap();
        prop_assert_eq!(&p[..2], &[0x80, 2]);
        // only opcodes of protocols <= 2
        for op in opcodes(&p) {
            prop_assert!(
                !matches!(op, 0x8c..=0x95 | b'B' | b'C'),
                "opcode {op:#x} is not protocol 2"
            );
        }
        prop_assert_eq!(bytes_as_read(&parse(&p).unwrap()), v.clone());
        // protocol 4 gives the same value
        prop_assert_eq!(parse(&writer::write(&v).unwrap()).unwrap(), v);
    }
}

#[test]
fn protocol2_writer_spells_torch_and_collections_objects() {
    use writer::{default_dict, global, object, ordered_dict, write_protocol2};
    let storage = Value::PersId(Box::new(Value::Tuple(vec![
        s("storage"),
        global("torch", "FloatStorage"),
        s("0"),
        s("cpu"),
        Value::Int(3),
    ])));
    let t = object(
        global("torch._utils", "_rebuild_tensor_v2"),
        vec![
            storage.clone(),
            Value::Int(0),
            Value::Tuple(vec![Value::Int(3)]),
        ],
        false,
        None,
    );
    let v = Value::Tuple(vec![
        ordered_dict(vec![(s("w"), t)]),
        default_dict(
            global("__builtin__", "dict"),
            vec![(s("X"), Value::Dict(vec![]))],
        ),
        Value::Set(vec![Value::Int(1), s("a")]),
        Value::Bytes(vec![]),
        Value::Bytes(vec![0, 200, 255]),
    ]);
    let p = write_protocol2(&v).unwrap();
    // GLOBAL 'collections OrderedDict' ... BINPERSID, as torch.save writes them
    let text = String::from_utf8_lossy(&p);
    assert!(text.contains("ccollections\nOrderedDict\n"), "{text}");
    assert!(text.contains("ctorch\nFloatStorage\n"));
    assert!(opcodes(&p).contains(&b'Q'));
    let back = parse(&p).unwrap();
    let items = back.as_seq().unwrap();
    // OrderedDict and defaultdict are read as dicts; the tensor keeps its persistent id
    let od = items[0].as_dict().unwrap();
    assert_eq!(od[0].0, s("w"));
    let args = od[0].1.as_object().unwrap().arg_slice();
    assert_eq!(args[0], storage);
    assert_eq!(items[1], Value::Dict(vec![(s("X"), Value::Dict(vec![]))]));
    assert!(items[2].is_call_of("__builtin__", "set"));
    assert_eq!(as_bytes(&items[3]).unwrap().as_ref(), b"");
    assert_eq!(as_bytes(&items[4]).unwrap().as_ref(), &[0, 200, 255]);
    // no protocol-2 spelling: keyword arguments, a newline in a global's name
    let kw = Value::Object(Box::new(Object {
        callable: global("m", "C"),
        args: Value::Tuple(vec![]),
        kwargs: Some(Value::Dict(vec![])),
        new_obj: true,
        state: None,
        list_items: vec![],
        dict_items: vec![],
    }));
    assert!(write_protocol2(&kw).is_err());
    assert!(writer::write(&kw).is_ok());
    assert!(write_protocol2(&global("a\nb", "c")).is_err());
    assert!(write_protocol2(&Value::Recursive).is_err());
}
