"""berth-client against a real dispatcher (started by the Rust end-to-end
test `clients::the_python_package_works_against_a_real_dispatcher`, which sets BERTH_DISPATCHER, BERTH_TOKEN and
BERTH_TEST_IMAGE). Run from this directory, against the installed package:
python -m unittest -v test_client"""

import asyncio
import os
import socket
import struct
import threading
import unittest
import urllib.request
import uuid

import grpc

import berth
from berth.v1 import access_pb2, sessions_pb2

DISPATCHER = os.environ["BERTH_DISPATCHER"]
TOKEN = os.environ["BERTH_TOKEN"]
IMAGE = os.environ.get("BERTH_TEST_IMAGE", "berth-test-agent:latest")


class CuttableProxy:
    """A TCP proxy on loopback whose connections can be cut, as a load
    balancer or a dispatcher restart would."""

    def __init__(self, upstream: str):
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.addr = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.conns = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            a.close()

    def cut(self):
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self):
        self.cut()
        self.listener.close()


class ClientTest(unittest.TestCase):
    def setUp(self):
        self.client = berth.Client(DISPATCHER, TOKEN)

    def tearDown(self):
        self.client.close()

    def test_run_waits_for_the_turn_and_stops_the_session(self):
        r = self.client.run("echo hello from python", image=IMAGE, timeout=120)
        self.assertIn("hello from python", r.text)
        self.assertIsNotNone(r.usage)
        self.assertGreater(r.usage.total.get("output_tokens", 0), 0)
        self.assertTrue(any(isinstance(e, berth.UserMessage) for e in r.events))
        s = self.client.get_session(r.session.id)
        self.assertIn(
            sessions_pb2.SessionStatus.Name(s.status),
            ("SESSION_STATUS_STOPPING", "SESSION_STATUS_STOPPED"),
        )

    def test_stream_events_resumes_after_a_cut_without_gaps_or_repeats(self):
        proxy = CuttableProxy(DISPATCHER.split("://", 1)[-1])
        try:
            via = berth.Client("http://" + proxy.addr, TOKEN)
            s = self.client.create_session("events 40 64", image=IMAGE)
            seqs, cut = [], False
            for e in via.stream_events(s.id, timeout=120):
                seqs.append(e.seq)
                if len(seqs) == 5 and not cut:
                    proxy.cut()
                    cut = True
                if e.ends_turn:
                    break
            self.assertTrue(cut)
            self.assertEqual(seqs, list(range(1, len(seqs) + 1)), "gapless, in order, no repeats")
            # The 40 scripted messages (and the turn's closing reply), each once.
            texts = [e for e in self.client.list_events(s.id) if isinstance(e, berth.AgentMessage)]
            self.assertGreaterEqual(len(texts), 40)
            self.assertEqual(len(seqs), len({e.seq for e in self.client.list_events(s.id) if e.seq <= seqs[-1]}))
            via.close()
            self.client.stop(s.id)
        finally:
            proxy.close()

    def test_errors_carry_reason_field_and_retry_details(self):
        with self.assertRaises(berth.BerthError) as e:
            self.client.create_session("hi", image="")
        err = e.exception
        self.assertEqual(err.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(err.reason, "INVALID_FIELD")
        self.assertTrue(err.field_violations, err)
        self.assertIn("image", err.field_violations[0][0])
        with self.assertRaises(berth.BerthError) as e:
            self.client.get_session("00000000-0000-0000-0000-000000000000")
        self.assertEqual(e.exception.code, grpc.StatusCode.NOT_FOUND)
        self.assertEqual(e.exception.reason, "SESSION_NOT_FOUND")
        with self.assertRaises(berth.BerthError) as e:
            berth.Client(DISPATCHER, "berth_nope_nope").whoami()
        self.assertEqual(e.exception.code, grpc.StatusCode.UNAUTHENTICATED)
        self.assertEqual(e.exception.field_violations[0][0], "authorization")

    def test_page_tokens_are_opaque_and_bound_to_their_filter(self):
        for _ in range(2):
            self.client.create_session("echo page", image=IMAGE, labels={"suite": "py-pages"})
        first = self.client.sessions.ListSessions(
            sessions_pb2.ListSessionsRequest(page_size=1, labels={"suite": "py-pages"})
        )
        token = first.next_page_token
        self.assertTrue(token)
        self.assertNotIn(first.sessions[0].id, token)
        second = self.client.sessions.ListSessions(
            sessions_pb2.ListSessionsRequest(page_size=1, page_token=token, labels={"suite": "py-pages"})
        )
        self.assertNotEqual(second.sessions[0].id, first.sessions[0].id)
        with self.assertRaises(grpc.RpcError) as e:
            self.client.sessions.ListSessions(
                sessions_pb2.ListSessionsRequest(page_size=1, page_token=token, labels={"suite": "other"})
            )
        err = berth.BerthError.from_rpc_error(e.exception)
        self.assertEqual(err.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(err.field_violations[0][0], "page_token")
        for s in self.client.list_sessions(labels={"suite": "py-pages"}):
            self.client.stop(s.id)

    def test_stock_reflection_client_v1alpha(self):
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
        from google.protobuf.descriptor_pool import DescriptorPool

        db = ProtoReflectionDescriptorDatabase(self.client.channel)
        services = db.get_services()
        self.assertIn("berth.v1.Sessions", services)
        self.assertNotIn("berth.node.v1.AgentServer", services)
        pool = DescriptorPool(db)
        method = pool.FindServiceByName("berth.v1.Sessions").FindMethodByName("CreateSession")
        self.assertEqual(method.input_type.full_name, "berth.v1.CreateSessionRequest")

    def test_grpc_web_over_http1(self):
        body = access_pb2.WhoAmIRequest().SerializeToString()
        req = urllib.request.Request(
            DISPATCHER.rstrip("/") + "/berth.v1.ApiKeys/WhoAmI",
            data=b"\x00" + struct.pack(">I", len(body)) + body,
            headers={
                "content-type": "application/grpc-web+proto",
                "x-grpc-web": "1",
                "authorization": "Bearer " + TOKEN,
            },
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            self.assertEqual(resp.status, 200)
            data = resp.read()
        frames = []
        while data:
            flag, n = data[0], struct.unpack(">I", data[1:5])[0]
            frames.append((flag, data[5 : 5 + n]))
            data = data[5 + n :]
        key = access_pb2.ApiKey.FromString(frames[0][1])
        self.assertEqual(key.project, "default")
        trailers = frames[-1][1].decode()
        self.assertEqual(frames[-1][0] & 0x80, 0x80)
        self.assertIn("grpc-status:0", trailers.replace(" ", ""))


    def test_every_public_rpc_is_a_method_sync_and_async(self):
        from berth.rpc import services, snake

        aio = berth.AsyncClient(DISPATCHER, TOKEN)
        for service in services().values():
            for method in service.methods:
                if method.client_streaming:
                    continue
                for client in (self.client, aio):
                    svc = getattr(client.rpc, snake(service.name))
                    self.assertTrue(callable(getattr(svc, snake(method.name), None)), method.full_name)
        asyncio.run(aio.close())

    def test_agents_files_export_feedback_search_schedules_webhooks_keys_and_secrets(self):
        rpc = self.client.rpc
        agent_id = "py-" + uuid.uuid4().hex[:8]
        a = rpc.agents.create_agent(agent_id=agent_id, spec={"image": IMAGE})
        self.assertEqual(rpc.agents.update_agent(name=a.name, spec={"image": IMAGE, "model": "m2"}).version, 2)
        self.assertIn(a.name, [x.name for x in rpc.agents.list_agents().agents])
        f = rpc.files.upload_file(display_name="f.txt", content=b"from python")
        self.assertEqual(rpc.files.get_file(name=f.name).size_bytes, 11)
        rpc.files.delete_file(name=f.name)
        r = self.client.run("echo findable by python", agent=a.name, keep=True, timeout=120)
        md = rpc.sessions.export_session(name=r.session.name, format=sessions_pb2.EXPORT_FORMAT_MARKDOWN)
        self.assertIn("findable by python", md.content)
        fb = rpc.sessions.submit_feedback(name=r.session.name, turn=1, rating=4, comment="fine")
        self.assertEqual(fb.rating, 4)
        self.assertEqual(len(rpc.sessions.list_feedback(name=r.session.name).feedback), 1)
        found = rpc.sessions.search_sessions(query="findable")
        self.assertIn(r.session.name, [m.session.name for m in found.matches])
        self.client.stop(r.session.name)
        sched = rpc.schedules.create_schedule(
            schedule_id="py-" + uuid.uuid4().hex[:8], schedule={"cron": "0 0 1 1 *", "agent": a.name, "input": "echo s"}
        )
        rpc.schedules.suspend_schedule(name=sched.name)
        self.assertTrue(rpc.schedules.get_schedule(name=sched.name).suspended)
        rpc.schedules.delete_schedule(name=sched.name)
        hook = rpc.webhooks.create_webhook(webhook_id="py-" + uuid.uuid4().hex[:8], webhook={"agent": a.name})
        self.assertTrue(hook.secret)
        rpc.webhooks.delete_webhook(name=hook.webhook.name)
        key = rpc.api_keys.create_api_key(role=access_pb2.ROLE_MEMBER, display_name="py member")
        self.assertEqual(berth.Client(DISPATCHER, key.token).whoami().role, access_pb2.ROLE_MEMBER)
        rpc.api_keys.revoke_api_key(name=key.key.name)
        secret = rpc.secrets.create_secret(display_name="py-s", usage=access_pb2.SECRET_USAGE_ANTHROPIC_API_KEY, value="x")
        rpc.secrets.delete_secret(name=secret.name)
        events = rpc.audit.list_audit_events(page_size=500).events
        self.assertTrue(any(e.resource == secret.name for e in events))
        rpc.agents.archive_agent(name=a.name)
        with self.assertRaises(berth.BerthError) as e:
            rpc.agents.get_agent(name="agents/py-missing-" + uuid.uuid4().hex[:8])
        self.assertEqual(e.exception.code, grpc.StatusCode.NOT_FOUND)

    def test_questions_are_answered_by_question_or_header(self):
        s = self.client.create_session("ask", image=IMAGE)
        for e in self.client.stream_events(s.name, timeout=120):
            if e.type == "agent.question":
                break
        tool_use_id = self.client.get_session(s.name).pending_tool_requests[0].tool_use_id
        with self.assertRaises(berth.BerthError) as e:
            self.client.answer_question(s.name, tool_use_id, {"Color": "Green", "Sizes": ["Small"]})
        self.assertEqual(e.exception.reason, "INVALID_FIELD")
        self.client.answer_question(
            s.name, tool_use_id, {"Color": {"text": "teal"}, "Which sizes should ship?": ["Small", "Medium"]}
        )
        for e in self.client.stream_events(s.name, after_seq=0, timeout=120):
            if isinstance(e, berth.AgentMessage) and "teal" in e.text:
                self.assertIn('"Which sizes should ship?"="Small, Medium"', e.text)
                break
        self.client.stop(s.name)

    def test_the_asyncio_client_runs_streams_and_answers(self):
        async def main():
            async with berth.AsyncClient(DISPATCHER, TOKEN) as c:
                r = await c.run("echo hello from asyncio", image=IMAGE, timeout=120)
                self.assertIn("hello from asyncio", r.text)
                self.assertEqual((await c.rpc.api_keys.who_am_i()).project, "default")
                s = await c.create_session("ask", image=IMAGE)
                async for e in c.stream_events(s.name, timeout=120):
                    if e.type == "agent.question":
                        break
                pending = (await c.get_session(s.name)).pending_tool_requests
                await c.answer_question(s.name, pending[0].tool_use_id, {"Color": "Red", "Sizes": ["Large"]})
                async for e in c.stream_events(s.name, timeout=120):
                    if isinstance(e, berth.AgentMessage) and e.text.startswith("done:"):
                        self.assertIn('"Which color should the button be?"="Red"', e.text)
                        break
                await c.stop(s.name)
                with self.assertRaises(berth.BerthError) as e:
                    await c.get_session("00000000-0000-0000-0000-000000000000")
                self.assertEqual(e.exception.reason, "SESSION_NOT_FOUND")

        asyncio.run(main())


if __name__ == "__main__":
    unittest.main()
