-- Inbound webhooks: an endpoint bound to an agent, served at
-- `/hooks/{id}` on the dispatcher's webhook port. Its signing secret is
-- sealed like every other secret (envelope encryption, rewrapped on key
-- rotation).
CREATE TABLE webhooks (
    id          uuid PRIMARY KEY,
    project     text NOT NULL,
    webhook_id  text NOT NULL,
    agent       text NOT NULL,
    labels      jsonb NOT NULL DEFAULT '{}',
    sealed      bytea NOT NULL,
    kek         text NOT NULL,
    creator     text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project, webhook_id)
);

-- Each accepted delivery, once: a repeat of its id finds the same session.
CREATE TABLE webhook_deliveries (
    webhook     uuid NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    delivery_id text NOT NULL,
    session_id  uuid NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (webhook, delivery_id)
);
