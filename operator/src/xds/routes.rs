//! The RouteConfiguration of a GrpcBackend, from its routing table (`status.routes`, see
//! [`kubegrpc_crds::routes`]), for xDS clients (gRFC A28).
//!
//! Without a table, every call goes to the GrpcBackend's own Cluster, as before routes existed.
//! With one, the virtual host holds one Route per entry, in the table's order (gRPC clients take
//! the first Route that matches, as the table says):
//! - the method becomes the path matcher: `path: /SERVICE/METHOD` for an exact service and
//!   method, `prefix: /SERVICE/` for an exact service alone, else a `safe_regex` over the whole
//!   path built from the parts (`/(?:SERVICE)/(?:METHOD)`, `[^/]+` for a missing part, exact
//!   parts escaped); no method: `prefix: ""` (every path). Paths are matched case-sensitively,
//!   said explicitly: grpc-java reads an absent `case_sensitive` as false;
//! - each header becomes a HeaderMatcher with `string_match` `exact` or `safe_regex` (RE2,
//!   matched against the whole value by both clients);
//! - the backends become `weighted_clusters` naming each GrpcBackend's Cluster `NAME.NAMESPACE`
//!   with its weight (the same GrpcBackend named twice: the weights added). Backends of weight 0
//!   are left out: grpc-go skips them anyway and NACKs a route whose weights add up to 0;
//!   grpc-java NACKs one too;
//! - an entry with no backend of weight above 0 becomes a Route with `non_forwarding_action`:
//!   both clients stop at it and fail the call UNAVAILABLE (grpc-go v1.83 "matched route does
//!   not have a supported route action type", grpc-java 1.85 "Could not route RPC to Route with
//!   non-forwarding action"). Not `direct_response`: grpc-java NACKs the whole
//!   RouteConfiguration for it; not a route action without clusters: both skip such a Route, and
//!   the call would fall through to a later entry.
//!
//! Each forwarding Route also carries its entry's timeout and retry policy:
//! - the timeout becomes `max_stream_duration.max_stream_duration` (gRFC A31). grpc-go v1.83 and
//!   grpc-java 1.85 read `grpc_timeout_header_max` first and `max_stream_duration` when it is
//!   absent; only the latter is set, which an Envoy reading the route would also apply as the
//!   stream's limit. Both clients apply it as the call's deadline unless the caller's own is
//!   sooner (grpc-go `context.WithTimeout` on the caller's context, grpc-java keeps the earlier
//!   `Deadline`): the call fails DEADLINE_EXCEEDED, retries included. A zero timeout means none
//!   to both, so none is left out;
//! - the retry policy becomes `retry_policy` (gRFC A44): `retry_on` the codes lowercase and
//!   hyphenated (`unavailable,resource-exhausted`), `num_retries` the attempts after the first,
//!   `retry_back_off {base_interval, max_interval}`. Both clients retry only a call that failed
//!   before any response header arrived, keep the call's Cluster but pick each attempt's endpoint
//!   afresh, at random by weight (a retry may land on the endpoint that failed), and double the
//!   backoff each time (jittered, at most `max_interval`). What they refuse is never sent: grpc-go
//!   NACKs the whole RouteConfiguration for `num_retries` 0 or a `base_interval`/`max_interval`
//!   of 0, grpc-java for a `base_interval` of 0 or a `max_interval` below it (and fails every call
//!   of a route with `num_retries` 0), so retries are clamped to 1-4, the backoff to at least
//!   1 ms and `max_interval` to at least `base_interval`. grpc-java caps attempts at 5 in all;
//!   grpc-go does not over xDS, hence the 4. A code neither client retries on is left out (both
//!   would ignore it, as A44 says), and a policy left with no code is not sent.
//!
//! The retry budget (`budgetPercent`) has no xDS field gRPC clients read: Envoy's
//! `retry_budget` is a Cluster circuit breaker, and gRPC's own retry throttling
//! (`retryThrottling`) comes only from a service config, never from xDS. xDS clients are bounded
//! by the attempts alone.
//!
//! There is no catch-all Route after the entries: a call that matches none fails UNAVAILABLE in
//! both clients (grpc-go "no matched route was found", grpc-java "Could not find xDS route
//! matching RPC"), as the table's semantics say.
//!
//! The Clusters the routes name are the other GrpcBackends' own (every GrpcBackend has its
//! Cluster and ClusterLoadAssignment): a client subscribes to them by name over the same ADS
//! stream. Both clients hold a new RouteConfiguration back until every Cluster it names has
//! arrived or is known missing (gRFC A74): a Cluster that never arrives holds every call of a
//! starting client, whatever its route, for the client's resource timeout (15 s, measured with
//! grpc-go v1.83.2 and grpc-java 1.85.1), and a table change as long. So the server names only
//! the Clusters of GrpcBackends it serves with a status ([`route_configuration_served`], kept
//! current by the cache as GrpcBackends come and go): a backend GrpcBackend that does not exist
//! (not created yet, deleted, its object unreadable) or has no status yet (its endpoints are not
//! known, and its Cluster would fail every call routed to it) is left out of its entry and the
//! entry's other backends take its share, as the operator does with a backendRef it cannot
//! resolve; an entry left with none fails its calls. A backend whose status lists no usable
//! endpoint stays in: its share fails, UNAVAILABLE, as a call to it directly would.

