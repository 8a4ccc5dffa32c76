//! Internally tagged messages (`{"op": "connect", ...}`) decoded without buffering.
//!
//! serde's own decoder for an internally tagged enum cannot know the variant before it has
//! read the tag, which may come last, so it first copies the whole object into a generic
//! tree and decodes the variant from that copy: every message is parsed twice and every
//! string allocated twice. Our encoders always write the tag first, so [`tagged_enum!`]
//! declares such an enum with serde's usual encoding and a decoder that reads the first key:
//! when it is the tag, the variant's fields are decoded straight from the rest of the
//! object. Only an object whose tag comes later (written by another program) takes the slow
//! way, through a `serde_json::Value`, with the same result.
//!
//! Owns: the decoding of every tagged message of the links (agent, API, peer, report).
//! Invariants: the encoding is serde's internally tagged one, unchanged; decoding accepts
//! exactly what serde's derived decoder accepts (any key order, unknown keys ignored) and
//! fails with the same kind of error (`missing field`, `unknown variant`).

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, IntoDeserializer, MapAccess, VariantAccess, Visitor};
use std::fmt;
use std::marker::PhantomData;

/// Declares an enum encoded with serde as internally tagged (`tag`, variants in
/// `snake_case`) whose decoder reads the tag first (see the module doc). Write it like the
/// enum itself, starting with `#[tagged(tag = "...", name = "TheEnum")]` in place of the
/// serde container attributes (`name` repeats the enum's name for serde's remote derive),
/// then its docs and derives; field and variant attributes (`#[serde(default)]`, docs)
/// apply to both directions.
#[macro_export]
macro_rules! tagged_enum {
    (
        #[tagged(tag = $tag:literal, name = $sname:literal)]
        $(#[$meta:meta])*
        $vis:vis enum $name:ident { $($body:tt)* }
    ) => {
        $(#[$meta])*
        #[derive(serde::Serialize)]
        #[serde(tag = $tag, rename_all = "snake_case")]
        $vis enum $name { $($body)* }

        const _: () = {
            /// The same variants, externally tagged: what the tag-first decoder hands the
            /// variant name and the rest of the object to (serde's remote derive builds
            /// the real enum directly).
            #[derive(serde::Deserialize)]
            #[serde(remote = $sname, rename_all = "snake_case")]
            #[allow(dead_code)]
            enum Twin { $($body)* }

            struct Decoded($name);

            impl<'de> serde::Deserialize<'de> for Decoded {
                fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                    Twin::deserialize(d).map(Decoded)
                }
            }

            impl<'de> serde::Deserialize<'de> for $name {
                fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                    $crate::proto::tagged::deserialize::<D, Decoded>(d, $tag).map(|v| v.0)
                }
            }
        };
    };
}

/// Decodes an internally tagged object with the tag `tag` into `T`, an externally tagged
/// twin of the enum (see [`tagged_enum!`]).
pub fn deserialize<'de, D, T>(d: D, tag: &'static str) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: de::Deserialize<'de>,
{
    d.deserialize_map(TagFirst { tag, out: PhantomData })
}

struct TagFirst<T> {
    tag: &'static str,
    out: PhantomData<T>,
}

impl<'de, T: de::Deserialize<'de>> Visitor<'de> for TagFirst<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an object with a \"{}\" field", self.tag)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        let Some(first) = map.next_key::<Key<'de>>()? else {
            return Err(de::Error::missing_field(self.tag));
        };
        if first.as_str() == self.tag {
            let variant = map.next_value::<Key<'de>>()?;
            return T::deserialize(Rest { variant, map });
        }
        // The tag comes later: gather the object, then decode it the same way.
        let mut object = serde_json::Map::new();
        object.insert(first.into_string(), map.next_value::<serde_json::Value>()?);
        while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
            object.insert(k, v);
        }
        let variant = match object.remove(self.tag) {
            Some(serde_json::Value::String(s)) => s,
            Some(other) => {
                return Err(de::Error::invalid_type(unexpected(&other), &"a variant name"));
            }
            None => return Err(de::Error::missing_field(self.tag)),
        };
        let rest = de::value::MapDeserializer::new(object.into_iter());
        T::deserialize(Rest { variant: Key::Owned(variant), map: rest }).map_err(de::Error::custom)
    }
}

fn unexpected(v: &serde_json::Value) -> de::Unexpected<'_> {
    match v {
        serde_json::Value::Null => de::Unexpected::Unit,
        serde_json::Value::Bool(b) => de::Unexpected::Bool(*b),
        serde_json::Value::Number(_) => de::Unexpected::Other("a number"),
        serde_json::Value::String(s) => de::Unexpected::Str(s),
        serde_json::Value::Array(_) => de::Unexpected::Seq,
        serde_json::Value::Object(_) => de::Unexpected::Map,
    }
}

/// A key or the tag's value: borrowed from the input when it has no escapes.
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Key<'_> {
    fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(s) => s,
            Key::Owned(s) => s,
        }
    }

    fn into_string(self) -> String {
        match self {
            Key::Borrowed(s) => s.to_owned(),
            Key::Owned(s) => s,
        }
    }
}

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key::Borrowed(s))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key::Owned(s.to_owned()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key::Owned(s))
            }
        }
        d.deserialize_str(V)
    }
}

