//! The JSON form of stored documents, as Nightscout puts them on the wire.
//!
//! Nightscout runs `JSON.stringify` over the objects the Node driver returns, so clients
//! see ObjectIds as hex strings, dates as `Date.prototype.toISOString()`, every number
//! as a JavaScript number and NaN or infinities as `null`. Types with no JavaScript
//! counterpart fall back to relaxed Extended JSON. Serialising straight from BSON
//! keeps the stored field order and avoids an intermediate JSON tree per event.

use std::fmt::Write as _;

use bson::{Bson, DateTime, Document};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

/// A document in its wire form, optionally without its top-level `_id`.
pub struct JsonDoc<'a> {
    doc: &'a Document,
    skip_id: bool,
}

impl<'a> JsonDoc<'a> {
    /// The document as the `doc` of a `create` or `update` event: without `_id`.
    pub fn without_id(doc: &'a Document) -> Self {
        JsonDoc { doc, skip_id: true }
    }

    pub fn whole(doc: &'a Document) -> Self {
        JsonDoc { doc, skip_id: false }
    }
}

impl Serialize for JsonDoc<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (key, value) in self.doc {
            if self.skip_id && key == "_id" {
                continue;
            }
            map.serialize_entry(key, &JsonValue(value))?;
        }
        map.end()
    }
}

/// One BSON value in its wire form.
pub struct JsonValue<'a>(pub &'a Bson);

impl Serialize for JsonValue<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Bson::Document(doc) => JsonDoc::whole(doc).serialize(serializer),
            Bson::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&JsonValue(item))?;
                }
                seq.end()
            }
            Bson::String(s) => serializer.serialize_str(s),
            Bson::Boolean(b) => serializer.serialize_bool(*b),
            Bson::Null => serializer.serialize_unit(),
            Bson::Int32(i) => serializer.serialize_i32(*i),
            Bson::Int64(i) => serializer.serialize_i64(*i),
            Bson::Double(f) => serialize_js_number(*f, serializer),
            Bson::ObjectId(oid) => serializer.serialize_str(&oid.to_hex()),
            Bson::DateTime(dt) => match iso_string(*dt) {
                Some(s) => serializer.serialize_str(&s),
                None => serializer.serialize_unit(),
            },
            other => other.clone().into_relaxed_extjson().serialize(serializer),
        }
    }
}

/// JavaScript prints integral doubles without a fraction and switches to exponent form
/// outside [1e-7, 1e21); clients that compare raw text (or parse into integers) see the
/// same digits Nightscout sends.
fn serialize_js_number<S: Serializer>(f: f64, serializer: S) -> Result<S::Ok, S::Error> {
    if !f.is_finite() {
        return serializer.serialize_unit();
    }
    if f == f.trunc() && f.abs() < 9_007_199_254_740_992.0 {
        // Exactly representable integer: also turns -0 into 0, as JSON.stringify does.
        return serializer.serialize_i64(f as i64);
    }
    let text = js_number_text(f);
    let raw = serde_json::value::RawValue::from_string(text).map_err(serde::ser::Error::custom)?;
    raw.serialize(serializer)
}

