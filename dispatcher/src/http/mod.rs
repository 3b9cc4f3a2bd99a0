//! The HTTP/JSON API, beside gRPC and grpc-web on the API port.
//!
//! Every public RPC with a `google.api.http` option (AIP-127) is a route:
//! `POST /v1/sessions`, `GET /v1/sessions/{session}`,
//! `POST /v1/sessions/{session}:sendMessage`… A request becomes the RPC's
//! protobuf request (body, query string and path, in proto3's JSON mapping)
//! and is sent, in process, through the same stack as a gRPC call: the
//! same authentication (Bearer API keys), rate limits, handlers, audit and
//! metrics. There is no second copy of any handler. The reply comes back
//! as JSON, an error as Google's JSON error body under AIP-193's HTTP
//! status, and a server-streaming RPC (`StreamEvents`) as Server-Sent
//! Events. `GET /openapi.json` describes it all (OpenAPI 3.1), generated
//! from the same routes. `/ui` is the web console on this API
//! ([`console`]).

mod console;
mod errors;
mod openapi;
mod respond;
mod routes;
mod sse;
mod template;
mod transcode;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::{Code, Status};
use tower::ServiceExt;

use crate::access::auth::Authenticator;
use routes::{Found, Route, Routes};
use template::Bindings;

/// The largest request body: a message at gRPC's limit, in JSON (bytes in
/// base64 grow by a third).
const MAX_BODY: usize = berth_common::grpc::MAX_MESSAGE_BYTES * 3 / 2 + 64 * 1024;

/// The routes and the OpenAPI document, built once at start.
pub(crate) struct Api {
    routes: Routes,
    openapi: Bytes,
    /// For the console's own calls (the API's go through the gRPC stack).
    auth: Arc<Authenticator>,
}

impl Api {
    /// Reads the routes from the compiled descriptors. Fails if a proto's
    /// HTTP rule cannot be served.
    pub fn new(auth: Arc<Authenticator>) -> anyhow::Result<Arc<Self>> {
        let pool = prost_reflect::DescriptorPool::decode(berth_proto::FILE_DESCRIPTOR_SET)?;
        let routes = Routes::from_pool(&pool, "berth.v1")?;
        let openapi = serde_json::to_vec(&openapi::document(&routes))?.into();
        Ok(Arc::new(Self {
            routes,
            openapi,
            auth,
        }))
    }

    /// `/ui`: the console's assets, and its Markdown renderer (for a
    /// caller with a key).
    async fn console(&self, req: http::Request<Body>) -> http::Response<Body> {
        let path = req.uri().path().to_string();
        let mut response = match (req.method().clone(), path.as_str()) {
            (http::Method::GET, _) => console::asset(&path).unwrap_or_else(|| {
                errors::response(&Status::not_found(format!("no console page {path}")))
            }),
            (http::Method::POST, "/ui/markdown") => {
                match self.auth.authenticate(req.headers(), None).await {
                    Err(status) => errors::response(&status),
                    Ok(_) => {
                        let limited =
                            http_body_util::Limited::new(req.into_body(), 4 * 1024 * 1024 + 4096);
                        match limited
                            .collect()
                            .await
                            .map(|c| console::render(&c.to_bytes()))
                        {
                            Ok(Ok(json)) => respond::json(StatusCode::OK, &json),
                            Ok(Err(why)) => errors::response(&transcode::invalid("texts", why)),
                            Err(_) => errors::response(&transcode::invalid(
                                "body",
                                "the body could not be read, or is over 4 MiB",
                            )),
                        }
                    }
                }
            }
            _ => method_not_allowed(&path, vec![http::Method::GET]),
        };
        console::harden(&mut response);
        response
    }

    async fn serve<S>(&self, inner: S, req: http::Request<Body>) -> http::Response<Body>
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    {
        let path = req.uri().path().to_string();
        if console::is_console(&path) {
            return self.console(req).await;
        }
        if path == "/openapi.json" {
            return if req.method() == http::Method::GET {
                respond::bytes(StatusCode::OK, "application/json", self.openapi.clone())
            } else {
                method_not_allowed(&path, vec![http::Method::GET])
            };
        }
        match self.routes.find(req.method(), &path) {
            Found::Route(route, bound) => call(inner, route, bound, req).await,
            Found::OtherMethods(allowed) => method_not_allowed(&path, allowed),
            Found::Nowhere => errors::response(&Status::not_found(format!(
                "no route {} {path}: GET /openapi.json lists them",
                req.method()
            ))),
        }
    }
}

/// Whether a request is the HTTP API's (gRPC paths are `/package.Service/…`).
fn is_http(path: &str) -> bool {
    path.starts_with("/v1/") || path == "/openapi.json" || console::is_console(path)
}

