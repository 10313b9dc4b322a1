//! The routing table of the GrpcBackend a channel follows (`status.routes`, see
//! [`kubegrpc_crds::routes`]), read leniently and compiled for matching. Pure functions: which
//! entry a call takes, from its path and headers. [`crate::router`] picks the backend and keeps
//! the pools.
//!
//! Leniency, as for the endpoints ([`crate::status`]): the table is read entry by entry, and an
//! entry the client cannot apply exactly (it does not decode, a regular expression does not
//! compile, a name or namespace is not one Kubernetes allows, it exceeds a bound) is skipped,
//! with a line saying why. Calls it would have matched fall through to the later entries, and
//! fail with `UNAVAILABLE` if none matches. Nothing here panics.
//!
//! Matching, as xDS clients do it (gRFC A28) so that every client kind routes a call alike:
//! - the method: the call's path `/SERVICE/METHOD` split at its second `/`; `Exact` compares the
//!   whole service and the whole method, `RegularExpression` matches each against the whole
//!   value (anchored at both ends, RE2 syntax through the `regex` crate, linear time). A path
//!   not of that form matches only entries without a service or method to compare;
//! - headers: every header match must hold; a header sent several times is compared as its
//!   values joined with `,`; a value that is not UTF-8 matches nothing.
//!
//! The `regex` crate's `\d`, `\w`, `\s` and `\b` are Unicode-aware where RE2's are ASCII-only;
//! gRPC paths and (non-binary) metadata values are ASCII, on which both agree.

use std::{collections::BTreeSet, fmt};

use http::{HeaderMap, HeaderName};
use kubegrpc_crds::routes::{MAX_HEADER_MATCHES, MAX_ROUTE_BACKENDS, MAX_ROUTE_ENTRIES, MatchType, RouteEntry};
use regex::Regex;
use serde_json::Value;

use crate::route_policy::EntryPolicy;

/// The most distinct GrpcBackends one table may route to (16 rules of 16 backends); an entry
/// that would name more is skipped. Each is a watch and a pool of connections.
pub const MAX_TABLE_BACKENDS: usize = 16 * 16;

/// The longest pattern compiled (the CRD's bound on a header value).
const MAX_PATTERN_LEN: usize = 4096;

/// The most memory one compiled regular expression, and its lazy DFA, may take: a pattern
/// such as `((a{100}){100}){100}` is refused rather than compiled into megabytes.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A GrpcBackend a table routes to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub namespace: String,
    pub name: String,
}

impl BackendKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for BackendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A table read from `status.routes`: the entries calls try, in order, and those skipped.
#[derive(Debug)]
pub struct Table {
    pub entries: Vec<CompiledEntry>,
    /// One line per entry left out (or a table that could not be read at all), saying why.
    pub skipped: Vec<String>,
}

impl Table {
    /// Every GrpcBackend the applied entries name (weight 0 included), each once.
    pub fn backends(&self) -> BTreeSet<&BackendKey> {
        self.entries
            .iter()
            .flat_map(|e| e.backends.iter().map(|(key, _)| key))
            .collect()
    }

    /// The first entry that `path` and `headers` match: the table's order is its precedence
    /// (the router walks its own copy of the entries the same way).
    #[cfg(test)]
    pub fn route(&self, path: &str, headers: &HeaderMap) -> Option<&CompiledEntry> {
        self.entries.iter().find(|entry| entry.matches(path, headers))
    }
}

/// One entry of the table, ready to match calls.
#[derive(Debug)]
pub struct CompiledEntry {
    /// Its position in `status.routes`.
    pub index: usize,
    /// The entry as written.
    pub source: RouteEntry,
    method: Option<MethodMatcher>,
    headers: Vec<HeaderMatcher>,
    /// Where matching calls go, namespaces resolved, with their weights (as written, 0
    /// included).
    pub backends: Vec<(BackendKey, u32)>,
    /// Its timeout and retries, if it has either.
    pub policy: Option<EntryPolicy>,
    /// What of its timeout and retries could not be applied as written, and what applies.
    pub policy_notes: Vec<String>,
}

