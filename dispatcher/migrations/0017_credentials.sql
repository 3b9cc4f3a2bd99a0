-- Credentials the node's gateway attaches to a session's HTTP requests
-- (usage `http_header`): the hosts they may go to and how they are sent.
-- The value stays in `sealed`. `last_use_time` is when a node last
-- reported attaching it.
ALTER TABLE secrets
    ADD COLUMN hosts text[] NOT NULL DEFAULT '{}',
    ADD COLUMN header_name text NOT NULL DEFAULT '',
    ADD COLUMN header_prefix text NOT NULL DEFAULT '',
    ADD COLUMN last_use_time timestamptz;