use std::collections::HashMap;

use envoy_types::pb::{
    envoy::{
        config::route::v3::{
            HeaderMatcher, NonForwardingAction, RetryPolicy as XdsRetryPolicy, Route, RouteAction, RouteConfiguration,
            RouteMatch, VirtualHost, WeightedCluster,
            header_matcher::HeaderMatchSpecifier,
            retry_policy::RetryBackOff,
            route::Action,
            route_action::{ClusterSpecifier, MaxStreamDuration},
            route_match::PathSpecifier,
            weighted_cluster::ClusterWeight,
        },
        r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher::MatchPattern},
    },
    google::protobuf::{BoolValue, Duration as ProtoDuration, UInt32Value},
};
use kubegrpc_crds::routes::{HeaderMatch, MatchType, MethodMatch, RetryPolicy, RouteBackend, RouteEntry};

use super::resources::resource_name;

/// The RouteConfiguration `name` (`NAME.NAMESPACE`) serves: every call to the GrpcBackend's own
/// Cluster without a table (`table` empty), the table's Routes with one. Backends without a
/// namespace are in the table's, the namespace in `name` (a namespace holds no dot).
pub fn route_configuration(name: &str, table: &[RouteEntry]) -> RouteConfiguration {
    let routes = if table.is_empty() {
        vec![Route {
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix(String::new())),
                ..Default::default()
            }),
            action: Some(Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster(name.into())),
                ..Default::default()
            })),
            ..Default::default()
        }]
    } else {
        let namespace = table_namespace(name);
        table.iter().map(|entry| route(entry, namespace)).collect()
    };
    RouteConfiguration {
        name: name.into(),
        virtual_hosts: vec![VirtualHost {
            name: name.into(),
            domains: vec![name.into()],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// [`route_configuration`] naming only the Clusters `served` says exist; see the module docs.
pub fn route_configuration_served(
    name: &str,
    table: &[RouteEntry],
    served: impl Fn(&str) -> bool,
) -> RouteConfiguration {
    let namespace = table_namespace(name);
    let mut served_table = table.to_vec();
    for entry in &mut served_table {
        entry
            .backends
            .retain(|b| served(&resource_name(b.namespace_or(namespace), &b.name)));
    }
    route_configuration(name, &served_table)
}

/// The namespace of the GrpcBackend named `name` (`NAME.NAMESPACE`: a namespace holds no dot).
fn table_namespace(name: &str) -> &str {
    name.rsplit_once('.').map_or("", |(_, namespace)| namespace)
}

/// One entry's Route.
fn route(entry: &RouteEntry, namespace: &str) -> Route {
    let clusters = weighted_clusters(&entry.backends, namespace);
    let action = if clusters.is_empty() {
        Action::NonForwardingAction(NonForwardingAction {})
    } else {
        Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::WeightedClusters(WeightedCluster {
                clusters,
                ..Default::default()
            })),
            max_stream_duration: entry.timeout.and_then(max_stream_duration),
            retry_policy: entry.retry.as_ref().and_then(retry_policy),
            ..Default::default()
        })
    };
    Route {
        // Shown in the clients' logs and errors.
        name: format!("{} rule {}", entry.route, entry.rule),
        r#match: Some(RouteMatch {
            path_specifier: Some(path_specifier(entry.method.as_ref())),
            case_sensitive: Some(BoolValue { value: true }),
            headers: entry.headers.iter().map(header_matcher).collect(),
            ..Default::default()
        }),
        action: Some(action),
        ..Default::default()
    }
}