impl CompiledEntry {
    /// Whether a call for `path` carrying `headers` matches this entry.
    pub fn matches(&self, path: &str, headers: &HeaderMap) -> bool {
        self.method.as_ref().is_none_or(|method| method.matches(path))
            && self.headers.iter().all(|header| header.matches(headers))
    }

    /// Where the entry comes from, for messages: `route NAMESPACE/NAME rule N`.
    pub fn origin(&self) -> String {
        format!("route {} rule {}", self.source.route, self.source.rule)
    }
}

/// A value compared whole: equal to a string, or matching an anchored regular expression.
#[derive(Debug)]
enum Text {
    Exact(String),
    Pattern(Regex),
}

impl Text {
    fn compile(match_type: MatchType, value: &str) -> Result<Self, String> {
        match match_type {
            MatchType::Exact => Ok(Self::Exact(value.to_owned())),
            MatchType::RegularExpression => full_match(value).map(Self::Pattern),
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(expected) => value == expected,
            Self::Pattern(regex) => regex.is_match(value),
        }
    }
}

/// A regular expression that matches a whole value. The pattern is parsed on its own first, so
/// that what it holds (an unbalanced `)`, an `(?x)` comment running to its end) cannot change
/// the anchors around it; the anchored form is printed back from the parsed expression.
fn full_match(pattern: &str) -> Result<Regex, String> {
    let invalid = |error: &dyn fmt::Display| {
        let error = error.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        format!("{pattern:?} is not a valid regular expression: {error}")
    };
    if pattern.len() > MAX_PATTERN_LEN {
        return Err(format!(
            "a regular expression of {} bytes is over {MAX_PATTERN_LEN}",
            pattern.len()
        ));
    }
    let parsed = regex_syntax::Parser::new().parse(pattern).map_err(|e| invalid(&e))?;
    let anchored = regex_syntax::hir::Hir::concat(vec![
        regex_syntax::hir::Hir::look(regex_syntax::hir::Look::Start),
        parsed,
        regex_syntax::hir::Hir::look(regex_syntax::hir::Look::End),
    ]);
    regex::RegexBuilder::new(&anchored.to_string())
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| invalid(&e))
}

#[derive(Debug)]
struct MethodMatcher {
    service: Option<Text>,
    method: Option<Text>,
}

impl MethodMatcher {
    fn matches(&self, path: &str) -> bool {
        if self.service.is_none() && self.method.is_none() {
            return true;
        }
        let Some((service, method)) = split_path(path) else {
            return false;
        };
        self.service.as_ref().is_none_or(|s| s.matches(service))
            && self.method.as_ref().is_none_or(|m| m.matches(method))
    }
}

/// `/SERVICE/METHOD` as its two parts, both non-empty; anything else is not a gRPC method path.
pub fn split_path(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/')).then_some((service, method))
}

#[derive(Debug)]
struct HeaderMatcher {
    name: HeaderName,
    value: Text,
}

impl HeaderMatcher {
    fn matches(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(&self.name).iter();
        let Some(first) = values.next() else {
            return false;
        };
        let Ok(first) = std::str::from_utf8(first.as_bytes()) else {
            return false;
        };
        let Some(second) = values.next() else {
            return self.value.matches(first);
        };
        let mut joined = first.to_owned();
        for value in std::iter::once(second).chain(values) {
            let Ok(value) = std::str::from_utf8(value.as_bytes()) else {
                return false;
            };
            joined.push(',');
            joined.push_str(value);
        }
        self.value.matches(&joined)
    }
}