/// `Number.prototype.toString()` for a finite double (ECMA-262 Number::toString).
pub fn js_number_text(f: f64) -> String {
    if f == 0.0 {
        return "0".into();
    }
    // Rust's `{:e}` gives the shortest round-tripping digits, as JavaScript requires.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exponent) = sci.split_once('e').expect("{:e} always has an exponent");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let exponent: i32 = exponent.parse().expect("{:e} exponent is an integer");
    let k = digits.len() as i32;
    let n = exponent + 1;
    let mut out = String::with_capacity(24);
    if f < 0.0 {
        out.push('-');
    }
    if k <= n && n <= 21 {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        out.push_str(&digits[..n as usize]);
        out.push('.');
        out.push_str(&digits[n as usize..]);
    } else if -6 < n && n <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-n) as usize));
        out.push_str(&digits);
    } else {
        out.push_str(&digits[..1]);
        if k > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let e = n - 1;
        let _ = write!(out, "e{}{}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    out
}

/// `Date.prototype.toISOString()`, or `None` where JavaScript has an invalid date
/// (which `JSON.stringify` writes as `null`).
pub fn iso_string(dt: DateTime) -> Option<String> {
    const MAX_JS_TIME_MS: i64 = 8_640_000_000_000_000;
    let ms = dt.timestamp_millis();
    if !(-MAX_JS_TIME_MS..=MAX_JS_TIME_MS).contains(&ms) {
        return None;
    }
    let days = ms.div_euclid(86_400_000);
    let ms_of_day = ms.rem_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    let mut out = String::with_capacity(27);
    if (0..=9999).contains(&year) {
        let _ = write!(out, "{year:04}");
    } else {
        let _ = write!(out, "{}{:06}", if year < 0 { '-' } else { '+' }, year.abs());
    }
    let _ = write!(
        out,
        "-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        month,
        day,
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000
    );
    Some(out)
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The text form of an `_id` or other key value, as JavaScript's `String(value)` gives
/// for the types ids take in practice.
pub fn id_string(value: &Bson) -> String {
    match value {
        Bson::ObjectId(oid) => oid.to_hex(),
        Bson::String(s) => s.clone(),
        Bson::Int32(i) => i.to_string(),
        Bson::Int64(i) => i.to_string(),
        Bson::Double(f) if f.is_finite() => js_number_text(*f),
        other => other.clone().into_relaxed_extjson().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{Binary, Decimal128, Regex, Timestamp, doc, oid::ObjectId, spec::BinarySubtype};
    use serde_json::json;

    fn wire(doc: &Document) -> String {
        serde_json::to_string(&JsonDoc::without_id(doc)).unwrap()
    }

    fn value(b: Bson) -> serde_json::Value {
        serde_json::to_value(JsonValue(&b)).unwrap()
    }

    #[test]
    fn top_level_id_is_removed_and_field_order_kept() {
        let oid = ObjectId::parse_str("5f1e4b2a9c8d7e6f5a4b3c2d").unwrap();
        let d = doc! { "zeta": 1, "_id": oid, "alpha": "a", "nested": { "_id": oid } };
        assert_eq!(
            wire(&d),
            r#"{"zeta":1,"alpha":"a","nested":{"_id":"5f1e4b2a9c8d7e6f5a4b3c2d"}}"#
        );
    }

    #[test]
    fn object_id_is_hex_everywhere() {
        let oid = ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap();
        let d = doc! { "ref": oid, "list": [oid, { "deep": [oid] }] };
        assert_eq!(
            wire(&d),
            r#"{"ref":"65a1b2c3d4e5f60718293a4b","list":["65a1b2c3d4e5f60718293a4b",{"deep":["65a1b2c3d4e5f60718293a4b"]}]}"#
        );
    }

    #[test]
    fn dates_are_iso_with_milliseconds_everywhere() {
        let dt = DateTime::from_millis(1_700_000_000_000);
        let d = doc! { "created_at": dt, "list": [dt], "sub": { "at": DateTime::from_millis(1) } };
        assert_eq!(
            wire(&d),
            r#"{"created_at":"2023-11-14T22:13:20.000Z","list":["2023-11-14T22:13:20.000Z"],"sub":{"at":"1970-01-01T00:00:00.001Z"}}"#
        );
    }

    #[test]
    fn dates_outside_four_digit_years_and_invalid_dates() {
        assert_eq!(
            value(Bson::DateTime(DateTime::from_millis(-1))),
            json!("1969-12-31T23:59:59.999Z")
        );
        assert_eq!(
            value(Bson::DateTime(DateTime::from_millis(-62_198_755_200_000))),
            json!("-000001-01-01T00:00:00.000Z")
        );
        assert_eq!(
            value(Bson::DateTime(DateTime::from_millis(253_402_300_800_000))),
            json!("+010000-01-01T00:00:00.000Z")
        );
        assert_eq!(
            value(Bson::DateTime(DateTime::from_millis(8_640_000_000_000_000))),
            json!("+275760-09-13T00:00:00.000Z")
        );
        assert_eq!(
            value(Bson::DateTime(DateTime::from_millis(8_640_000_000_000_001))),
            json!(null)
        );
        assert_eq!(value(Bson::DateTime(DateTime::MAX)), json!(null));
    }

    #[test]
    fn numbers_print_as_javascript_does() {
        let d = doc! {
            "i32": 120_i32, "i64": 1_700_000_000_000_i64, "big": i64::MAX,
            "whole": 5.0, "neg_zero": -0.0, "frac": 0.1, "mmol": 6.7,
            "nan": f64::NAN, "inf": f64::INFINITY, "ninf": f64::NEG_INFINITY,
            "list": [1.5, f64::NAN, 2_i64],
        };
        assert_eq!(
            wire(&d),
            r#"{"i32":120,"i64":1700000000000,"big":9223372036854775807,"whole":5,"neg_zero":0,"frac":0.1,"mmol":6.7,"nan":null,"inf":null,"ninf":null,"list":[1.5,null,2]}"#
        );
    }

    #[test]
    fn javascript_number_text() {
        for (f, text) in [
            (1e21, "1e+21"),
            (1.5e21, "1.5e+21"),
            (1e20, "100000000000000000000"),
            (123456789012345680000.0, "123456789012345680000"),
            (1e-7, "1e-7"),
            (1.5e-7, "1.5e-7"),
            (0.000001, "0.000001"),
            (0.000123, "0.000123"),
            (-2.5, "-2.5"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
            (9007199254740993.0, "9007199254740992"),
            (0.30000000000000004, "0.30000000000000004"),
        ] {
            assert_eq!(js_number_text(f), text, "{f:e}");
        }
    }

    #[test]
    fn plain_types_and_nesting() {
        let d = doc! {
            "s": "é\"\n", "t": true, "f": false, "n": Bson::Null,
            "arr": [[1_i32, "x"], { "k": [] }], "empty": {},
        };
        assert_eq!(
            wire(&d),
            r#"{"s":"é\"\n","t":true,"f":false,"n":null,"arr":[[1,"x"],{"k":[]}],"empty":{}}"#
        );
    }

    #[test]
    fn rare_types_are_relaxed_extended_json() {
        let bin = Bson::Binary(Binary {
            subtype: BinarySubtype::Generic,
            bytes: vec![1, 2, 3],
        });
        assert_eq!(
            value(bin),
            json!({"$binary": {"base64": "AQID", "subType": "00"}})
        );
        let ts = Bson::Timestamp(Timestamp {
            time: 1_700_000_000,
            increment: 7,
        });
        assert_eq!(value(ts), json!({"$timestamp": {"t": 1_700_000_000u32, "i": 7}}));
        let dec = Bson::Decimal128("1.5".parse::<Decimal128>().unwrap());
        assert_eq!(value(dec), json!({"$numberDecimal": "1.5"}));
        let re = Bson::RegularExpression(Regex {
            pattern: "^a".into(),
            options: "i".into(),
        });
        assert_eq!(
            value(re),
            json!({"$regularExpression": {"pattern": "^a", "options": "i"}})
        );
        assert_eq!(value(Bson::MinKey), json!({"$minKey": 1}));
        assert_eq!(value(Bson::MaxKey), json!({"$maxKey": 1}));
        assert_eq!(value(Bson::Undefined), json!({"$undefined": true}));
        let nested = doc! { "a": [ { "b": Bson::MaxKey } ] };
        assert_eq!(wire(&nested), r#"{"a":[{"b":{"$maxKey":1}}]}"#);
    }

    #[test]
    fn id_strings() {
        let oid = ObjectId::parse_str("5f1e4b2a9c8d7e6f5a4b3c2d").unwrap();
        assert_eq!(id_string(&Bson::ObjectId(oid)), "5f1e4b2a9c8d7e6f5a4b3c2d");
        assert_eq!(id_string(&Bson::String("abc".into())), "abc");
        assert_eq!(id_string(&Bson::Int64(42)), "42");
        assert_eq!(id_string(&Bson::Double(2.5)), "2.5");
    }
}