/// The codes gRPC clients retry on, as `retry_on` spells them (gRFC A44; grpc-go and grpc-java
/// ignore any other value).
const RETRY_ON: [&str; 5] = [
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// The most retries after the first attempt: grpc-java caps a call at 5 attempts, grpc-go does
/// not over xDS.
const MAX_RETRIES: u32 = 4;

/// The shortest backoff sent: both clients refuse a `base_interval` of 0.
const MIN_BACKOFF: std::time::Duration = std::time::Duration::from_millis(1);

/// A route timeout as gRFC A31's `max_stream_duration`; none for a zero or negative one (gRPC
/// reads 0 as no limit).
fn max_stream_duration(timeout: kube::core::Duration) -> Option<MaxStreamDuration> {
    let timeout = non_negative(timeout);
    (!timeout.is_zero()).then(|| MaxStreamDuration {
        max_stream_duration: Some(proto_duration(timeout)),
        ..Default::default()
    })
}

/// A retry policy as gRFC A44's `retry_policy`, within what grpc-go and grpc-java accept; none
/// when no listed code is one they retry on.
fn retry_policy(policy: &RetryPolicy) -> Option<XdsRetryPolicy> {
    let mut retry_on: Vec<String> = Vec::new();
    for code in &policy.codes {
        let code = code.trim().to_ascii_lowercase().replace('_', "-");
        if RETRY_ON.contains(&code.as_str()) && !retry_on.contains(&code) {
            retry_on.push(code);
        }
    }
    if retry_on.is_empty() {
        return None;
    }
    let base = non_negative(policy.backoff).max(MIN_BACKOFF);
    let max = non_negative(policy.max_backoff).max(base);
    Some(XdsRetryPolicy {
        retry_on: retry_on.join(","),
        num_retries: Some(UInt32Value {
            value: u32::from(policy.attempts).clamp(1, MAX_RETRIES),
        }),
        retry_back_off: Some(RetryBackOff {
            base_interval: Some(proto_duration(base)),
            max_interval: Some(proto_duration(max)),
        }),
        ..Default::default()
    })
}

fn non_negative(duration: kube::core::Duration) -> std::time::Duration {
    if duration.is_negative() {
        std::time::Duration::ZERO
    } else {
        duration.into()
    }
}

fn proto_duration(duration: std::time::Duration) -> ProtoDuration {
    ProtoDuration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

/// The backends of weight above 0 as Clusters, in the table's order, a GrpcBackend named twice
/// once with the weights added.
fn weighted_clusters(backends: &[RouteBackend], namespace: &str) -> Vec<ClusterWeight> {
    let mut clusters: Vec<ClusterWeight> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for backend in backends.iter().filter(|b| b.weight > 0) {
        let name = resource_name(backend.namespace_or(namespace), &backend.name);
        match index.get(&name) {
            Some(&at) => {
                let weight = clusters[at].weight.get_or_insert_with(UInt32Value::default);
                weight.value = weight.value.saturating_add(backend.weight);
            }
            None => {
                index.insert(name.clone(), clusters.len());
                clusters.push(ClusterWeight {
                    name,
                    weight: Some(UInt32Value { value: backend.weight }),
                    ..Default::default()
                });
            }
        }
    }
    clusters
}

/// The path matcher of a method match (a gRPC path is `/SERVICE/METHOD`).
fn path_specifier(method: Option<&MethodMatch>) -> PathSpecifier {
    let Some(method) = method else {
        return PathSpecifier::Prefix(String::new());
    };
    // An empty part matches nothing a client sends: it is read as absent, as the API says of
    // an absent one ("any").
    let (service, name) = (non_empty(&method.service), non_empty(&method.method));
    match (method.match_type, service, name) {
        (_, None, None) => PathSpecifier::Prefix(String::new()),
        (MatchType::Exact, Some(service), Some(name)) => PathSpecifier::Path(format!("/{service}/{name}")),
        (MatchType::Exact, Some(service), None) => PathSpecifier::Prefix(format!("/{service}/")),
        (match_type, service, name) => {
            let as_regex = |part: Option<&str>| match (part, match_type) {
                (None, _) => "[^/]+".to_string(),
                (Some(part), MatchType::Exact) => escape_regex(part),
                (Some(part), MatchType::RegularExpression) => format!("(?:{part})"),
            };
            PathSpecifier::SafeRegex(regex_matcher(format!("/{}/{}", as_regex(service), as_regex(name))))
        }
    }
}

fn non_empty(part: &Option<String>) -> Option<&str> {
    part.as_deref().filter(|p| !p.is_empty())
}

fn header_matcher(header: &HeaderMatch) -> HeaderMatcher {
    let pattern = match header.match_type {
        MatchType::Exact => MatchPattern::Exact(header.value.clone()),
        MatchType::RegularExpression => MatchPattern::SafeRegex(regex_matcher(header.value.clone())),
    };
    HeaderMatcher {
        name: header.name.clone(),
        header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(pattern),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// A `safe_regex`: RE2, Envoy's default engine and the only one gRPC clients know (they ignore
/// the deprecated engine field), matched against the whole string.
fn regex_matcher(regex: String) -> RegexMatcher {
    RegexMatcher {
        regex,
        ..Default::default()
    }
}

/// `text` as an RE2 pattern matching exactly it: RE2's metacharacters escaped.
fn escape_regex(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if matches!(
            c,
            '\\' | '.' | '+' | '*' | '?' | '(' | ')' | '|' | '[' | ']' | '{' | '}' | '^' | '$'
        ) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(name: &str, weight: u32) -> RouteBackend {
        RouteBackend {
            name: name.into(),
            namespace: None,
            weight,
        }
    }

    fn entry(method: Option<MethodMatch>, headers: Vec<HeaderMatch>, backends: Vec<RouteBackend>) -> RouteEntry {
        RouteEntry {
            route: "shop/canary".into(),
            rule: 0,
            method,
            headers,
            backends,
            timeout: None,
            retry: None,
        }
    }

    fn method(match_type: MatchType, service: Option<&str>, name: Option<&str>) -> MethodMatch {
        MethodMatch {
            match_type,
            service: service.map(Into::into),
            method: name.map(Into::into),
        }
    }

    fn routes_of(table: &[RouteEntry]) -> Vec<Route> {
        let config = route_configuration("echo.shop", table);
        assert_eq!(config.name, "echo.shop");
        assert_eq!(config.virtual_hosts.len(), 1);
        assert_eq!(config.virtual_hosts[0].domains, ["echo.shop"]);
        config.virtual_hosts.into_iter().next().unwrap().routes
    }

    fn path_of(route: &Route) -> PathSpecifier {
        route.r#match.as_ref().unwrap().path_specifier.clone().unwrap()
    }

    fn clusters_of(route: &Route) -> Vec<(String, u32)> {
        let Some(Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::WeightedClusters(weighted)),
            ..
        })) = &route.action
        else {
            panic!("weighted clusters expected: {:?}", route.action)
        };
        weighted
            .clusters
            .iter()
            .map(|c| (c.name.clone(), c.weight.unwrap().value))
            .collect()
    }

    /// Whether the path regex of `route` matches `path` as gRPC clients match it (whole path).
    fn regex_matches(route: &Route, path: &str) -> bool {
        let PathSpecifier::SafeRegex(matcher) = path_of(route) else {
            panic!("a regex expected")
        };
        regex::Regex::new(&format!("^(?:{})$", matcher.regex))
            .unwrap()
            .is_match(path)
    }

    #[test]
    fn without_a_table_every_call_goes_to_the_backends_own_cluster() {
        let routes = routes_of(&[]);
        assert_eq!(routes.len(), 1);
        assert_eq!(path_of(&routes[0]), PathSpecifier::Prefix(String::new()));
        let Some(Action::Route(action)) = &routes[0].action else {
            panic!("a route action expected")
        };
        assert_eq!(
            action.cluster_specifier,
            Some(ClusterSpecifier::Cluster("echo.shop".into()))
        );
    }

    #[test]
    fn entries_become_routes_in_the_tables_order_with_no_catch_all_after_them() {
        let table = [
            entry(
                Some(method(MatchType::Exact, Some("echo.Echo"), Some("Say"))),
                vec![],
                vec![backend("v2", 1)],
            ),
            entry(None, vec![], vec![backend("v1", 1)]),
            entry(
                Some(method(MatchType::Exact, Some("echo.Echo"), None)),
                vec![],
                vec![backend("v3", 1)],
            ),
        ];
        let routes = routes_of(&table);
        let order: Vec<(PathSpecifier, Vec<(String, u32)>)> =
            routes.iter().map(|r| (path_of(r), clusters_of(r))).collect();
        assert_eq!(
            order,
            [
                (
                    PathSpecifier::Path("/echo.Echo/Say".into()),
                    vec![("v2.shop".into(), 1)]
                ),
                (PathSpecifier::Prefix(String::new()), vec![("v1.shop".into(), 1)]),
                (PathSpecifier::Prefix("/echo.Echo/".into()), vec![("v3.shop".into(), 1)]),
            ],
            "three routes, in order, nothing added"
        );
        assert!(
            routes
                .iter()
                .all(|r| r.r#match.as_ref().unwrap().case_sensitive == Some(BoolValue { value: true }))
        );
        assert_eq!(routes[0].name, "shop/canary rule 0");
    }

    #[test]
    fn weights_name_each_backends_cluster_leaving_out_weight_zero_and_adding_up_repeats() {
        let other_namespace = RouteBackend {
            namespace: Some("billing".into()),
            ..backend("ledger", 5)
        };
        let table = [entry(
            None,
            vec![],
            vec![
                backend("v1", 70),
                backend("v2", 30),
                backend("v3", 0),
                other_namespace,
                backend("v1", 10),
            ],
        )];
        assert_eq!(
            clusters_of(&routes_of(&table)[0]),
            [
                ("v1.shop".to_string(), 80),
                ("v2.shop".to_string(), 30),
                ("ledger.billing".to_string(), 5)
            ]
        );
    }

    #[test]
    fn an_entry_without_a_weighted_backend_fails_its_calls_rather_than_falling_through() {
        for backends in [vec![], vec![backend("v1", 0), backend("v2", 0)]] {
            let table = [
                entry(None, vec![], backends),
                entry(None, vec![], vec![backend("v1", 1)]),
            ];
            let routes = routes_of(&table);
            assert_eq!(routes.len(), 2, "the entry stays, in its place");
            assert_eq!(
                routes[0].action,
                Some(Action::NonForwardingAction(NonForwardingAction {}))
            );
        }
    }

    #[test]
    fn method_matches_become_path_prefix_or_whole_path_regexes() {
        let route_for = |m: MethodMatch| routes_of(&[entry(Some(m), vec![], vec![backend("v1", 1)])]).remove(0);
        // Exact method alone: any service, that method; the dots of an exact part are literal.
        let method_only = route_for(method(MatchType::Exact, None, Some("Get.V2")));
        assert!(regex_matches(&method_only, "/a.B/Get.V2"));
        assert!(regex_matches(&method_only, "/other.Service/Get.V2"));
        assert!(!regex_matches(&method_only, "/a.B/GetxV2"), "an escaped dot");
        assert!(!regex_matches(&method_only, "/a.B/Get.V2x"), "the whole path");
        assert!(!regex_matches(&method_only, "//Get.V2"), "a service is there");

        // Regular expressions, each part whole; an alternation stays within its part.
        let both = route_for(method(
            MatchType::RegularExpression,
            Some("echo\\.(Echo|Ping)"),
            Some("Say|Shout"),
        ));
        assert!(regex_matches(&both, "/echo.Echo/Say"));
        assert!(regex_matches(&both, "/echo.Ping/Shout"));
        assert!(!regex_matches(&both, "/echo.Echo/Whisper"));
        assert!(!regex_matches(&both, "/echo.Echo/SayMore"));
        assert!(!regex_matches(&both, "/x/Shout"));
        assert!(!regex_matches(&both, "Shout"), "the alternation stays in its part");
        let service_only = route_for(method(MatchType::RegularExpression, Some("echo\\..*"), None));
        assert!(regex_matches(&service_only, "/echo.Echo/Any"));
        assert!(!regex_matches(&service_only, "/ping.Ping/Any"));
        let method_regex_only = route_for(method(MatchType::RegularExpression, None, Some("Get.*")));
        assert!(regex_matches(&method_regex_only, "/a.B/GetUser"));
        assert!(!regex_matches(&method_regex_only, "/a.B/SetUser"));

        // No part, or empty parts: every method.
        for m in [
            method(MatchType::Exact, None, None),
            method(MatchType::RegularExpression, Some(""), Some("")),
        ] {
            assert_eq!(path_of(&route_for(m)), PathSpecifier::Prefix(String::new()));
        }
    }

    #[test]
    fn exact_parts_are_escaped_when_they_go_in_a_regex() {
        assert_eq!(
            escape_regex("a.b+c*d?(e)|[f]{g}^h$i\\j"),
            "a\\.b\\+c\\*d\\?\\(e\\)\\|\\[f\\]\\{g\\}\\^h\\$i\\\\j"
        );
        let weird = "Get(All)+[x]|y$";
        let route = routes_of(&[entry(
            Some(method(MatchType::Exact, None, Some(weird))),
            vec![],
            vec![backend("v1", 1)],
        )])
        .remove(0);
        assert!(regex_matches(&route, &format!("/svc/{weird}")));
        assert!(!regex_matches(&route, "/svc/GetAllAll[x]"));
        assert!(!regex_matches(&route, "/svc/y"));
    }

    #[test]
    fn header_matches_are_exact_or_whole_value_regexes_and_all_are_kept() {
        let headers = vec![
            HeaderMatch {
                match_type: MatchType::Exact,
                name: "x-canary".into(),
                value: "v2".into(),
            },
            HeaderMatch {
                match_type: MatchType::RegularExpression,
                name: "x-user".into(),
                value: "tester-[0-9]+".into(),
            },
        ];
        let route = routes_of(&[entry(None, headers, vec![backend("v2", 1)])]).remove(0);
        let matchers: Vec<(String, Option<MatchPattern>, bool)> = route
            .r#match
            .unwrap()
            .headers
            .into_iter()
            .map(|h| {
                let Some(HeaderMatchSpecifier::StringMatch(m)) = h.header_match_specifier else {
                    panic!("a string match expected")
                };
                (h.name, m.match_pattern, m.ignore_case || h.invert_match)
            })
            .collect();
        assert_eq!(
            matchers,
            [
                ("x-canary".into(), Some(MatchPattern::Exact("v2".into())), false),
                (
                    "x-user".into(),
                    Some(MatchPattern::SafeRegex(regex_matcher("tester-[0-9]+".into()))),
                    false
                ),
            ]
        );
    }

    fn action_of(route: &Route) -> &RouteAction {
        let Some(Action::Route(action)) = &route.action else {
            panic!("a route action expected: {:?}", route.action)
        };
        action
    }

    fn duration(text: &str) -> kube::core::Duration {
        text.parse().unwrap()
    }

    fn retry(codes: &[&str], attempts: u8, backoff: &str, max_backoff: &str) -> RetryPolicy {
        RetryPolicy {
            codes: codes.iter().map(|c| (*c).to_string()).collect(),
            attempts,
            backoff: duration(backoff),
            max_backoff: duration(max_backoff),
            budget_percent: 20,
        }
    }

    fn with_policy(timeout: Option<&str>, retry: Option<RetryPolicy>) -> Route {
        let entry = RouteEntry {
            timeout: timeout.map(duration),
            retry,
            ..entry(None, vec![], vec![backend("v1", 1)])
        };
        routes_of(&[entry]).remove(0)
    }

    fn proto(seconds: i64, nanos: i32) -> Option<ProtoDuration> {
        Some(ProtoDuration { seconds, nanos })
    }

    #[test]
    fn a_timeout_becomes_max_stream_duration_and_nothing_else() {
        let route = with_policy(Some("200ms"), None);
        let action = action_of(&route);
        assert_eq!(
            action.max_stream_duration,
            Some(MaxStreamDuration {
                max_stream_duration: proto(0, 200_000_000),
                // Both clients would prefer it to max_stream_duration: left out.
                grpc_timeout_header_max: None,
                grpc_timeout_header_offset: None,
            })
        );
        assert_eq!(action.retry_policy, None);
        assert_eq!(action.timeout, None, "Envoy's idle route timeout: gRPC ignores it");
        let long = with_policy(Some("1h1.5s"), None);
        assert_eq!(
            action_of(&long)
                .max_stream_duration
                .as_ref()
                .unwrap()
                .max_stream_duration,
            proto(3601, 500_000_000)
        );
        // None, zero and negative: no limit, said by leaving the field out.
        for timeout in [None, Some("0s"), Some("-5s")] {
            let route = with_policy(timeout, None);
            assert_eq!(action_of(&route).max_stream_duration, None, "{timeout:?}");
        }
    }

    #[test]
    fn a_retry_policy_becomes_retry_on_num_retries_and_backoff() {
        let route = with_policy(
            Some("5s"),
            Some(retry(&["UNAVAILABLE", "RESOURCE_EXHAUSTED"], 2, "25ms", "250ms")),
        );
        let action = action_of(&route);
        assert_eq!(
            action.retry_policy,
            Some(XdsRetryPolicy {
                retry_on: "unavailable,resource-exhausted".into(),
                num_retries: Some(UInt32Value { value: 2 }),
                retry_back_off: Some(RetryBackOff {
                    base_interval: proto(0, 25_000_000),
                    max_interval: proto(0, 250_000_000),
                }),
                ..Default::default()
            })
        );
        assert!(
            action.max_stream_duration.is_some(),
            "the timeout bounds the call, retries included"
        );
        let every_code = with_policy(
            None,
            Some(retry(
                &[
                    "CANCELLED",
                    "DEADLINE_EXCEEDED",
                    "INTERNAL",
                    "RESOURCE_EXHAUSTED",
                    "UNAVAILABLE",
                ],
                4,
                "1s",
                "10s",
            )),
        );
        let policy = action_of(&every_code).retry_policy.clone().unwrap();
        assert_eq!(
            policy.retry_on,
            "cancelled,deadline-exceeded,internal,resource-exhausted,unavailable"
        );
        assert_eq!(policy.num_retries, Some(UInt32Value { value: 4 }));
        assert_eq!(
            policy.retry_back_off.unwrap().max_interval,
            proto(10, 0),
            "whole seconds"
        );
    }

    #[test]
    fn what_a_grpc_client_would_refuse_is_never_sent() {
        // Retries 0 (grpc-go NACKs it, grpc-java fails the calls) and above 4 (5 attempts at most).
        for (attempts, sent) in [(0, 1), (1, 1), (4, 4), (9, 4)] {
            let route = with_policy(None, Some(retry(&["UNAVAILABLE"], attempts, "25ms", "250ms")));
            let policy = action_of(&route).retry_policy.clone().unwrap();
            assert_eq!(policy.num_retries, Some(UInt32Value { value: sent }), "{attempts}");
        }
        // A base_interval of 0 (both NACK) and a max_interval below it (grpc-java NACKs).
        for (backoff, max_backoff, base, max) in [
            ("0s", "0s", proto(0, 1_000_000), proto(0, 1_000_000)),
            ("-1s", "250ms", proto(0, 1_000_000), proto(0, 250_000_000)),
            ("100ms", "10ms", proto(0, 100_000_000), proto(0, 100_000_000)),
        ] {
            let route = with_policy(None, Some(retry(&["UNAVAILABLE"], 2, backoff, max_backoff)));
            let back_off = action_of(&route).retry_policy.clone().unwrap().retry_back_off.unwrap();
            assert_eq!(
                (back_off.base_interval, back_off.max_interval),
                (base, max),
                "{backoff} {max_backoff}"
            );
        }
        // Codes the clients do not retry on are left out, repeats once; none left: no policy.
        let route = with_policy(
            None,
            Some(retry(
                &["unavailable", "NOT_FOUND", "UNAVAILABLE", " internal "],
                2,
                "25ms",
                "250ms",
            )),
        );
        assert_eq!(
            action_of(&route).retry_policy.as_ref().unwrap().retry_on,
            "unavailable,internal"
        );
        for codes in [&["NOT_FOUND", "5xx"][..], &[]] {
            let route = with_policy(None, Some(retry(codes, 2, "25ms", "250ms")));
            assert_eq!(action_of(&route).retry_policy, None, "{codes:?}");
        }
    }

    #[test]
    fn each_entry_carries_its_own_policy_and_a_failing_entry_none() {
        let table = [
            RouteEntry {
                timeout: Some(duration("200ms")),
                retry: Some(retry(&["UNAVAILABLE"], 3, "10ms", "100ms")),
                ..entry(
                    Some(method(MatchType::Exact, Some("echo.Echo"), Some("Say"))),
                    vec![],
                    vec![backend("v2", 1)],
                )
            },
            RouteEntry {
                timeout: Some(duration("1s")),
                ..entry(None, vec![], vec![backend("v1", 0)])
            },
            entry(None, vec![], vec![backend("v1", 1)]),
        ];
        let routes = routes_of(&table);
        let first = action_of(&routes[0]);
        assert_eq!(
            first.max_stream_duration.as_ref().unwrap().max_stream_duration,
            proto(0, 200_000_000)
        );
        assert_eq!(
            first.retry_policy.as_ref().unwrap().num_retries,
            Some(UInt32Value { value: 3 })
        );
        assert_eq!(
            routes[1].action,
            Some(Action::NonForwardingAction(NonForwardingAction {})),
            "its calls fail at once: nothing to time out or retry"
        );
        let last = action_of(&routes[2]);
        assert_eq!((&last.max_stream_duration, &last.retry_policy), (&None, &None));
    }

    #[test]
    fn the_served_route_configuration_is_the_status_table_and_changes_with_it() {
        use std::time::SystemTime;

        use kubegrpc_crds::GrpcBackendStatus;
        use prost::Message;

        use crate::xds::resources::{BackendSettings, backend_resources, type_url};

        let served = |status: &GrpcBackendStatus| {
            let [_, (url, route), ..] = backend_resources(
                "echo.shop",
                Some(status),
                &BackendSettings::default(),
                SystemTime::now(),
            );
            assert_eq!(url, type_url::ROUTE);
            RouteConfiguration::decode(route.value.as_slice()).unwrap()
        };
        let mut status = GrpcBackendStatus::default();
        assert_eq!(served(&status), route_configuration("echo.shop", &[]));
        status.routes = vec![entry(None, vec![], vec![backend("v1", 9), backend("v2", 1)])];
        let routed = served(&status);
        assert_eq!(routed, route_configuration("echo.shop", &status.routes));
        assert_eq!(
            clusters_of(&routed.virtual_hosts[0].routes[0]),
            [("v1.shop".to_string(), 9), ("v2.shop".to_string(), 1)]
        );
    }

    #[test]
    fn the_cache_names_only_backends_with_a_status_and_follows_them_as_they_come_and_go() {
        use std::time::SystemTime;

        use kubegrpc_crds::{GrpcBackendStatus, slow_start::SlowStart};
        use prost::Message;

        use crate::xds::{XdsCache, resources::type_url};

        let cache = XdsCache::default();
        let served_route = |cache: &XdsCache| {
            let found = cache.get(type_url::ROUTE, None);
            let (_, route) = found
                .iter()
                .find(|(name, _)| name == "echo.shop")
                .expect("echo's route");
            RouteConfiguration::decode(route.resource.value.as_slice()).unwrap()
        };
        let first_clusters = |cache: &XdsCache| clusters_of(&served_route(cache).virtual_hosts[0].routes[0]);
        let v1_alone = [("v1.shop".to_string(), 70)];
        let table = vec![
            entry(None, vec![], vec![backend("v1", 70), backend("ghost", 30)]),
            entry(None, vec![], vec![backend("ghost", 1)]),
        ];
        let status = GrpcBackendStatus {
            routes: table.clone(),
            ..Default::default()
        };
        let published = GrpcBackendStatus::default();
        cache.relist_started();
        cache.set_backend("shop", "echo", Some(&status), SlowStart::default());
        cache.set_backend("shop", "v1", Some(&published), SlowStart::default());
        cache.relist_done();
        // ghost does not exist: its share goes to v1, the entry naming it alone fails its calls.
        let routes = served_route(&cache).virtual_hosts.remove(0).routes;
        assert_eq!(clusters_of(&routes[0]), v1_alone);
        assert_eq!(
            routes[1].action,
            Some(Action::NonForwardingAction(NonForwardingAction {}))
        );

        // ghost is created: served, but without a status it is still left out of routes.
        cache.set_backend("shop", "ghost", None, SlowStart::default());
        assert!(!cache.get(type_url::CLUSTER, None).is_empty());
        assert_eq!(first_clusters(&cache), v1_alone);
        // Its first status: the parent's table names it, in a push.
        let generation = *cache.subscribe().borrow();
        cache.set_backend_with("shop", "ghost", Some(&published), Default::default(), SystemTime::now());
        assert!(*cache.subscribe().borrow() > generation);
        assert_eq!(served_route(&cache), route_configuration("echo.shop", &table));

        // ghost goes, by deletion or by a relist that does not list it: left out again.
        cache.remove_backend("shop", "ghost");
        assert_eq!(first_clusters(&cache), v1_alone);
        cache.set_backend("shop", "ghost", Some(&published), SlowStart::default());
        assert_eq!(served_route(&cache), route_configuration("echo.shop", &table));
        cache.relist_started();
        cache.set_backend("shop", "echo", Some(&status), SlowStart::default());
        cache.set_backend("shop", "v1", Some(&published), SlowStart::default());
        cache.relist_done();
        assert_eq!(first_clusters(&cache), v1_alone);

        // Its table gone, echo routes to its own Cluster again.
        cache.set_backend("shop", "echo", None, SlowStart::default());
        assert_eq!(served_route(&cache), route_configuration("echo.shop", &[]));
    }
}