/// Reads the table from a GrpcBackend's `status` value; `namespace` is that GrpcBackend's (the
/// namespace of backends that name none). `None`: no table (`routes` absent, null or empty),
/// calls go to the GrpcBackend's own endpoints. A `routes` that is present but not a list is a
/// table with no entry (every call fails, saying why): the status meant to route, and sending
/// calls elsewhere than it says would be worse than failing them.
pub fn parse_routes(status: Option<&Value>, namespace: &str) -> Option<Table> {
    let routes = status?.as_object()?.get("routes")?;
    let entries = match routes {
        Value::Null => return None,
        Value::Array(entries) if entries.is_empty() => return None,
        Value::Array(entries) => entries,
        _ => {
            return Some(Table {
                entries: Vec::new(),
                skipped: vec!["status.routes is not a list; no entry applies".into()],
            });
        }
    };
    let mut table = Table {
        entries: Vec::new(),
        skipped: Vec::new(),
    };
    let mut named = BTreeSet::new();
    for (index, entry) in entries.iter().take(MAX_ROUTE_ENTRIES).enumerate() {
        match compile_entry(index, entry, namespace, &named) {
            Ok(compiled) => {
                named.extend(compiled.backends.iter().map(|(key, _)| key.clone()));
                table.entries.push(compiled);
            }
            Err(why) => table.skipped.push(format!("status.routes[{index}] skipped: {why}")),
        }
    }
    if entries.len() > MAX_ROUTE_ENTRIES {
        table.skipped.push(format!(
            "status.routes[{MAX_ROUTE_ENTRIES}..{}] skipped: a table holds at most {MAX_ROUTE_ENTRIES} entries",
            entries.len()
        ));
    }
    Some(table)
}

/// One entry, checked and compiled; `named` are the backends the entries before it name.
fn compile_entry(
    index: usize,
    entry: &Value,
    namespace: &str,
    named: &BTreeSet<BackendKey>,
) -> Result<CompiledEntry, String> {
    let source: RouteEntry =
        serde_json::from_value(entry.clone()).map_err(|error| format!("not a route entry: {error}"))?;
    let origin = format!("(route {} rule {})", source.route, source.rule);
    let fail = |why: String| format!("{why} {origin}");
    if source.headers.len() > MAX_HEADER_MATCHES {
        return Err(fail(format!(
            "{} header matches, over {MAX_HEADER_MATCHES}",
            source.headers.len()
        )));
    }
    if source.backends.len() > MAX_ROUTE_BACKENDS {
        return Err(fail(format!(
            "{} backends, over {MAX_ROUTE_BACKENDS}",
            source.backends.len()
        )));
    }
    let method = match &source.method {
        None => None,
        Some(method) => {
            let text = |part: &Option<String>, what: &str| {
                part.as_deref()
                    .map(|value| Text::compile(method.match_type, value).map_err(|why| format!("method {what} {why}")))
                    .transpose()
            };
            Some(MethodMatcher {
                service: text(&method.service, "service").map_err(&fail)?,
                method: text(&method.method, "method").map_err(&fail)?,
            })
        }
    };
    let headers = source
        .headers
        .iter()
        .map(|header| {
            let name = HeaderName::from_bytes(header.name.as_bytes())
                .map_err(|_| format!("header name {:?} is not a valid header name", header.name))?;
            let value = Text::compile(header.match_type, &header.value)
                .map_err(|why| format!("header {} {why}", header.name))?;
            Ok(HeaderMatcher { name, value })
        })
        .collect::<Result<Vec<_>, String>>()
        .map_err(&fail)?;
    let backends = source
        .backends
        .iter()
        .map(|backend| {
            let key = BackendKey::new(backend.namespace_or(namespace), backend.name.as_str());
            if !is_dns_label(&key.namespace) {
                return Err(format!("backend namespace {:?} is not a namespace name", key.namespace));
            }
            if !is_dns_subdomain(&key.name) {
                return Err(format!("backend name {:?} is not a GrpcBackend name", key.name));
            }
            Ok((key, backend.weight))
        })
        .collect::<Result<Vec<_>, String>>()
        .map_err(&fail)?;
    let new: BTreeSet<&BackendKey> = backends
        .iter()
        .map(|(key, _)| key)
        .filter(|key| !named.contains(*key))
        .collect();
    if named.len() + new.len() > MAX_TABLE_BACKENDS {
        return Err(fail(format!(
            "it would route to more than {MAX_TABLE_BACKENDS} GrpcBackends"
        )));
    }
    let (policy, policy_notes) = EntryPolicy::of(&source);
    let policy_notes = policy_notes
        .into_iter()
        .map(|note| format!("status.routes[{index}] {origin}: {note}"))
        .collect();
    Ok(CompiledEntry {
        index,
        source,
        method,
        headers,
        backends,
        policy,
        policy_notes,
    })
}

