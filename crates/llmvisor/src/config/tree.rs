//! A small owned view of a parsed TOML document in which every key and value has a byte span.
//!
//! toml_edit leaves some nodes without a span (implicit tables such as `models` in
//! `[models."x"]`, the tables of dotted keys); those get the span of the key that names them.

use std::ops::Range;

use toml_edit::{Item, Table, TableLike, Value};

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub span: Range<usize>,
    pub kind: Kind,
}

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime,
    Array(Vec<Node>),
    Table(Vec<Field>),
    /// `[[name]]` (never valid in a config; its tables are not kept).
    TableArray,
}

#[derive(Debug, Clone)]
pub(crate) struct Field {
    pub key: String,
    pub key_span: Range<usize>,
    pub value: Node,
}

impl Node {
    pub fn at(&self) -> usize {
        self.span.start
    }

    /// "a string", "an integer", … for "expected X, found Y" messages.
    pub fn describe(&self) -> &'static str {
        match self.kind {
            Kind::Str(_) => "a string",
            Kind::Int(_) => "an integer",
            Kind::Float(_) => "a float",
            Kind::Bool(_) => "a boolean",
            Kind::Datetime => "a date-time",
            Kind::Array(_) => "an array",
            Kind::Table(_) => "a table",
            Kind::TableArray => "an array of tables",
        }
    }
}

impl Field {
    pub fn key_at(&self) -> usize {
        self.key_span.start
    }
}

pub(crate) fn from_table(t: &Table, fallback: Range<usize>) -> Node {
    table_node(t, t.span().unwrap_or(fallback))
}

/// A `[table]` or an `{ inline = "table" }`: the same node, fields in order with their key spans.
fn table_node(t: &impl TableLike, span: Range<usize>) -> Node {
    let fields = t
        .iter()
        .map(|(k, item)| {
            let key_span = t
                .key(k)
                .and_then(|key| key.span())
                .unwrap_or_else(|| span.clone());
            Field {
                key: k.to_string(),
                value: from_item(item, key_span.clone()),
                key_span,
            }
        })
        .collect();
    Node {
        span,
        kind: Kind::Table(fields),
    }
}

fn from_item(item: &Item, fallback: Range<usize>) -> Node {
    match item {
        Item::Value(v) => from_value(v, fallback),
        Item::Table(t) => from_table(t, fallback),
        Item::ArrayOfTables(a) => Node {
            span: a.span().unwrap_or(fallback),
            kind: Kind::TableArray,
        },
        // Never produced by the parser.
        Item::None => Node {
            span: fallback,
            kind: Kind::Table(Vec::new()),
        },
    }
}

fn from_value(v: &Value, fallback: Range<usize>) -> Node {
    let span = v.span().unwrap_or(fallback);
    let kind = match v {
        Value::String(s) => Kind::Str(s.value().clone()),
        Value::Integer(i) => Kind::Int(*i.value()),
        Value::Float(f) => Kind::Float(*f.value()),
        Value::Boolean(b) => Kind::Bool(*b.value()),
        Value::Datetime(_) => Kind::Datetime,
        Value::Array(a) => Kind::Array(a.iter().map(|e| from_value(e, span.clone())).collect()),
        Value::InlineTable(t) => return table_node(t, t.span().unwrap_or(span)),
    };
    Node { span, kind }
}
