"""berth's HTTP/JSON API from Python's standard library alone (urllib, no
client package), against a live dispatcher: every route, the errors, and
the SSE live tail resumed after a cut connection.

Started by the Rust end-to-end test `http::every_route_works_from_the_standard_library`,
which sets BERTH_URL (http://127.0.0.1:PORT), BERTH_TOKEN (a fleet-admin
key) and BERTH_TEST_IMAGE. Run: python3 -m unittest -v test_http
"""

import base64
import hashlib
import json
import os
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
import uuid

URL = os.environ["BERTH_URL"].rstrip("/")
TOKEN = os.environ["BERTH_TOKEN"]
IMAGE = os.environ.get("BERTH_TEST_IMAGE", "berth-test-agent:latest")


class HttpError(Exception):
    def __init__(self, status, body, headers):
        super().__init__("%d %s" % (status, body))
        self.status, self.body, self.headers = status, body, headers


def call(method, path, body=None, token=TOKEN, headers=None):
    """One request; the decoded JSON reply, or HttpError with the JSON error."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(URL + path, data=data, method=method)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw.decode(errors="replace")
        raise HttpError(e.code, parsed, e.headers) from None


def sse(path, last_event_id=None, stop_after=None, timeout=120):
    """Reads Server-Sent Events until the `end` event (or `stop_after`
    messages, then drops the connection): ([(id, data)], end data or None)."""
    req = urllib.request.Request(URL + path)
    req.add_header("Authorization", "Bearer " + TOKEN)
    req.add_header("Accept", "text/event-stream")
    if last_event_id is not None:
        req.add_header("Last-Event-ID", str(last_event_id))
    events, end = [], None
    with urllib.request.urlopen(req, timeout=timeout) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream"), r.headers
        fields = {}
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line.startswith(":"):
                continue
            if line:
                k, _, v = line.partition(":")
                fields[k] = v[1:] if v.startswith(" ") else v
                continue
            if "data" not in fields:
                # A frame with no data (a keep-alive comment's blank line)
                # dispatches nothing, as EventSource does.
                fields = {}
                continue
            if fields.get("event") == "end":
                end = json.loads(fields["data"])
                break
            events.append((fields.get("id"), json.loads(fields["data"])))
            fields = {}
            if stop_after is not None and len(events) >= stop_after:
                break
    return events, end


def wait_for(what, check, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError("timed out waiting for " + what)


def texts(session):
    page = call("GET", "/v1/%s/events?pageSize=1000" % session)
    out = []
    for e in page["events"]:
        if e["type"] == "agent.message":
            out.append(json.loads(e["payloadJson"]).get("text", ""))
    return out


class HttpTest(unittest.TestCase):
    def create(self, message, **extra):
        body = {"spec": {"image": IMAGE}, "initialMessage": message}
        body.update(extra)
        return call("POST", "/v1/sessions", body)

    def idle(self, name):
        return wait_for(
            name + " idle",
            lambda: (lambda s: s if s["activity"] == "ACTIVITY_IDLE"
                     and s["status"] in ("SESSION_STATUS_RUNNING", "SESSION_STATUS_IDLE") else None)(
                call("GET", "/v1/" + name)),
        )

    def test_a_session_from_create_to_delete(self):
        s = self.create("echo hello over http", displayName="http")
        name = s["name"]
        self.assertTrue(name.startswith("sessions/"), s)
        self.assertEqual(s["spec"]["image"], IMAGE)
        # Proto3 JSON: 64-bit integers are strings, every field is present.
        self.assertIsInstance(s["lastSeq"], str)
        self.idle(name)
        self.assertIn("hello over http", texts(name))
        sent = call("POST", "/v1/%s:sendMessage" % name, {"text": "echo second"})
        self.assertGreater(int(sent["seq"]), 0)
        wait_for("the second reply", lambda: "second" in texts(name))
        # Paged, in seq order.
        first = call("GET", "/v1/%s/events?pageSize=2" % name)
        self.assertEqual([e["seq"] for e in first["events"]], ["1", "2"])
        rest = call("GET", "/v1/%s/events?pageSize=1000&pageToken=%s" % (name, first["nextPageToken"]))
        self.assertEqual(rest["events"][0]["seq"], "3")
        # Listed, found by search, read back.
        listed = call("GET", "/v1/sessions?pageSize=100")
        self.assertIn(name, [x["name"] for x in listed["sessions"]])
        found = call("GET", "/v1/sessions:search?query=second")
        self.assertIn(name, [m["session"]["name"] for m in found["matches"]])
        call("POST", "/v1/%s:interrupt" % name, {})
        md = call("GET", "/v1/%s:export?format=EXPORT_FORMAT_MARKDOWN" % name)
        self.assertIn("hello over http", md["content"])
        pdf = call("GET", "/v1/%s:export?format=EXPORT_FORMAT_PDF" % name)
        self.assertTrue(base64.b64decode(pdf["data"]).startswith(b"%PDF"))
        fb = call("POST", "/v1/%s/feedback" % name, {"turn": "1", "rating": 5, "comment": "good"})
        self.assertEqual(fb["rating"], 5)
        self.assertEqual(call("GET", "/v1/%s/feedback" % name)["feedback"][0]["comment"], "good")
        clone = call("POST", "/v1/%s:clone" % name, {"requestId": str(uuid.uuid4())})
        self.assertNotEqual(clone["name"], name)
        stopped = call("POST", "/v1/%s:stop" % name)
        self.assertIn(stopped["status"], ("SESSION_STATUS_STOPPING", "SESSION_STATUS_STOPPED"))
        wait_for("stopped", lambda: call("GET", "/v1/" + name)["status"] == "SESSION_STATUS_STOPPED")
        archived = call("POST", "/v1/%s:archive" % name, {})
        self.assertNotEqual(archived["archiveTime"], None)
        for n in (name, clone["name"]):
            if n != name:
                call("POST", "/v1/%s:stop" % n)
                wait_for("clone stopped", lambda: call("GET", "/v1/" + n)["status"] in (
                    "SESSION_STATUS_STOPPED", "SESSION_STATUS_FAILED"))
            call("DELETE", "/v1/" + n)
            with self.assertRaises(HttpError) as e:
                call("GET", "/v1/" + n)
            self.assertEqual(e.exception.status, 404)

    def test_the_live_tail_resumes_after_a_cut_with_no_gap_and_no_repeat(self):
        s = self.create("events 30 64")
        name = s["name"]
        head, end = sse("/v1/%s/events:stream" % name, stop_after=5)
        self.assertIsNone(end)
        self.assertEqual([int(i) for i, _ in head], [1, 2, 3, 4, 5])
        # An EventSource reconnects with the last id it saw.
        self.idle(name)
        call("POST", "/v1/%s:stop" % name)
        tail, end = sse("/v1/%s/events:stream" % name, last_event_id=head[-1][0])
        self.assertEqual(end, {}, "the stream ends cleanly once the session stops")
        seqs = [int(i) for i, _ in head + tail]
        self.assertEqual(seqs, list(range(1, len(seqs) + 1)), "gapless, in order, no repeats")
        self.assertTrue(all(str(d["seq"]) == i for i, d in head + tail))
        self.assertGreaterEqual(sum(1 for _, d in tail if d["type"] == "agent.message"), 30)
        self.assertTrue(tail[-1][1]["type"].startswith("session.status_"), tail[-1][1])

    def test_an_approval_answered_over_http(self):
        s = self.create("edit notes.txt approved over http")
        name = s["name"]
        waiting = wait_for("a tool request", lambda: (lambda x: x if x["pendingToolRequests"] else None)(
            call("GET", "/v1/" + name)))
        self.assertEqual(waiting["activity"], "ACTIVITY_WAITING_INPUT")
        req = waiting["pendingToolRequests"][0]
        self.assertEqual(req["toolName"], "Write")
        with self.assertRaises(HttpError) as e:
            call("POST", "/v1/%s:confirmTool" % name, {"toolUseId": req["toolUseId"], "decision": "NOPE"})
        self.assertEqual(e.exception.status, 400)
        self.assertIn("decision", e.exception.body["error"]["message"])
        call("POST", "/v1/%s:confirmTool" % name, {"toolUseId": req["toolUseId"], "decision": "TOOL_DECISION_ALLOW"})
        wait_for("the write's reply", lambda: any(t.startswith("done") for t in texts(name)))
        call("POST", "/v1/%s:sendMessage" % name, {"text": "read notes.txt"})
        wait_for("the file's content", lambda: "approved over http" in texts(name))
        call("POST", "/v1/%s:stop" % name)

    def test_questions_answered_over_http(self):
        s = self.create("ask")
        name = s["name"]
        waiting = wait_for("a question", lambda: (lambda x: x if x["pendingToolRequests"] else None)(
            call("GET", "/v1/" + name)))
        req = waiting["pendingToolRequests"][0]
        self.assertEqual(req["toolName"], "AskUserQuestion")
        asked = json.loads(req["inputJson"])["questions"]
        self.assertEqual([q["header"] for q in asked], ["Color", "Sizes"])
        path = "/v1/%s:answerQuestion" % name
        with self.assertRaises(HttpError) as e:
            call("POST", path, {"toolUseId": req["toolUseId"], "answers": [
                {"question": "Color", "labels": ["Green"]}, {"question": "Sizes", "labels": ["Small"]}]})
        self.assertEqual(e.exception.status, 400)
        self.assertIn("answers[0].labels[0]", e.exception.body["error"]["message"])
        call("POST", path, {"toolUseId": req["toolUseId"], "answers": [
            {"question": "Color", "text": "green, like grass"}, {"question": "Sizes", "labels": ["Medium"]}]})
        wait_for("the agent's use of the answers",
                 lambda: any('"Which color should the button be?"="green, like grass"' in t for t in texts(name)))
        call("POST", "/v1/%s:stop" % name)

    def test_errors_are_json_under_the_right_status(self):
        with self.assertRaises(HttpError) as e:
            call("GET", "/v1/sessions", token=None)
        self.assertEqual(e.exception.status, 401)
        self.assertEqual(e.exception.body["error"]["status"], "UNAUTHENTICATED")
        self.assertIn("Bearer", e.exception.headers["WWW-Authenticate"])
        with self.assertRaises(HttpError) as e:
            call("GET", "/v1/sessions", token="berth_nope_nope")
        self.assertEqual(e.exception.status, 401)
        with self.assertRaises(HttpError) as e:
            call("POST", "/v1/sessions", {"spec": {"image": ""}})
        err = e.exception.body["error"]
        self.assertEqual((e.exception.status, err["status"], err["reason"]), (400, "INVALID_ARGUMENT", "INVALID_FIELD"))
        bad = [d for d in err["details"] if d["@type"].endswith("google.rpc.BadRequest")][0]
        self.assertEqual(bad["fieldViolations"][0]["field"], "spec.image")
        with self.assertRaises(HttpError) as e:
            call("POST", "/v1/sessions", {"spec": {"image": 7}})
        self.assertEqual(e.exception.status, 400)
        self.assertTrue(e.exception.body["error"]["message"].startswith("spec.image"), e.exception.body)
        # Text Postgres cannot store is the caller's error, not the server's.
        with self.assertRaises(HttpError) as e:
            call("POST", "/v1/apiKeys", {"role": "ROLE_MEMBER", "displayName": "a\u0000b"})
        self.assertEqual((e.exception.status, e.exception.body["error"]["reason"]), (400, "INVALID_FIELD"))
        self.assertIn("display_name", e.exception.body["error"]["message"])
        with self.assertRaises(HttpError) as e:
            call("POST", "/v1/sessions", {"spec": {"image": IMAGE}, "initialMessage": "nul \u0000 here"})
        self.assertEqual(e.exception.status, 400, e.exception.body)
        with self.assertRaises(HttpError) as e:
            call("GET", "/v1/sessions?pageSize=lots")
        self.assertEqual(e.exception.status, 400)
        with self.assertRaises(HttpError) as e:
            call("GET", "/v1/sessions/%s" % uuid.uuid4())
        self.assertEqual((e.exception.status, e.exception.body["error"]["reason"]), (404, "SESSION_NOT_FOUND"))
        with self.assertRaises(HttpError) as e:
            call("GET", "/v1/nowhere")
        self.assertEqual(e.exception.status, 404)
        with self.assertRaises(HttpError) as e:
            call("PUT", "/v1/sessions")
        self.assertEqual(e.exception.status, 405)
        self.assertIn("GET", e.exception.headers["Allow"])

    def test_agents_files_keys_secrets_and_the_rest(self):
        me = call("GET", "/v1/whoami")
        self.assertEqual(me["role"], "ROLE_FLEET_ADMIN")
        agent_id = "http-" + uuid.uuid4().hex[:8]
        a = call("POST", "/v1/agents", {"agentId": agent_id, "spec": {"image": IMAGE}})
        self.assertEqual(a["name"], "agents/" + agent_id)
        self.assertEqual(call("GET", "/v1/" + a["name"])["version"], "1")
        b = call("PATCH", "/v1/" + a["name"], {"spec": {"image": IMAGE, "model": "m2"}})
        self.assertEqual(b["version"], "2")
        self.assertIn(a["name"], [x["name"] for x in call("GET", "/v1/agents")["agents"]])
        content = b"file over http\n"
        f = call("POST", "/v1/files", {"displayName": "f.txt", "content": base64.b64encode(content).decode()})
        self.assertEqual(f["sha256"], hashlib.sha256(content).hexdigest())
        self.assertEqual(call("GET", "/v1/" + f["name"])["sizeBytes"], str(len(content)))
        call("DELETE", "/v1/" + f["name"])
        key = call("POST", "/v1/apiKeys", {"role": "ROLE_MEMBER", "displayName": "http member"})
        member = key["token"]
        self.assertEqual(call("GET", "/v1/whoami", token=member)["role"], "ROLE_MEMBER")
        self.assertIn(key["key"]["name"], [k["name"] for k in call("GET", "/v1/apiKeys")["keys"]])
        call("POST", "/v1/%s:revoke" % key["key"]["name"])
        def revoked():
            try:
                call("GET", "/v1/whoami", token=member)
                return False
            except HttpError as e:
                return e.status == 401
        wait_for("the revocation", revoked, timeout=30)
        secret = call("POST", "/v1/secrets", {"displayName": "http-s", "usage": "SECRET_USAGE_ANTHROPIC_API_KEY", "value": "hunter2"})
        self.assertNotIn("hunter2", json.dumps(secret))
        self.assertEqual(call("GET", "/v1/" + secret["name"])["displayName"], "http-s")
        self.assertIn(secret["name"], [x["name"] for x in call("GET", "/v1/secrets")["secrets"]])
        call("DELETE", "/v1/" + secret["name"])
        nodes = call("GET", "/v1/nodes")["nodes"]
        self.assertTrue(nodes)
        node = nodes[0]["name"]
        call("POST", "/v1/nodes/%s:drain" % urllib.parse.quote(node, safe=""))
        self.assertEqual(
            [n["state"] for n in call("GET", "/v1/nodes")["nodes"] if n["name"] == node],
            ["NODE_STATE_DRAINING"],
        )
        call("POST", "/v1/nodes/%s:undrain" % urllib.parse.quote(node, safe=""))
        sched = call("POST", "/v1/schedules", {
            "scheduleId": "http-" + uuid.uuid4().hex[:8],
            "schedule": {"cron": "0 0 1 1 *", "agent": b["name"], "input": "echo sched"},
        })
        self.assertIn(sched["name"], [x["name"] for x in call("GET", "/v1/schedules")["schedules"]])
        call("POST", "/v1/%s:suspend" % sched["name"])
        call("POST", "/v1/%s:resume" % sched["name"])
        fire = call("POST", "/v1/%s:trigger" % sched["name"], {"requestId": str(uuid.uuid4())})
        self.assertTrue(fire["session"].startswith("sessions/"), fire)
        call("POST", "/v1/%s:stop" % fire["session"])
        self.assertTrue(call("GET", "/v1/%s/fires" % sched["name"])["fires"])
        self.assertEqual(call("GET", "/v1/" + sched["name"])["name"], sched["name"])
        call("DELETE", "/v1/" + sched["name"])
        hook = call("POST", "/v1/webhooks", {"webhookId": "http-" + uuid.uuid4().hex[:8],
                                             "webhook": {"agent": b["name"]}})
        hook_name = hook["webhook"]["name"]
        self.assertEqual(call("GET", "/v1/" + hook_name)["name"], hook_name)
        self.assertIn(hook_name, [x["name"] for x in call("GET", "/v1/webhooks")["webhooks"]])
        call("DELETE", "/v1/" + hook_name)
        sub = call("POST", "/v1/subscriptions", {"subscriptionId": "http-" + uuid.uuid4().hex[:8],
                                                 "subscription": {"url": "https://127.0.0.1:9/berth-hook", "eventTypes": ["session.idle"]}})
        sub_name = sub["subscription"]["name"]
        self.assertIn(sub_name, [x["name"] for x in call("GET", "/v1/subscriptions")["subscriptions"]])
        self.assertEqual(call("GET", "/v1/%s/deliveries" % sub_name)["deliveries"], [])
        call("DELETE", "/v1/" + sub_name)
        call("POST", "/v1/%s:archive" % a["name"])
        self.assertTrue(call("GET", "/v1/" + a["name"])["archived"])
        audit = call("GET", "/v1/auditEvents?pageSize=500")["events"]
        self.assertTrue(any(e["resource"] == secret["name"] for e in audit), "HTTP calls are audited")

    def test_the_openapi_document_lists_every_route(self):
        with urllib.request.urlopen(URL + "/openapi.json", timeout=30) as r:
            doc = json.load(r)
        self.assertEqual(doc["openapi"], "3.1.0")
        ops = {(m, p) for p, item in doc["paths"].items() for m in item}
        for want in [("post", "/v1/sessions"), ("get", "/v1/sessions/{session}/events:stream"),
                     ("post", "/v1/sessions/{session}:sendMessage"), ("delete", "/v1/sessions/{session}")]:
            self.assertIn(want, ops)


if __name__ == "__main__":
    unittest.main()
