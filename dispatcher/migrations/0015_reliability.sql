-- Who made each API key (`keys/{id}`, `certificates/{name}`, `anonymous`,
-- `bootstrap`): a member revokes only the keys it made (and itself).
ALTER TABLE api_keys ADD COLUMN creator text NOT NULL DEFAULT '';

-- Keys revoked after a time: each dispatcher's revocation watch reads them
-- to end the revoked keys' open streams.
CREATE INDEX api_keys_revoked ON api_keys (revoke_time) WHERE revoke_time IS NOT NULL;

-- A delivery's signed content (SHA-256 of `{timestamp}.{body}`): the same
-- signed content under a new delivery id is a replay, refused.
ALTER TABLE webhook_deliveries ADD COLUMN content_sha256 bytea;
CREATE UNIQUE INDEX webhook_deliveries_content
    ON webhook_deliveries (webhook, content_sha256) WHERE content_sha256 IS NOT NULL;

-- What a create request asked (SHA-256, env values aside): the same
-- `request_id` with another request is refused, not answered with the
-- first session (AIP-155). NULL for sessions made before it was kept.
ALTER TABLE sessions ADD COLUMN request_sha256 bytea;