/// One route's call: the request message, the in-process gRPC call, and
/// its reply as JSON (or as events).
async fn call<S>(
    inner: S,
    route: &Route,
    bound: Bindings,
    req: http::Request<Body>,
) -> http::Response<Body>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    let (mut parts, body) = req.into_parts();
    let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let status = berth_common::grpc::rich_status(
                Code::ResourceExhausted,
                format!("the body is over {MAX_BODY} bytes"),
                "BODY_TOO_LARGE",
                Some("body"),
                None,
            );
            let mut response = errors::response(&status);
            *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
            return response;
        }
        Err(e) => {
            return errors::response(&transcode::invalid(
                "body",
                format!("the body could not be read: {e}"),
            ));
        }
    };
    let last_event_id = parts
        .headers
        .get(transcode::LAST_EVENT_ID)
        .and_then(|v| v.to_str().ok());
    let message = match transcode::request(route, bound, parts.uri.query(), last_event_id, &body) {
        Ok(message) => message,
        Err(status) => return errors::response(&status),
    };
    // The same request, as gRPC: its headers (the key), its extensions
    // (the connection's peer certificate) and a protobuf body.
    parts.method = http::Method::POST;
    parts.version = http::Version::HTTP_2;
    parts.uri = match route.grpc_path.parse() {
        Ok(uri) => uri,
        Err(e) => return errors::response(&Status::internal(format!("gRPC path: {e}"))),
    };
    for name in [
        header::CONTENT_LENGTH,
        header::CONTENT_ENCODING,
        header::ACCEPT_ENCODING,
        header::TRANSFER_ENCODING,
    ] {
        parts.headers.remove(name);
    }
    parts.headers.remove("grpc-encoding");
    parts.headers.remove("grpc-accept-encoding");
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    parts
        .headers
        .insert(header::TE, HeaderValue::from_static("trailers"));
    let grpc = http::Request::from_parts(
        parts,
        Body::new(http_body_util::Full::new(transcode::frame(&message))),
    );
    let Ok(response) = inner.oneshot(grpc).await else {
        return errors::response(&Status::internal("the call could not be made"));
    };
    let (head, body) = response.into_parts();
    if let Some(status) = failed(&head.headers) {
        return errors::response(&status);
    }
    if route.streams() {
        return sse::response(route.rpc.output(), body);
    }
    unary_reply(route, body).await
}

/// A unary call's reply body (one message, then trailers) as JSON.
async fn unary_reply(route: &Route, body: Body) -> http::Response<Body> {
    let collected = match body.collect().await {
        Ok(collected) => collected,
        Err(status) => return errors::response(&status),
    };
    if let Some(status) = collected.trailers().and_then(failed) {
        return errors::response(&status);
    }
    let mut buf = bytes::BytesMut::from(collected.to_bytes());
    let reply = transcode::next_message(&mut buf).and_then(|m| {
        let m = m.ok_or_else(|| Status::internal("the call ended without a reply"))?;
        transcode::reply(&transcode::decode(&route.rpc.output(), &m)?)
    });
    match reply {
        Ok(json) => respond::bytes(StatusCode::OK, "application/json", json),
        Err(status) => errors::response(&status),
    }
}

/// The call's status in `headers` (a trailers-only reply, or trailers)
/// when it is not OK.
fn failed(headers: &http::HeaderMap) -> Option<Status> {
    Status::from_header_map(headers).filter(|s| s.code() != Code::Ok)
}

fn method_not_allowed(path: &str, allowed: Vec<http::Method>) -> http::Response<Body> {
    let names: Vec<&str> = allowed.iter().map(http::Method::as_str).collect();
    let status = Status::unimplemented(format!("{path} takes {}", names.join(", ")));
    let mut response = errors::response(&status);
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    if let Ok(allow) = HeaderValue::from_str(&names.join(", ")) {
        response.headers_mut().insert(header::ALLOW, allow);
    }
    response
}

/// Tower layer: serves the HTTP API's paths, and passes every other
/// request (gRPC, grpc-web) on unchanged.
#[derive(Clone)]
pub(crate) struct HttpLayer(pub Arc<Api>);

impl<S> tower::Layer<S> for HttpLayer {
    type Service = HttpService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        HttpService {
            inner,
            api: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct HttpService<S> {
    inner: S,
    api: Arc<Api>,
}

impl<S, B> tower::Service<http::Request<Body>> for HttpService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The ready service is the one to call; leave a fresh clone behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        if !is_http(req.uri().path()) {
            let mut inner = inner;
            let call = inner.call(req);
            return Box::pin(async move { Ok(call.await?.map(Body::new)) });
        }
        let api = self.api.clone();
        let inner = inner.map_response(|r: http::Response<B>| r.map(Body::new));
        Box::pin(async move { Ok(api.serve(inner, req).await) })
    }
}
