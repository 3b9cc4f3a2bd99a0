"""berth's web console in a real browser: Debian's Chromium, driven by
Playwright for Python, against a live dispatcher.

Started by the Rust end-to-end tests in `tests/tests/it/console.rs`, which
set BERTH_URL, BERTH_TOKEN, BERTH_TEST_IMAGE, BERTH_SCREENSHOTS (a folder
for a screenshot of each step) and, for the real Claude Code CLI,
BERTH_CLAUDE_SESSION (a session the test created on it, asking questions).
Run: python -m unittest -v test_console
"""

import json
import os
import re
import unittest
import urllib.request

from playwright.sync_api import expect, sync_playwright

URL = os.environ["BERTH_URL"].rstrip("/")
TOKEN = os.environ["BERTH_TOKEN"]
IMAGE = os.environ.get("BERTH_TEST_IMAGE", "berth-test-agent:latest")
SHOTS = os.environ.get("BERTH_SCREENSHOTS", "/tmp/berth-console")
CLAUDE_SESSION = os.environ.get("BERTH_CLAUDE_SESSION")
CHROMIUM = os.environ.get("BERTH_CHROMIUM", "/usr/bin/chromium")
TIMEOUT = 60_000


def api(method, path, body=None):
    req = urllib.request.Request(URL + path, method=method,
                                 data=None if body is None else json.dumps(body).encode())
    req.add_header("Authorization", "Bearer " + TOKEN)
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


class ConsoleTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        os.makedirs(SHOTS, exist_ok=True)
        cls.pw = sync_playwright().start()
        cls.browser = cls.pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])

    @classmethod
    def tearDownClass(cls):
        cls.browser.close()
        cls.pw.stop()

    def setUp(self):
        self.context = self.browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT)
        self.dialogs, self.errors = [], []
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.step = 0

    def tearDown(self):
        self.context.close()
        self.assertEqual(self.dialogs, [], "no dialog ever fires")
        self.assertEqual(self.errors, [], "no script error")

    def shot(self, name):
        self.step += 1
        self.page.screenshot(path=os.path.join(SHOTS, "%s-%02d-%s.png" % (self._testMethodName, self.step, name)),
                             full_page=True)

    def login(self):
        page = self.page
        page.goto(URL + "/ui")
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        self.shot("sign-in")
        # By keyboard: the key, then Enter.
        page.get_by_label("API key").fill(TOKEN)
        page.get_by_label("API key").press("Enter")
        expect(page.get_by_role("heading", name="Sessions")).to_be_visible()

    def say(self, text):
        self.page.get_by_label("Message").fill(text)
        self.page.get_by_role("button", name="Send", exact=True).click()

    def transcript(self):
        return self.page.locator("#transcript")

    def test_a_session_in_the_console_from_start_to_export(self):
        page = self.page
        self.login()
        page.get_by_label("Image").fill(IMAGE)
        page.get_by_label("First message").fill("tool echo from the browser")
        self.shot("sessions")
        page.get_by_role("button", name="Start session").click()
        expect(page).to_have_url(re.compile(r"#/s/"))
        # The live transcript: the message, the tool call, the reply.
        expect(self.transcript().locator(".msg.user")).to_contain_text("tool echo from the browser")
        expect(self.transcript().locator(".msg.agent").first).to_contain_text("Ran")
        tool = self.transcript().locator("details.tool").first
        expect(tool).to_contain_text("Bash")
        tool.locator("summary").click()
        expect(tool.locator("pre.result")).to_have_text("ran: echo from the browser")
        self.shot("tool-call-expanded")

        # An edit waits for approval; allowed, the file holds the content.
        self.say("edit notes.txt approved in the browser")
        card = page.locator(".card.approval")
        expect(card).to_contain_text("Write")
        self.shot("approval-card")
        card.get_by_role("button", name="Allow", exact=True).click()
        expect(card).to_have_count(0)
        expect(self.transcript()).to_contain_text("done: File created successfully")
        self.say("read notes.txt")
        expect(self.transcript().locator(".msg.agent").last).to_contain_text("approved in the browser")
        self.shot("file-content")

        # Questions: tabs with a counter; a single and a multi select.
        self.say("ask")
        panel = page.locator(".card.question")
        expect(panel).to_contain_text("0 of 2 answered")
        panel.get_by_label("Blue").check()
        panel.get_by_role("tab", name=re.compile("Sizes")).click()
        panel.get_by_label("Small").check()
        panel.get_by_label("Large").check()
        expect(panel).to_contain_text("2 of 2 answered")
        self.shot("questions")
        panel.get_by_role("button", name="Send answers").click()
        expect(self.transcript()).to_contain_text('"Which color should the button be?"="Blue"')
        expect(self.transcript()).to_contain_text('"Which sizes should ship?"="Small, Large"')
        self.shot("answered")

        # Rate a turn, with a comment.
        turn = self.transcript().locator(".turn").first
        turn.get_by_role("button", name="Good turn").click()
        turn.get_by_label("Comment").fill("clear and quick")
        turn.get_by_role("button", name="Rate").click()
        expect(turn).to_contain_text("rated")
        name = "sessions/" + page.url.split("#/s/")[1]
        feedback = api("GET", "/v1/%s/feedback" % name)["feedback"]
        self.assertEqual([(f["rating"], f["comment"]) for f in feedback], [(5, "clear and quick")])

        # Agent output that looks like markup shows as text and runs nothing.
        self.say("echo **bold** <script>alert(1)</script><img src=x onerror=alert(2)>")
        last = self.transcript().locator(".msg.agent").last
        expect(last).to_contain_text("<script>alert(1)</script><img src=x onerror=alert(2)>")
        expect(last.locator("strong")).to_have_text("bold")
        self.assertEqual(page.evaluate("document.querySelectorAll('#transcript script, #transcript img').length"), 0)
        self.shot("markup-as-text")

        # Export as Markdown: the transcript, questions and answers included.
        with page.expect_download() as download:
            page.get_by_role("button", name="Export Markdown").click()
        with open(download.value.path(), encoding="utf-8") as f:
            text = f.read()
        self.assertIn("Which sizes should ship? → **Small, Large**", text)
        with page.expect_download() as download:
            page.get_by_role("button", name="Export PDF").click()
        with open(download.value.path(), "rb") as f:
            self.assertTrue(f.read().startswith(b"%PDF"))

        # Delete asks first, in the page.
        page.get_by_role("button", name="Stop").click()
        expect(page.locator("#state")).to_contain_text("stopped", timeout=TIMEOUT)
        page.get_by_role("button", name="Delete").click()
        self.shot("delete-confirmation")
        page.get_by_role("button", name="Yes, delete").click()
        expect(page.get_by_role("heading", name="Sessions")).to_be_visible()

    def test_the_sessions_list_fits_a_phone(self):
        page = self.page
        page.set_viewport_size({"width": 390, "height": 844})
        self.login()
        api("POST", "/v1/sessions", {"spec": {"image": IMAGE}, "initialMessage": "echo phone", "displayName": "on a phone"})
        expect(page.locator("tbody tr").first).to_be_visible()
        self.shot("phone")
        self.assertLessEqual(page.evaluate("document.documentElement.scrollWidth"), 391, "no sideways scroll")
        # The list is usable by keyboard: a row opens with Enter.
        page.locator("tbody tr").first.focus()
        page.keyboard.press("Enter")
        expect(page).to_have_url(re.compile(r"#/s/"))

    @unittest.skipUnless(CLAUDE_SESSION, "BERTH_CLAUDE_SESSION names a real-CLI session")
    def test_the_real_cli_asks_and_the_console_answers(self):
        page = self.page
        self.login()
        page.goto(URL + "/ui#/s/" + CLAUDE_SESSION.replace("sessions/", ""))
        panel = page.locator(".card.question")
        expect(panel).to_contain_text("Which color should the button be?")
        panel.get_by_label("Red").check()
        panel.get_by_role("tab", name=re.compile("Sizes")).click()
        panel.get_by_label("Medium").check()
        panel.get_by_label("Other").fill("Huge")
        self.shot("real-cli-questions")
        panel.get_by_role("button", name="Send answers").click()
        # fake-anthropic replies with the tool result the real CLI sent it.
        expect(self.transcript()).to_contain_text('"Which color should the button be?"="Red"')
        expect(self.transcript()).to_contain_text('"Which sizes should ship?"="Medium, Huge"')
        self.shot("real-cli-answered")


if __name__ == "__main__":
    unittest.main()