/// The variant name and the object's remaining entries, shown to the twin as an
/// externally tagged enum.
struct Rest<'de, M> {
    variant: Key<'de>,
    map: M,
}

impl<'de, M: MapAccess<'de>> Deserializer<'de> for Rest<'de, M> {
    type Error = M::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, M::Error> {
        visitor.visit_enum(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, M::Error> {
        visitor.visit_enum(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier
        ignored_any
    }
}

impl<'de, M: MapAccess<'de>> EnumAccess<'de> for Rest<'de, M> {
    type Error = M::Error;
    type Variant = Fields<M>;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Fields<M>), M::Error> {
        let name = match self.variant {
            Key::Borrowed(s) => seed.deserialize(de::value::BorrowedStrDeserializer::<M::Error>::new(s))?,
            Key::Owned(s) => seed.deserialize(s.into_deserializer())?,
        };
        Ok((name, Fields(self.map)))
    }
}

/// What follows the tag: the fields of a struct variant, or of the struct a newtype variant
/// holds; nothing (any other key ignored) for a unit variant.
struct Fields<M>(M);

impl<'de, M: MapAccess<'de>> VariantAccess<'de> for Fields<M> {
    type Error = M::Error;

    fn unit_variant(mut self) -> Result<(), M::Error> {
        while self.0.next_entry::<de::IgnoredAny, de::IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, M::Error> {
        seed.deserialize(de::value::MapAccessDeserializer::new(self.0))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value, M::Error> {
        Err(de::Error::custom("tuple variants cannot be internally tagged"))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, M::Error> {
        visitor.visit_map(self.0)
    }
}

#[cfg(test)]
mod tests {
    use crate::proto::api::{ApiReply, ApiRequest};
    use crate::proto::peer::PeerMsg;

    #[test]
    fn the_tag_may_come_anywhere_and_unknown_keys_are_ignored() {
        let first: ApiRequest = serde_json::from_str(r#"{"op":"load_show","agent":"a1","x":[1,{"y":2}]}"#).unwrap();
        let last: ApiRequest = serde_json::from_str(r#"{"agent":"a1","x":[1,{"y":2}],"op":"load_show"}"#).unwrap();
        assert_eq!(first, ApiRequest::LoadShow { agent: "a1".into() });
        assert_eq!(first, last);
        // A unit variant ignores what else the object holds, wherever the tag is.
        for json in [r#"{"op":"ha_status","pad":{"a":[]}}"#, r#"{"pad":1,"op":"ha_status"}"#] {
            assert_eq!(serde_json::from_str::<ApiRequest>(json).unwrap(), ApiRequest::HaStatus);
        }
        // Defaults and escaped strings work on both paths.
        let a: ApiRequest = serde_json::from_str(r#"{"op":"load_list"}"#).unwrap();
        assert_eq!(a, ApiRequest::LoadList { refresh: false });
        let b: ApiRequest = serde_json::from_str(r#"{"agent":"a\u0031","op":"load_\u0073how"}"#).unwrap();
        assert_eq!(b, ApiRequest::LoadShow { agent: "a1".into() });
    }

    #[test]
    fn a_newtype_variant_reads_its_struct_from_the_same_object() {
        let json = r#"{"type":"hello","protocol":1,"node":"a","db_id":"d","head":3,"oldest":1,
            "your_db_id":null,"your_position":0,"config_digest":"c","now_ms":5}"#;
        let PeerMsg::Hello(h) = serde_json::from_str::<PeerMsg>(json).unwrap() else { panic!("not a hello") };
        assert_eq!((h.node.0.as_str(), h.head.0, h.now_ms), ("a", 3, 5));
        let moved = json.replace(r#""type":"hello","#, "").replace(r#""now_ms":5}"#, r#""now_ms":5,"type":"hello"}"#);
        assert!(matches!(serde_json::from_str::<PeerMsg>(&moved).unwrap(), PeerMsg::Hello(h2) if h2 == h));
    }

    #[test]
    fn bad_objects_name_what_is_wrong() {
        let err = |json: &str| serde_json::from_str::<ApiReply>(json).unwrap_err().to_string();
        assert!(err(r#"{"reply":"bogus"}"#).contains("unknown variant `bogus`"), "{}", err(r#"{"reply":"bogus"}"#));
        assert!(err(r#"{"message":"x","reply":"bogus"}"#).contains("unknown variant `bogus`"));
        assert!(err(r#"{"message":"x"}"#).contains("missing field `reply`"));
        assert!(err(r#"{}"#).contains("missing field `reply`"));
        assert!(err(r#"{"reply":"ok"}"#).contains("missing field `message`"));
        assert!(err(r#"{"message":"x","reply":7}"#).contains("invalid type"));
        assert!(err(r#"{"reply":7}"#).contains("invalid type"));
        assert!(err(r#"[1,2]"#).contains("invalid type"));
        assert!(err(r#"{"reply":"ok","message":5}"#).contains("invalid type"));
    }
}
