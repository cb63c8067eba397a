//! Socket.IO packets as the relay handles them: type, namespace and ack id read, the data
//! left as text; pure. (`<type>[<attachments>-][<namespace>,][<ack id>][<data>]`.)

/// The packet types the relay knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Connect,
    Disconnect,
    Event,
    Ack,
    ConnectError,
    BinaryEvent,
    BinaryAck,
}

impl Kind {
    fn digit(self) -> char {
        match self {
            Kind::Connect => '0',
            Kind::Disconnect => '1',
            Kind::Event => '2',
            Kind::Ack => '3',
            Kind::ConnectError => '4',
            Kind::BinaryEvent => '5',
            Kind::BinaryAck => '6',
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet<'a> {
    pub kind: Kind,
    /// `/` for the root namespace.
    pub ns: &'a str,
    pub id: Option<i64>,
    /// The undecoded data: a JSON array for events and acks, an object for connects.
    pub data: &'a str,
}

/// Reads a Socket.IO packet (the text of an Engine.IO message). `None` when it is not one.
pub fn parse(text: &str) -> Option<Packet<'_>> {
    let kind = match text.as_bytes().first()? {
        b'0' => Kind::Connect,
        b'1' => Kind::Disconnect,
        b'2' => Kind::Event,
        b'3' => Kind::Ack,
        b'4' => Kind::ConnectError,
        b'5' => Kind::BinaryEvent,
        b'6' => Kind::BinaryAck,
        _ => return None,
    };
    let mut rest = &text[1..];
    if matches!(kind, Kind::BinaryEvent | Kind::BinaryAck) {
        let dash = rest.find('-')?;
        rest[..dash].parse::<u32>().ok()?;
        rest = &rest[dash + 1..];
    }
    let ns = if rest.starts_with('/') {
        let end = rest.find(',').unwrap_or(rest.len());
        let ns = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or("");
        ns
    } else {
        "/"
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let id = if digits > 0 {
        let id = rest[..digits].parse::<i64>().ok()?;
        rest = &rest[digits..];
        Some(id)
    } else {
        None
    };
    Some(Packet {
        kind,
        ns,
        id,
        data: rest,
    })
}

/// Writes a Socket.IO packet (non-binary kinds).
pub fn encode(kind: Kind, ns: &str, id: Option<i64>, data: &str) -> String {
    let mut text = String::with_capacity(ns.len() + data.len() + 24);
    text.push(kind.digit());
    if ns != "/" {
        text.push_str(ns);
        text.push(',');
    }
    if let Some(id) = id {
        text.push_str(&id.to_string());
    }
    text.push_str(data);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_of_every_kind_are_read() {
        let cases = [
            ("0", Kind::Connect, "/", None, ""),
            ("0/alarm,", Kind::Connect, "/alarm", None, ""),
            (r#"0{"token":"x"}"#, Kind::Connect, "/", None, r#"{"token":"x"}"#),
            (
                r#"0/alarm,{"sid":"a"}"#,
                Kind::Connect,
                "/alarm",
                None,
                r#"{"sid":"a"}"#,
            ),
            ("1/alarm,", Kind::Disconnect, "/alarm", None, ""),
            ("1", Kind::Disconnect, "/", None, ""),
            (
                r#"2["dataUpdate",{"a":1}]"#,
                Kind::Event,
                "/",
                None,
                r#"["dataUpdate",{"a":1}]"#,
            ),
            (
                r#"2/alarm,12["subscribe",{}]"#,
                Kind::Event,
                "/alarm",
                Some(12),
                r#"["subscribe",{}]"#,
            ),
            (
                r#"27["authorize",{}]"#,
                Kind::Event,
                "/",
                Some(7),
                r#"["authorize",{}]"#,
            ),
            (
                r#"3/alarm,12[{"success":true}]"#,
                Kind::Ack,
                "/alarm",
                Some(12),
                r#"[{"success":true}]"#,
            ),
            (
                r#"4/alarm,{"message":"no"}"#,
                Kind::ConnectError,
                "/alarm",
                None,
                r#"{"message":"no"}"#,
            ),
            (
                r#"51-/x,3["e",{"_placeholder":true,"num":0}]"#,
                Kind::BinaryEvent,
                "/x",
                Some(3),
                r#"["e",{"_placeholder":true,"num":0}]"#,
            ),
        ];
        for (text, kind, ns, id, data) in cases {
            assert_eq!(parse(text), Some(Packet { kind, ns, id, data }), "{text}");
        }
    }

    #[test]
    fn what_is_not_a_packet_is_refused() {
        for text in ["", "7", "x", "5-", "5x-[]", "2/alarm,99999999999999999999[]"] {
            assert_eq!(parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn packets_are_written_back_as_read() {
        for text in [
            "0",
            "0/alarm,",
            r#"2["dataUpdate",{"a":1}]"#,
            r#"2/alarm,12["subscribe",{}]"#,
            r#"3/alarm,12[{"success":true}]"#,
            "1/alarm,",
        ] {
            let p = parse(text).unwrap();
            assert_eq!(encode(p.kind, p.ns, p.id, p.data), text);
        }
    }
}
