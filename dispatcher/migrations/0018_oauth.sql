-- OAuth 2.0 refresh credentials (usage `oauth2_refresh`): the client, the
-- current access token (sealed) and when it expires, the last refresh and
-- its error, and a lease so that one dispatcher at a time refreshes a
-- credential (a rotated refresh token must not be spent twice).
ALTER TABLE secrets
    ADD COLUMN oauth_token_url text NOT NULL DEFAULT '',
    ADD COLUMN oauth_client_id text NOT NULL DEFAULT '',
    ADD COLUMN oauth_scope text NOT NULL DEFAULT '',
    ADD COLUMN access_sealed bytea,
    ADD COLUMN access_kek text,
    ADD COLUMN access_expire_time timestamptz,
    ADD COLUMN last_refresh_time timestamptz,
    ADD COLUMN last_refresh_error text NOT NULL DEFAULT '',
    ADD COLUMN refresh_lease_until timestamptz,
    ADD COLUMN refresh_lease_owner text NOT NULL DEFAULT '';
