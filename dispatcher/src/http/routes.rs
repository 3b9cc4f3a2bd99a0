//! The HTTP routes, read from the `google.api.http` option of each public
//! RPC in the compiled descriptors: the proto is their one source.

use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor, Value};

use super::template::{Bindings, Template};

/// One RPC's HTTP binding.
#[derive(Clone)]
pub(crate) struct Route {
    pub method: http::Method,
    pub template: Template,
    /// What the request body fills.
    pub body: BodyRule,
    pub rpc: MethodDescriptor,
    /// The gRPC path the call goes to: `/berth.v1.Sessions/StopSession`.
    pub grpc_path: String,
}

/// What a route's request body fills (`body:` in the rule).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BodyRule {
    /// No body: every field not in the path comes from the query string.
    None,
    /// `*`: the whole request, less the fields the path binds.
    All,
    /// One field of the request.
    Field(String),
}

impl Route {
    /// Whether the RPC streams its responses (served as Server-Sent Events).
    pub fn streams(&self) -> bool {
        self.rpc.is_server_streaming()
    }
}

/// What a request's method and path find.
pub(crate) enum Found<'a> {
    Route(&'a Route, Bindings),
    /// The path exists under other methods (405, with `Allow`).
    OtherMethods(Vec<http::Method>),
    Nowhere,
}

/// Every route, in the order the protos declare them.
pub(crate) struct Routes {
    routes: Vec<Route>,
}

impl Routes {
    /// The routes of `package`'s services in `pool`. Fails on a rule that
    /// cannot be served (a bad template, a client-streaming RPC, a body
    /// field that does not exist), so a mistake in a proto fails at start.
    pub fn from_pool(pool: &DescriptorPool, package: &str) -> anyhow::Result<Self> {
        let ext = pool
            .get_extension_by_name("google.api.http")
            .ok_or_else(|| anyhow::anyhow!("the descriptors lack google.api.http"))?;
        let mut routes = Vec::new();
        for service in pool.services().filter(|s| s.package_name() == package) {
            for rpc in service.methods() {
                let options = rpc.options();
                if !options.has_extension(&ext) {
                    continue;
                }
                let rule = options.get_extension(&ext);
                let Some(rule) = rule.as_message() else {
                    continue;
                };
                routes.push(
                    route(&rpc, rule).map_err(|e| {
                        anyhow::anyhow!("{}: google.api.http: {e}", rpc.full_name())
                    })?,
                );
            }
        }
        Ok(Self { routes })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    /// The route `method` and `path` name.
    pub fn find(&self, method: &http::Method, path: &str) -> Found<'_> {
        let mut others = Vec::new();
        for route in &self.routes {
            if let Some(bound) = route.template.matches(path) {
                if route.method == *method {
                    return Found::Route(route, bound);
                }
                others.push(route.method.clone());
            }
        }
        if others.is_empty() {
            Found::Nowhere
        } else {
            Found::OtherMethods(others)
        }
    }
}

fn route(rpc: &MethodDescriptor, rule: &DynamicMessage) -> Result<Route, String> {
    if rpc.is_client_streaming() {
        return Err("a client-streaming RPC has no HTTP binding".into());
    }
    let text = |name: &str| match rule.get_field_by_name(name).as_deref() {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    let (method, path) = [
        ("get", http::Method::GET),
        ("post", http::Method::POST),
        ("put", http::Method::PUT),
        ("delete", http::Method::DELETE),
        ("patch", http::Method::PATCH),
    ]
    .into_iter()
    .find_map(|(field, method)| text(field).map(|p| (method, p)))
    .ok_or("no method (get, post, put, delete, patch)")?;
    let template = Template::parse(&path)?;
    let input = rpc.input();
    for (field, _) in template.fields() {
        if input.get_field_by_name(&field).is_none() {
            return Err(format!("the path binds `{field}`, which the request lacks"));
        }
    }
    let body = match text("body").as_deref() {
        None => BodyRule::None,
        Some("*") => BodyRule::All,
        Some(field) if input.get_field_by_name(field).is_some() => {
            BodyRule::Field(field.to_string())
        }
        Some(field) => return Err(format!("the body names `{field}`, which the request lacks")),
    };
    Ok(Route {
        method,
        template,
        body,
        grpc_path: format!("/{}/{}", rpc.parent_service().full_name(), rpc.name()),
        rpc: rpc.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Routes {
        let pool = DescriptorPool::decode(berth_proto::FILE_DESCRIPTOR_SET).expect("descriptors");
        Routes::from_pool(&pool, "berth.v1").expect("routes")
    }

    #[test]
    fn every_public_rpc_but_the_bidirectional_one_has_a_route() {
        let pool = DescriptorPool::decode(berth_proto::FILE_DESCRIPTOR_SET).expect("descriptors");
        let routes = routes();
        let routed: Vec<String> = routes
            .iter()
            .map(|r| r.rpc.full_name().to_string())
            .collect();
        for service in pool.services().filter(|s| s.package_name() == "berth.v1") {
            for rpc in service.methods() {
                let bidi = rpc.is_client_streaming();
                assert_eq!(
                    routed.contains(&rpc.full_name().to_string()),
                    !bidi,
                    "{}",
                    rpc.full_name()
                );
            }
        }
    }

    #[test]
    fn methods_and_paths_find_their_rpc() {
        let routes = routes();
        let find = |m: http::Method, p: &str| match routes.find(&m, p) {
            Found::Route(r, bound) => Some((r.rpc.name().to_string(), bound)),
            _ => None,
        };
        assert_eq!(
            find(http::Method::POST, "/v1/sessions/abc:stop"),
            Some((
                "StopSession".into(),
                vec![("name".into(), "sessions/abc".into())]
            ))
        );
        assert_eq!(
            find(http::Method::GET, "/v1/sessions/abc/events:stream").map(|f| f.0),
            Some("StreamEvents".into())
        );
        assert_eq!(
            find(http::Method::GET, "/v1/sessions:search").map(|f| f.0),
            Some("SearchSessions".into())
        );
        assert!(matches!(
            routes.find(&http::Method::PUT, "/v1/sessions/abc"),
            Found::OtherMethods(m) if m.contains(&http::Method::GET) && m.contains(&http::Method::DELETE)
        ));
        assert!(matches!(
            routes.find(&http::Method::GET, "/v1/nothing"),
            Found::Nowhere
        ));
    }

    #[test]
    fn no_two_routes_claim_the_same_request() {
        let routes = routes();
        for a in routes.iter() {
            let (path, params) = a.template.openapi();
            let mut concrete = path.clone();
            for p in &params {
                concrete = concrete.replace(&format!("{{{p}}}"), "x1");
            }
            let claimed: Vec<&str> = routes
                .iter()
                .filter(|b| b.method == a.method && b.template.matches(&concrete).is_some())
                .map(|b| b.rpc.name())
                .collect();
            assert_eq!(claimed, vec![a.rpc.name()], "{} {path}", a.method);
        }
    }
}
