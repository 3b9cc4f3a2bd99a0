//! OAuth 2.0 refresh credentials against a loopback token endpoint that
//! expires access tokens after 3 seconds and rotates refresh tokens: a long
//! session keeps working across refreshes, a host's 401 brings a refresh at
//! once, and a revoked refresh token is an event and a clear tool error.

use berth_proto::v1::{self as pb, secrets_client::SecretsClient, sessions_client::SessionsClient};
use berth_tests::*;

use crate::access;
use crate::credentials::{McpHost, where_found};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oauth_credential_is_refreshed_and_rotated_and_a_revoked_one_says_so()
-> anyhow::Result<()> {
    let first_refresh = format!("rt-0-{}", uuid::Uuid::new_v4().simple());
    let endpoint = berth_tests::oauth::TokenEndpoint::start(
        "berth",
        "client-s3cret",
        &first_refresh,
        std::time::Duration::from_secs(3),
    )
    .await?;
    let tokens = endpoint.tokens_file().display().to_string();
    let server = McpHost::with(&["--mcp-token-file", &tokens])?;
    let (allow, token_host) = (vec![server.addr.to_string()], endpoint.addr.to_string());
    let cluster = TestCluster::builder()
        .configure_dispatcher(move |cfg| cfg.oauth_allow_http_hosts = vec![token_host.clone()])
        .configure_node(move |_, cfg, _| cfg.egress_allow_internal = allow.clone())
        .start()
        .await?;
    let (alpha, _) = access::member_of(&cluster, "alpha").await?;
    let mut secrets = SecretsClient::new(alpha.clone());
    let oauth = |url: String| pb::OAuth2Client {
        token_url: url,
        client_id: "berth".into(),
        client_secret: "client-s3cret".into(),
        scope: String::new(),
    };
    // A plain-http token endpoint the operator did not allow is refused.
    let err = secrets
        .create_secret(pb::CreateSecretRequest {
            usage: pb::SecretUsage::Oauth2Refresh as i32,
            value: first_refresh.clone(),
            hosts: vec![server.addr.to_string()],
            oauth: Some(oauth("http://198.51.100.7/token".into())),
            ..Default::default()
        })
        .await
        .expect_err("plain http");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("oauth.token_url"),
        "{}",
        err.message()
    );
    let secret = secrets
        .create_secret(pb::CreateSecretRequest {
            display_name: "crm".into(),
            usage: pb::SecretUsage::Oauth2Refresh as i32,
            value: first_refresh.clone(),
            hosts: vec![server.addr.to_string()],
            oauth: Some(oauth(endpoint.url())),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        secret.oauth.as_ref().map(|o| o.client_secret.as_str()),
        Some(""),
        "the client secret is write-only"
    );

    let mut c = SessionsClient::new(alpha.clone());
    let mut req = fake_session(r#"mcp docs lookup {"query":"one"}"#);
    req.spec.as_mut().expect("spec").mcp_servers = vec![pb::McpServer {
        name: "docs".into(),
        transport: Some(pb::mcp_server::Transport::Remote(pb::McpRemote {
            url: format!("http://{}/mcp", server.addr),
            credential: secret.name.clone(),
        })),
    }];
    req.spec.as_mut().expect("spec").tool_policy = Some(pb::ToolPolicy {
        allowed_tools: vec!["mcp__docs__lookup".into()],
        ..Default::default()
    });
    let s = c.create_session(req).await?.into_inner();
    assert!(
        reply_after(&mut c, &s.name, 0)
            .await?
            .contains("looked up: one")
    );
    // A long session keeps working as its 3-second tokens expire: the
    // dispatcher refreshes each (rotating the refresh token) and sends the
    // new one to the node.
    for word in ["two", "three"] {
        tokio::time::sleep(std::time::Duration::from_secs(4)).await;
        let reply = turn(
            &mut c,
            &s.name,
            &format!(r#"mcp docs lookup {{"query":"{word}"}}"#),
        )
        .await?;
        assert!(reply.contains(&format!("looked up: {word}")), "{reply}");
    }
    assert!(endpoint.issued() >= 3, "{} refreshes", endpoint.issued());
    assert!(
        endpoint.stale_presented().is_empty(),
        "a rotated refresh token was used again"
    );
    let requests = server.requests();
    assert!(
        requests.len() >= 5 && requests.iter().all(|(_, a)| a.starts_with("Bearer at-")),
        "{requests:?}"
    );
    let got = secrets
        .get_secret(pb::GetSecretRequest {
            name: secret.name.clone(),
        })
        .await?
        .into_inner();
    assert!(
        got.last_refresh_time.is_some() && got.last_refresh_error.is_empty(),
        "{got:?}"
    );

    // A host that refuses the current token (the provider dropped it): the
    // gateway reports the 401, the dispatcher refreshes at once, and the
    // next call works.
    let before = endpoint.issued();
    endpoint.forget_access_tokens();
    let refused = turn(&mut c, &s.name, r#"mcp docs lookup {"query":"refused"}"#).await?;
    assert!(refused.contains("401"), "{refused}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while endpoint.issued() == before && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        endpoint.issued() > before,
        "the 401 did not bring a refresh"
    );
    let again = turn(&mut c, &s.name, r#"mcp docs lookup {"query":"again"}"#).await?;
    assert!(again.contains("looked up: again"), "{again}");

    // Revoked: the next refresh fails; the session is told which credential,
    // and the agent's call fails saying why.
    endpoint.revoke();
    let events = collect_until(
        &mut c,
        &s.name,
        0,
        std::time::Duration::from_secs(30),
        |e| e.r#type == "session.credential_failed",
    )
    .await?;
    let failed = payload(events.last().expect("an event"));
    assert_eq!(failed["credential"], secret.name.as_str());
    assert!(
        failed["message"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid_grant"),
        "{failed}"
    );
    let reply = turn(&mut c, &s.name, r#"mcp docs lookup {"query":"four"}"#).await?;
    assert!(
        reply.contains("could not be refreshed") && reply.contains(&secret.name),
        "{reply}"
    );
    let got = secrets
        .get_secret(pb::GetSecretRequest {
            name: secret.name.clone(),
        })
        .await?
        .into_inner();
    assert!(got.last_refresh_error.contains("invalid_grant"), "{got:?}");

    // No token, access or refresh, anywhere the session or its user sees.
    for token in endpoint.all_tokens() {
        let found = where_found(&cluster, &mut c, &s, &token).await?;
        assert!(found.is_empty(), "{token} is in {found:?}");
    }
    assert!(!access::all_rows(&cluster).await?.contains("client-s3cret"));
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await?;
    endpoint.stop().await;
    Ok(())
}