/// A Kubernetes namespace name (RFC 1123 label): at most 63 of `a-z0-9-`, alphanumeric at both
/// ends.
fn is_dns_label(name: &str) -> bool {
    name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A Kubernetes object name (RFC 1123 subdomain): at most 253, dot-separated labels.
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn table(routes: Value) -> Table {
        parse_routes(Some(&json!({ "routes": routes })), "shop").expect("a table")
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        map
    }

    /// The index (in `status.routes`) of the entry a call takes, if any.
    fn routed(table: &Table, path: &str, pairs: &[(&str, &str)]) -> Option<usize> {
        table.route(path, &headers(pairs)).map(|entry| entry.index)
    }

    fn to(name: &str) -> Value {
        json!([{"name": name, "weight": 1}])
    }

    #[test]
    fn no_routes_is_no_table_and_a_broken_one_is_a_table_that_routes_nothing() {
        assert!(parse_routes(None, "shop").is_none());
        assert!(parse_routes(Some(&json!({"endpoints": []})), "shop").is_none());
        assert!(parse_routes(Some(&json!({"routes": null})), "shop").is_none());
        assert!(parse_routes(Some(&json!({"routes": []})), "shop").is_none());
        let broken = table(json!({"route": "shop/r"}));
        assert!(broken.entries.is_empty());
        assert_eq!(broken.skipped, ["status.routes is not a list; no entry applies"]);
        assert_eq!(routed(&broken, "/echo.Echo/Say", &[]), None);
    }

    #[test]
    fn the_first_matching_entry_wins_in_table_order() {
        let table = table(json!([
            {"route": "shop/r", "rule": 0, "method": {"service": "echo.Echo", "method": "Say"}, "backends": to("a")},
            {"route": "shop/r", "rule": 1, "method": {"service": "echo.Echo"}, "backends": to("b")},
            {"route": "shop/r", "rule": 2, "backends": to("c")},
            {"route": "shop/r", "rule": 3, "method": {"method": "Hear"}, "backends": to("d")},
        ]));
        assert!(table.skipped.is_empty(), "{:?}", table.skipped);
        assert_eq!(routed(&table, "/echo.Echo/Say", &[]), Some(0));
        assert_eq!(
            routed(&table, "/echo.Echo/Hear", &[]),
            Some(1),
            "the service entry comes first"
        );
        assert_eq!(
            routed(&table, "/other.Svc/Hear", &[]),
            Some(2),
            "the catch-all comes before rule 3"
        );
        assert_eq!(routed(&table, "not a grpc path", &[]), Some(2));
    }

    #[test]
    fn exact_method_matches_compare_whole_parts() {
        let table = table(json!([
            {"route": "shop/r", "rule": 0, "method": {"service": "echo.Echo", "method": "Say"}, "backends": to("a")},
            {"route": "shop/r", "rule": 1, "method": {"method": "Hear"}, "backends": to("b")},
        ]));
        assert_eq!(routed(&table, "/echo.Echo/Say", &[]), Some(0));
        for path in [
            "/echo.Echo/SayMore",
            "/echo.Echo/Sa",
            "/xecho.Echo/Say",
            "/echo.Echo/Say/x",
            "echo.Echo/Say",
        ] {
            assert_eq!(routed(&table, path, &[]), None, "{path}");
        }
        assert_eq!(routed(&table, "/any.Service/Hear", &[]), Some(1));
        assert_eq!(routed(&table, "//Hear", &[]), None, "no service: not a method path");
    }

    #[test]
    fn regular_expressions_match_the_whole_value() {
        let table = table(json!([
            {"route": "shop/r", "rule": 0, "method": {"type": "RegularExpression", "service": "echo\\.(Echo|Talk)", "method": "S.y"},
             "backends": to("a")},
            {"route": "shop/r", "rule": 1, "headers": [{"type": "RegularExpression", "name": "x-user", "value": "tester-[0-9]+"}],
             "backends": to("b")},
        ]));
        assert!(table.skipped.is_empty(), "{:?}", table.skipped);
        assert_eq!(routed(&table, "/echo.Echo/Say", &[]), Some(0));
        assert_eq!(routed(&table, "/echo.Talk/Sty", &[]), Some(0));
        // Unanchored, these would match: the pattern must cover the whole value.
        assert_eq!(routed(&table, "/echo.EchoX/Say", &[]), None);
        assert_eq!(routed(&table, "/xecho.Echo/Say", &[]), None);
        assert_eq!(routed(&table, "/echo.Echo/Says", &[]), None);
        assert_eq!(routed(&table, "/a.B/C", &[("x-user", "tester-42")]), Some(1));
        assert_eq!(routed(&table, "/a.B/C", &[("x-user", "tester-42x")]), None);
        assert_eq!(routed(&table, "/a.B/C", &[("x-user", "a-tester-42")]), None);
    }

    #[test]
    fn what_a_pattern_holds_cannot_move_its_anchors() {
        // An alternation stays inside the anchors; an (?x) comment cannot swallow them.
        let alternation = full_match("a|b").unwrap();
        assert!(alternation.is_match("a") && alternation.is_match("b"));
        assert!(!alternation.is_match("ab") && !alternation.is_match("xa"));
        let commented = full_match("(?x) v 2 # the canary").unwrap();
        assert!(commented.is_match("v2") && !commented.is_match("v2x"));
        let multiline = full_match("(?m)a$").unwrap();
        assert!(
            !multiline.is_match("a\nb"),
            "multi-line mode inside does not end the value early"
        );
        assert!(full_match("a)|(b").is_err());
        // Unicode classes are printed back as ranges; they still compile within the limit.
        for (pattern, value) in [
            ("\\w+", "tester_42"),
            ("(?i)canary-.*", "CANARY-eu"),
            ("\\p{Greek}+", "αβγ"),
            ("[[:alpha:]]+\\d{2,4}", "v1234"),
            (".*", ""),
        ] {
            let regex = full_match(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"));
            assert!(regex.is_match(value), "{pattern} on {value:?}");
        }
        assert!(full_match("(?P<x>a)\\1").is_err(), "no backreferences, as in RE2");
    }

    #[test]
    fn every_header_match_must_hold_and_repeated_headers_are_joined() {
        let table = table(json!([
            {"route": "shop/r", "rule": 0,
             "headers": [{"name": "x-canary", "value": "true"}, {"name": "X-Team", "value": "blue"}],
             "backends": to("a")},
            {"route": "shop/r", "rule": 1, "headers": [{"name": "x-tags", "value": "a,b"}], "backends": to("b")},
        ]));
        assert!(table.skipped.is_empty(), "{:?}", table.skipped);
        assert_eq!(
            routed(&table, "/a.B/C", &[("x-canary", "true"), ("x-team", "blue")]),
            Some(0)
        );
        assert_eq!(routed(&table, "/a.B/C", &[("x-canary", "true")]), None);
        assert_eq!(
            routed(&table, "/a.B/C", &[("x-canary", "True"), ("x-team", "blue")]),
            None
        );
        assert_eq!(routed(&table, "/a.B/C", &[("x-tags", "a"), ("x-tags", "b")]), Some(1));
        assert_eq!(routed(&table, "/a.B/C", &[("x-tags", "a")]), None);
    }

    #[test]
    fn a_bad_entry_is_skipped_and_its_calls_fall_through() {
        let table = table(json!([
            {"route": "shop/bad", "rule": 0, "headers": [{"type": "RegularExpression", "name": "x-v", "value": "(unclosed"}],
             "backends": to("a")},
            {"route": "shop/bad", "rule": 1, "method": {"type": "Prefix", "service": "echo"}, "backends": to("a")},
            {"route": "shop/bad", "rule": 2, "backends": [{"name": "a", "namespace": "Not_A_Namespace", "weight": 1}]},
            {"route": "shop/bad", "rule": 3, "backends": [{"name": "UPPER", "weight": 1}]},
            {"route": "shop/bad", "rule": 4, "headers": [{"name": ":authority", "value": "x"}], "backends": to("a")},
            {"route": "shop/bad", "rule": 5, "method": {"type": "RegularExpression", "method": "((a{100}){100}){100}"}, "backends": to("a")},
            42,
            {"route": "shop/good", "rule": 0, "backends": to("b")},
        ]));
        assert_eq!(table.entries.len(), 1);
        assert_eq!(table.skipped.len(), 7, "{:#?}", table.skipped);
        assert!(
            table.skipped[0]
                .starts_with("status.routes[0] skipped: header x-v \"(unclosed\" is not a valid regular expression"),
            "{}",
            table.skipped[0]
        );
        assert!(
            table.skipped[0].ends_with("(route shop/bad rule 0)"),
            "{}",
            table.skipped[0]
        );
        assert!(table.skipped[1].contains("not a route entry"), "{}", table.skipped[1]);
        assert!(table.skipped[5].contains("method method"), "{}", table.skipped[5]);
        assert_eq!(routed(&table, "/echo.Echo/Say", &[("x-v", "1")]), Some(7));
        assert_eq!(
            table.backends().into_iter().cloned().collect::<Vec<_>>(),
            [BackendKey::new("shop", "b")]
        );
    }

    #[test]
    fn backends_take_the_tables_namespace_unless_they_name_one() {
        let table = table(json!([
            {"route": "shop/r", "rule": 0, "backends": [
                {"name": "v1", "weight": 70}, {"name": "v2", "namespace": "canary", "weight": 30}, {"name": "v3", "weight": 0}]},
        ]));
        assert_eq!(
            table.entries[0].backends,
            [
                (BackendKey::new("shop", "v1"), 70),
                (BackendKey::new("canary", "v2"), 30),
                (BackendKey::new("shop", "v3"), 0)
            ]
        );
    }

    #[test]
    fn a_table_routes_to_at_most_256_grpc_backends() {
        let rule = |first: usize| {
            let backends: Vec<Value> = (first..first + 16)
                .map(|i| json!({"name": format!("b{i}"), "weight": 1}))
                .collect();
            json!({"route": "shop/r", "rule": 0, "backends": backends})
        };
        // 17 entries of 16 new backends each, then one naming only backends already named.
        let mut entries: Vec<Value> = (0..17).map(|i| rule(i * 16)).collect();
        entries.push(rule(0));
        let table = table(Value::Array(entries));
        assert_eq!(table.entries.len(), 17);
        assert_eq!(table.backends().len(), MAX_TABLE_BACKENDS);
        assert_eq!(table.skipped.len(), 1);
        assert!(table.skipped[0].starts_with("status.routes[16] skipped: it would route to more than 256"));
    }

    #[test]
    fn entries_over_the_bound_are_skipped_together() {
        let entries: Vec<Value> = (0..300)
            .map(|_| json!({"route": "shop/r", "rule": 0, "backends": to("a")}))
            .collect();
        let table = table(Value::Array(entries));
        assert_eq!(table.entries.len(), MAX_ROUTE_ENTRIES);
        assert_eq!(
            table.skipped,
            ["status.routes[256..300] skipped: a table holds at most 256 entries"]
        );
    }

    #[test]
    fn grpc_paths_split_into_service_and_method() {
        assert_eq!(split_path("/echo.Echo/Say"), Some(("echo.Echo", "Say")));
        for path in ["", "/", "/echo.Echo", "/echo.Echo/", "//Say", "/a/b/c", "echo.Echo/Say"] {
            assert_eq!(split_path(path), None, "{path:?}");
        }
    }
}
