"""The chat page in a real browser (Debian's Chromium driven by Playwright) against the real server:
app.py as a subprocess running the default model on CPU. One local-mode server serves every test in
order (the last one restarts it); a second server with --auth and two LoRA adapters starts alongside it
for the accounts and adapter tests. Screenshots of the main screens land in tests/screenshots/."""

import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api")
from playwright.sync_api import expect, sync_playwright  # noqa: E402

from adapters import default_model_config, write_adapter  # noqa: E402
from browser_helpers import HeldEvents, ServerProcess, api  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
SCREENSHOTS = Path(__file__).parent / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

# Short replies keep the tests quick on a CPU; the long ones are for stopping and reloading mid-reply.
# With this seed and prompt the model writes a story that runs to the token limit.
FAST = {"max_reply_tokens": 16}
LONG = {"max_reply_tokens": 200, "seed": 1, "prompt_format": "chat_template"}
STORY = {**LONG, "max_reply_tokens": 400}  # for replies that a test stops long before they end
LONG_PROMPT = "Write a long story about a dragon, at least ten paragraphs."
# Several swipes written at once: seeded, so each of them differs from the others the same way every run.
PARALLEL = {"max_reply_tokens": 24, "seed": 5}
# Greedy, so that one prompt and one adapter always give one reply.
GREEDY = {"max_reply_tokens": 16, "temperature": 0.0}
# The LoRA adapters of the --auth server, small random ones (tests/adapters.py).
ADAPTERS = ("calm", "wild")

# The machine is shared and slow: waits are generous, and every wait is for something to happen.
expect.set_options(timeout=45_000)

pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"needs Debian's Chromium at {CHROMIUM}")


# --- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Both servers start at once, so that their model loads overlap. The --auth one loads the adapters:
    there the page is loaded before anyone logs in, the case where it must ask for them again later."""
    folders = tmp_path_factory.mktemp("adapters")
    config = default_model_config()
    lora = [option for seed, name in enumerate(ADAPTERS)
            for option in ("--lora", f"{name}={write_adapter(folders / name, config, seed)}")]
    local = ServerProcess(tmp_path_factory.mktemp("local-sessions")).start()
    accounts = ServerProcess(tmp_path_factory.mktemp("auth-sessions"), None, "--auth", "--allow-register",
                             *lora).start()
    yield {"local": local, "auth": accounts}
    local.stop()
    accounts.stop()


@pytest.fixture(autouse=True)
def server_logs_on_failure(request, servers):
    """A failed test prints what the servers logged last, which is where a worker's error would be."""
    yield
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for name, server in servers.items():
            print(f"--- the {name} server's log, last lines ---\n{server.log_tail(40)}")


@pytest.fixture(scope="module")
def chat_server(servers):
    return servers["local"].wait_ready()


@pytest.fixture(scope="module")
def auth_server(servers):
    return servers["auth"].wait_ready()


@pytest.fixture(scope="module")
def chromium():
    with sync_playwright() as playwright:
        # launch() gives every run a fresh, temporary user-data-dir.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


class Pages:
    """Opens tabs in fresh browser contexts and fails the test on any uncaught script error."""

    def __init__(self, browser):
        self.browser = browser
        self.contexts = []
        self.errors = []

    def context(self, viewport=DESKTOP, **options):
        context = self.browser.new_context(viewport=viewport, **options)
        self.contexts.append(context)
        return context

    def tab(self, context=None):
        tab = (context or self.context()).new_page()
        tab.on("pageerror", lambda error: self.errors.append(str(error)))
        return tab

    def close(self):
        for context in self.contexts:
            context.close()


@pytest.fixture
def pages(chromium):
    opened = Pages(chromium)
    yield opened
    opened.close()
    assert not opened.errors, f"script errors in the page: {opened.errors}"


@pytest.fixture
def tab(pages):
    return pages.tab()


# --- helpers -----------------------------------------------------------------------------------------

def shot(tab, name):
    SCREENSHOTS.mkdir(exist_ok=True)
    tab.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def create_session(tab, server, settings=FAST, **setup):
    if tab.url == "about:blank":
        tab.goto(server.url)
    return api(tab, "POST", "/api/sessions", {"settings": settings, **setup})["session"]


def get_session(tab, session_id):
    return api(tab, "GET", f"/api/sessions/{session_id}")["session"]


def open_chat(tab, server, session_id):
    tab.goto(f"{server.url}/#{session_id}")
    expect(tab.locator("#connection-status")).to_have_class(re.compile(r"\bonline\b"))
    expect(tab.locator("#message-input")).to_be_enabled()
    expect(tab.locator(f'#session-list [data-id="{session_id}"]')).to_have_class(re.compile(r"\bcurrent\b"))


def sign_up(tab, server, name):
    """A new account on the --auth server, logged in from the login screen of a freshly loaded page."""
    tab.goto(server.url)
    tab.get_by_label("User name").fill(name)
    tab.get_by_label("Password").fill(f"{name}-password")
    tab.get_by_role("button", name="Create account", exact=True).click()
    expect(tab.locator("#user-name")).to_have_text(f"Logged in as {name}")


def session_file(server, user, session_id):
    """The session as the server stored it on disk; the local mode's user is "local"."""
    return json.loads((server.sessions_dir / user / f"{session_id}.json").read_text())


def open_setup(tab, panel="Participants"):
    tab.get_by_role("button", name="Chat setup", exact=True).click()
    tab.get_by_role("tab", name=panel).click()


def send(tab, text):
    tab.locator("#message-input").fill(text)
    tab.locator("#message-input").press("Enter")


def wait_idle(tab, bots_at_least):
    """Until at least this many bot messages are shown, the last one finished (its statistics are saved
    with it), and no job runs. Stop is shown from the moment the reply starts, so this cannot pass early."""
    try:
        tab.wait_for_function(
            """n => {
                const bots = document.querySelectorAll('#message-list .message.bot');
                return bots.length >= n && bots[bots.length - 1].querySelector('.meta').textContent.includes('tokens/s');
            }""",
            arg=bots_at_least, timeout=90_000)
        expect(tab.locator('[data-action="stop"]')).to_be_hidden(timeout=90_000)
    except AssertionError as error:  # Playwright's TimeoutError is an AssertionError too
        raise AssertionError(f"the chat did not go idle with {bots_at_least} bot messages; the page shows "
                             f"{page_state(tab)}") from error
    expect(tab.locator(".message.live")).to_have_count(0)


def page_state(tab) -> dict:
    """What a failed wait needs to tell apart a reply that never started, one that stalled and a refusal."""
    return tab.evaluate("""() => ({
        connection: document.querySelector('#connection-status').className,
        messages: [...document.querySelectorAll('#message-list .message')].map(
            m => `${m.dataset.author}${m.classList.contains('live') ? ' (live)' : ''}: ${m.querySelector('.meta')?.textContent}`),
        job: document.querySelector('#job-status').hidden ? null : document.querySelector('#job-status').textContent,
        stop_shown: !document.querySelector('[data-action="stop"]').hidden,
        unsent_input: document.querySelector('#message-input').value,
        notices: [...document.querySelectorAll('#notices .notice')].map(n => n.textContent),
    })""")


def notice(tab, text):
    return tab.locator("#notices .notice", has_text=text)


def watch_notices(tab):
    """Record every notice the page shows from now on, however briefly."""
    tab.evaluate("""() => {
        window.noticesSeen = [];
        new MutationObserver(records => records.forEach(record => record.addedNodes.forEach(node =>
            window.noticesSeen.push(node.textContent)))).observe(document.querySelector('#notices'), {childList: true});
    }""")


def wait_live_text(tab, longer_than):
    """Until the reply streaming now shows more than this many characters."""
    try:
        tab.wait_for_function(
            "n => { const body = document.querySelector('.message.live .body'); return body !== null && body.textContent.length > n; }",
            arg=longer_than)
    except AssertionError as error:  # Playwright's TimeoutError is an AssertionError too
        raise AssertionError(f"the live reply did not grow past {longer_than} characters; the page shows "
                             f"{page_state(tab)}") from error


def message(tab, index):
    return tab.locator("#message-list .message").nth(index)


def live_text(tab):
    return tab.locator(".message.live .body")


def text_of(doc, index):
    chosen = doc["messages"][index]
    return chosen["swipes"][chosen["chosen"]]["text"]


def squash(text):
    return " ".join(text.split())


def as_words(text):
    """The words of a text, without Markdown's marks: rendered Markdown and its source agree on these. Marks are
    dropped, not turned into spaces, since emphasis can sit inside a word ("X*y*" shows as "Xy")."""
    return squash(re.sub(r"[*_`#>~|\\-]", "", text))


def at_bottom(tab):
    return tab.evaluate("() => { const m = document.querySelector('#messages');"
                        " return m.scrollHeight - m.scrollTop - m.clientHeight < 48; }")


def doc_with_messages(template, texts, **fields):
    """A session document for import: `template` (a fresh session) with these messages, user first."""
    doc = {**template, **fields, "messages": []}
    for number, text in enumerate(texts):
        is_user = number % 2 == 0
        author = next(p["name"] for p in doc["participants"] if p["is_user"] == is_user)
        doc["messages"].append({
            "id": f"m{number}", "author": author, "is_user": is_user, "chosen": 0,
            "swipes": [{"text": text, "time": template["created"], "tokens": None if is_user else 20,
                        "tokens_per_second": None if is_user else 40.0}],
        })
    return doc


def import_file(tab, doc, name="chat.json"):
    tab.locator("#import-file").set_input_files(
        files=[{"name": name, "mimeType": "application/json", "buffer": json.dumps(doc).encode()}])


# --- the tests, in the order a user meets the features ---------------------------------------------

def test_new_chat_settings_and_a_streamed_reply(tab, chat_server):
    tab.goto(chat_server.url)
    tab.get_by_role("button", name="New chat", exact=True).click()
    expect(tab.locator("#chat-title")).to_have_text("New chat")
    expect(tab.locator("#message-input")).to_be_enabled()
    expect(tab.locator("#empty-chat")).to_contain_text("No messages yet")

    # Every sampler, the reply length, end on newline and the prompt format are in the settings panel.
    tab.get_by_role("button", name="Chat setup", exact=True).click()
    tab.get_by_role("tab", name="Settings").click()
    for name in ("temperature", "top_k", "top_p", "min_p", "typical", "repetition_penalty", "repetition_sustain",
                 "repetition_decay", "frequency_penalty", "presence_penalty", "seed", "max_reply_tokens",
                 "end_on_newline", "prompt_format"):
        expect(tab.locator(f"#setting-{name}")).to_be_visible()
    tab.get_by_label("Max reply tokens").fill("24")
    tab.get_by_label("Temperature").fill("0.7")
    expect(tab.locator("#settings-form .form-status")).to_have_text("Not saved yet")
    tab.get_by_role("button", name="Save settings", exact=True).click()
    expect(tab.locator("#settings-form .form-status")).to_have_text("Saved")
    session_id = tab.evaluate("location.hash.slice(1)")
    settings = get_session(tab, session_id)["settings"]
    assert (settings["max_reply_tokens"], settings["temperature"]) == (24, 0.7)
    shot(tab, "desktop-settings")
    tab.get_by_role("tab", name="Prompt").click()
    expect(tab.locator('#prompt-form textarea[name="fixed_prompt"]')).to_have_value(
        "This is a conversation between You and Assistant.")
    tab.get_by_role("button", name="Close setup", exact=True).click()

    # The reply streams in: the page draws its text several times before it is complete.
    tab.evaluate("""() => {
        window.streamLengths = new Set();
        new MutationObserver(() => {
            const body = document.querySelector('.message.live .body');
            if (body) window.streamLengths.add(body.textContent.length);
        }).observe(document.querySelector('#message-list'), {subtree: true, childList: true, characterData: true});
    }""")
    send(tab, "Hello! Who are you?")
    expect(message(tab, 0)).to_contain_text("Hello! Who are you?")
    expect(tab.locator(".message.bot.live")).to_be_visible()
    expect(tab.locator("#job-status")).to_contain_text("Assistant is writing")
    wait_idle(tab, 1)
    assert tab.evaluate("window.streamLengths.size") >= 3
    expect(tab.locator("#reply-stats")).to_contain_text("tokens/s")
    expect(tab.locator("#job-status")).to_be_hidden()
    expect(tab.locator(f'#session-list [data-id="{session_id}"] .meta')).to_contain_text("2 msg")
    doc = get_session(tab, session_id)
    assert as_words(message(tab, 1).locator(".body").inner_text()) == as_words(text_of(doc, 1))
    assert tab.locator("#message-input").input_value() == ""
    shot(tab, "desktop-chat")


def test_markdown_code_and_phone_layout(pages, chat_server):
    tab = pages.tab(pages.context(viewport=PHONE, is_mobile=True, has_touch=True))
    template = create_session(tab, chat_server)
    doc = doc_with_messages(template, [
        "How do I print in Python?",
        "Use **print**:\n\n```python\nfor i in range(3):\n    print(f\"hello {i}\")\n```\n\n- works in *Python 3*\n- see `help(print)`",
    ], title="Python help")
    imported = api(tab, "POST", "/api/sessions/import", doc)["session"]
    open_chat(tab, chat_server, imported["id"])
    bot = message(tab, 1)
    expect(bot.locator("pre code .hljs-keyword").first).to_have_text("for")
    expect(bot.locator("strong")).to_have_text("print")
    expect(bot.locator("li")).to_have_count(2)
    # Nothing sticks out sideways at phone width.
    assert tab.evaluate("document.documentElement.scrollWidth <= window.innerWidth")

    # Shift+Enter makes a new line, Enter sends.
    box = tab.locator("#message-input")
    box.fill("first line")
    box.press("Shift+Enter")
    box.press_sequentially("second line")
    assert box.input_value() == "first line\nsecond line"
    box.press("Enter")
    expect(message(tab, 2).locator(".body")).to_contain_text("second line")
    assert message(tab, 2).locator(".body").inner_text() == "first line\nsecond line"
    wait_idle(tab, 2)
    assert text_of(get_session(tab, imported["id"]), 2) == "first line\nsecond line"
    shot(tab, "phone-chat")

    # The chat list and the setup panel are drawers over the chat.
    sidebar = tab.locator("#sidebar")
    assert sidebar.bounding_box()["x"] < 0
    tab.get_by_role("button", name="Show chats", exact=True).click()
    expect(tab.locator("#app")).to_have_class(re.compile(r"\bsidebar-open\b"))
    tab.wait_for_function("() => document.querySelector('#sidebar').getBoundingClientRect().x >= 0")
    shot(tab, "phone-chat-list")
    tab.locator(f'#session-list [data-id="{template["id"]}"] .open').click()
    expect(tab.locator("#app")).not_to_have_class(re.compile(r"\bsidebar-open\b"))
    expect(tab.locator("#chat-title")).to_have_text("New chat")
    tab.get_by_role("button", name="Chat setup", exact=True).click()
    expect(tab.locator("#setup")).to_be_visible()
    assert tab.locator("#setup").bounding_box()["width"] <= PHONE["width"]
    shot(tab, "phone-setup")


def test_multibot_with_two_bots(tab, chat_server):
    session = create_session(tab, chat_server, fixed_prompt="A chat at the harbour.")
    open_chat(tab, chat_server, session["id"])

    # Two bots, set up in the participants editor.
    tab.get_by_role("button", name="Chat setup", exact=True).click()
    rows = tab.locator("#participant-rows .participant")
    expect(rows).to_have_count(2)
    rows.nth(1).get_by_label("Name").fill("Alice")
    rows.nth(1).get_by_label("Persona").fill("Alice is a cheerful pirate captain.")
    tab.get_by_role("button", name="Add bot", exact=True).click()
    expect(rows).to_have_count(3)
    rows.nth(2).get_by_label("Name").fill("Bob")
    rows.nth(2).get_by_label("Persona").fill("Bob is a grumpy old sailor.")
    tab.get_by_role("button", name="Save participants", exact=True).click()
    expect(tab.locator("#participants-form .form-status")).to_have_text("Saved")
    participants = get_session(tab, session["id"])["participants"]
    assert [(p["name"], p["is_user"]) for p in participants] == [("You", True), ("Alice", False), ("Bob", False)]
    assert participants[2]["persona"] == "Bob is a grumpy old sailor."

    # A refused change is shown with the server's reason: the chat template format takes one bot only.
    tab.get_by_role("tab", name="Settings").click()
    tab.get_by_label("Prompt format").select_option("chat_template")
    tab.get_by_role("button", name="Save settings", exact=True).click()
    expect(notice(tab, "exactly one bot")).to_be_visible()
    assert get_session(tab, session["id"])["settings"]["prompt_format"] == "roleplay"
    tab.get_by_role("tab", name="Participants").click()

    # Who speaks next: the model picks, or the user does.
    picker = tab.get_by_label("Reply from")
    expect(picker.locator("option")).to_have_text(["Whoever the model picks", "Alice", "Bob"])
    send(tab, "Hello, both of you!")
    wait_idle(tab, 1)
    authors = tab.locator("#message-list .message.bot").evaluate_all("els => els.map(e => e.dataset.author)")
    assert authors and set(authors) <= {"Alice", "Bob"} and len(authors) == len(set(authors))

    picker.select_option("Bob")
    send(tab, "Bob, what do you think?")
    wait_idle(tab, len(authors) + 1)
    expect(tab.locator("#message-list .message").last).to_have_attribute("data-author", "Bob")
    doc = get_session(tab, session["id"])
    assert doc["messages"][-1]["author"] == "Bob"
    shot(tab, "desktop-multibot")


def test_the_session_adapter_is_chosen_in_settings_and_kept(tab, auth_server):
    # The page loads before the login: the adapters are asked for only once the server answers.
    sign_up(tab, auth_server, "lora-settings")
    tab.get_by_role("button", name="New chat", exact=True).click()
    expect(tab.locator("#message-input")).to_be_enabled()
    session_id = tab.evaluate("location.hash.slice(1)")
    open_setup(tab, "Settings")
    picker = tab.get_by_label("LoRA adapter")
    expect(picker.locator("option")).to_have_text(["None: the model as it is", *ADAPTERS])
    expect(picker).to_have_value("")
    picker.select_option("wild")
    expect(tab.locator("#settings-form .form-status")).to_have_text("Not saved yet")
    tab.get_by_role("button", name="Save settings", exact=True).click()
    expect(tab.locator("#settings-form .form-status")).to_have_text("Saved")
    assert session_file(auth_server, "lora-settings", session_id)["settings"]["adapter"] == "wild"
    shot(tab, "desktop-settings-adapter")

    # After a reload the picker shows the stored choice among the same adapters.
    tab.reload()
    expect(tab.locator("#message-input")).to_be_enabled()
    open_setup(tab, "Settings")
    expect(picker.locator("option")).to_have_text(["None: the model as it is", *ADAPTERS])
    expect(picker).to_have_value("wild")
    assert get_session(tab, session_id)["settings"]["adapter"] == "wild"


def test_each_bot_speaks_with_the_adapter_picked_for_it(tab, auth_server):
    sign_up(tab, auth_server, "lora-bots")
    session = create_session(tab, auth_server, settings=GREEDY)
    open_chat(tab, auth_server, session["id"])
    open_setup(tab)
    rows = tab.locator("#participant-rows .participant")
    rows.nth(1).get_by_label("Name").fill("Alice")
    tab.get_by_role("button", name="Add bot", exact=True).click()
    expect(rows).to_have_count(3)
    rows.nth(2).get_by_label("Name").fill("Bob")
    for row in (1, 2):
        expect(rows.nth(row).get_by_label("Adapter").locator("option")).to_have_text(["The session default", *ADAPTERS])
    # The user's own row has no picker: the user does not speak through the model. It moves with "You".
    expect(rows.nth(0).get_by_label("Adapter")).to_be_hidden()
    rows.nth(2).get_by_label("You").check()
    expect(rows.nth(0).get_by_label("Adapter")).to_be_visible()
    expect(rows.nth(2).get_by_label("Adapter")).to_be_hidden()
    rows.nth(0).get_by_label("You").check()
    expect(rows.nth(2).get_by_label("Adapter")).to_be_visible()
    rows.nth(1).get_by_label("Adapter").select_option("calm")
    rows.nth(2).get_by_label("Adapter").select_option("wild")
    tab.get_by_role("button", name="Save participants", exact=True).click()
    expect(tab.locator("#participants-form .form-status")).to_have_text("Saved")
    stored = session_file(auth_server, "lora-bots", session["id"])["participants"]
    assert [(p["name"], p.get("adapter")) for p in stored] == [("You", None), ("Alice", "calm"), ("Bob", "wild")]
    shot(tab, "desktop-participant-adapters")

    tab.reload()
    expect(tab.locator("#message-input")).to_be_enabled()
    open_setup(tab)
    expect(rows.nth(1).get_by_label("Adapter")).to_have_value("calm")
    expect(rows.nth(2).get_by_label("Adapter")).to_have_value("wild")

    # Alice replies with calm. Greedy replies are the same whenever the adapter is: a new alternative
    # written after her picker is set back to the session default (none) differs, and one written with
    # calm as the session default is her first reply again.
    tab.get_by_label("Reply from").select_option("Alice")
    send(tab, "Ahoy! Who goes there?")
    wait_idle(tab, 1)
    bot = tab.locator("#message-list .message.bot").last
    expect(bot).to_have_attribute("data-author", "Alice")
    rows.nth(1).get_by_label("Adapter").select_option("")
    tab.get_by_role("button", name="Save participants", exact=True).click()
    expect(tab.locator("#participants-form .form-status")).to_have_text("Saved")
    assert "adapter" not in session_file(auth_server, "lora-bots", session["id"])["participants"][1]
    bot.get_by_role("button", name="Write a new alternative", exact=True).click()
    expect(bot.locator(".swipe-count")).to_have_text("2/2")
    wait_idle(tab, 1)
    tab.get_by_role("tab", name="Settings").click()
    tab.get_by_label("LoRA adapter").select_option("calm")
    tab.get_by_role("button", name="Save settings", exact=True).click()
    expect(tab.locator("#settings-form .form-status")).to_have_text("Saved")
    bot.get_by_role("button", name="Write a new alternative", exact=True).click()
    expect(bot.locator(".swipe-count")).to_have_text("3/3")
    wait_idle(tab, 1)
    doc = session_file(auth_server, "lora-bots", session["id"])
    assert doc["settings"]["adapter"] == "calm"
    calm, plain, calm_by_default = [swipe["text"] for swipe in doc["messages"][1]["swipes"]]
    assert calm and calm == calm_by_default and plain != calm


def test_without_adapters_the_pickers_stay_hidden(tab, chat_server):
    # This server loaded no adapters. A chat that names some (made on another server) still shows them,
    # marked, so that nothing is dropped unseen; once set to none, the pickers go away.
    session = create_session(tab, chat_server, settings={**FAST, "adapter": "calm"}, participants=[
        {"name": "You", "persona": "", "is_user": True},
        {"name": "Alice", "persona": "", "is_user": False, "adapter": "wild"},
        {"name": "Bob", "persona": "", "is_user": False},
    ])
    open_chat(tab, chat_server, session["id"])
    open_setup(tab)
    rows = tab.locator("#participant-rows .participant")
    alice = rows.nth(1).get_by_label("Adapter")
    expect(alice.locator("option")).to_have_text(["The session default", "wild (not loaded)"])
    expect(alice).to_have_value("wild")
    for row in (0, 2):
        expect(rows.nth(row).get_by_label("Name")).to_be_visible()
        expect(rows.nth(row).locator('select[name="adapter"]')).to_be_hidden()
    tab.get_by_role("tab", name="Settings").click()
    picker = tab.get_by_label("LoRA adapter")
    expect(picker.locator("option")).to_have_text(["None: the model as it is", "calm (not loaded)"])
    expect(picker).to_have_value("calm")

    # Replies are refused, with the reason.
    send(tab, "Hello?")
    expect(notice(tab, "No LoRA adapter named 'calm' is loaded")).to_be_visible()

    picker.select_option("")
    tab.get_by_role("button", name="Save settings", exact=True).click()
    expect(tab.locator("#settings-form .form-status")).to_have_text("Saved")
    expect(tab.locator("#setting-adapter")).to_be_hidden()
    expect(tab.locator("#setting-temperature")).to_be_visible()
    tab.get_by_role("tab", name="Participants").click()
    alice.select_option("")
    tab.get_by_role("button", name="Save participants", exact=True).click()
    expect(tab.locator("#participants-form .form-status")).to_have_text("Saved")
    expect(rows.nth(1).locator('select[name="adapter"]')).to_be_hidden()
    expect(tab.locator('#setup select[name="adapter"]:visible')).to_have_count(0)
    doc = session_file(chat_server, "local", session["id"])
    assert doc["settings"]["adapter"] is None and all("adapter" not in p for p in doc["participants"])

    # And the bots reply again.
    send(tab, "Hello again?")
    wait_idle(tab, 1)


def test_edit_delete_and_rewind(tab, chat_server):
    session = create_session(tab, chat_server)
    open_chat(tab, chat_server, session["id"])
    send(tab, "My name is Sam.")
    wait_idle(tab, 1)
    send(tab, "What is my name?")
    wait_idle(tab, 2)
    expect(tab.locator("#message-list .message")).to_have_count(4)

    # Edit in place; Escape cancels an edit without stopping anything.
    first = message(tab, 0)
    first.get_by_role("button", name="Edit this message", exact=True).click()
    editor = first.locator("textarea.editor")
    expect(editor).to_have_value("My name is Sam.")
    editor.press("Escape")
    expect(first.locator("textarea.editor")).to_have_count(0)
    first.get_by_role("button", name="Edit this message", exact=True).click()
    first.locator("textarea.editor").fill("My name is **Alex**.")
    first.get_by_role("button", name="Save", exact=True).click()
    expect(first.locator(".body strong")).to_have_text("Alex")
    assert text_of(get_session(tab, session["id"]), 0) == "My name is **Alex**."

    # Delete one message.
    last_bot = message(tab, 3)
    last_bot_id = last_bot.get_attribute("data-id")
    last_bot.get_by_role("button", name="Delete this message", exact=True).click()
    expect(tab.locator("#message-list .message")).to_have_count(3)
    assert last_bot_id not in [m["id"] for m in get_session(tab, session["id"])["messages"]]

    # Rewind to the first message, after confirming.
    message(tab, 0).get_by_role("button", name="Remove every message after this one", exact=True).click()
    expect(tab.locator("#dialog")).to_contain_text("Remove the 2 messages after this one?")
    tab.locator("#dialog").get_by_role("button", name="Rewind", exact=True).click()
    expect(tab.locator("#message-list .message")).to_have_count(1)
    assert [text_of(get_session(tab, session["id"]), 0)] == ["My name is **Alex**."]


def test_regenerate_swipe_and_branch(tab, chat_server):
    session = create_session(tab, chat_server)
    open_chat(tab, chat_server, session["id"])
    send(tab, "Tell me a joke.")
    wait_idle(tab, 1)
    bot = tab.locator("#message-list .message.bot").last
    expect(bot.locator(".swipe-count")).to_have_text("1/1")
    first_text = bot.locator(".body").inner_text()

    bot.get_by_role("button", name="Write a new alternative", exact=True).click()
    expect(bot.locator(".swipe-count")).to_have_text("2/2")
    wait_idle(tab, 1)
    second_text = bot.locator(".body").inner_text()

    bot.get_by_role("button", name="Previous alternative", exact=True).click()
    expect(bot.locator(".swipe-count")).to_have_text("1/2")
    expect(bot.locator(".body")).to_have_text(first_text, use_inner_text=True)
    assert get_session(tab, session["id"])["messages"][1]["chosen"] == 0
    bot.get_by_role("button", name="Next alternative", exact=True).click()
    expect(bot.locator(".swipe-count")).to_have_text("2/2")
    expect(bot.locator(".body")).to_have_text(second_text, use_inner_text=True)

    # Swiping right past the last alternative writes a new one.
    bot.get_by_role("button", name="New alternative", exact=True).click()
    expect(bot.locator(".swipe-count")).to_have_text("3/3")
    wait_idle(tab, 1)
    doc = get_session(tab, session["id"])
    assert (len(doc["messages"][1]["swipes"]), doc["messages"][1]["chosen"]) == (3, 2)
    shot(tab, "desktop-swipes")

    # Branch from the first message: a new chat with just that message; the original stays.
    message(tab, 0).get_by_role("button", name="Start a new chat from the messages up to here", exact=True).click()
    expect(tab.locator("#chat-title")).to_have_text("New chat (branch)")
    expect(tab.locator("#message-list .message")).to_have_count(1)
    expect(message(tab, 0)).to_contain_text("Tell me a joke.")
    branch_id = tab.evaluate("location.hash.slice(1)")
    assert branch_id != session["id"]
    assert len(get_session(tab, branch_id)["messages"]) == 1
    assert len(get_session(tab, session["id"])["messages"][1]["swipes"]) == 3


def test_several_swipes_at_once_stream_side_by_side(tab, chat_server):
    session = create_session(tab, chat_server, settings=PARALLEL)
    open_chat(tab, chat_server, session["id"])
    send(tab, "Tell me about the sea.")
    wait_idle(tab, 1)
    bot = tab.locator("#message-list .message.bot").last
    expect(bot.locator(".swipe-count")).to_have_text("1/1")
    original = squash(bot.locator(".body").inner_text())
    # Every state of the reply while it streams: which swipe is shown, and its text.
    tab.evaluate("""() => {
        window.liveSeen = [];
        new MutationObserver(() => {
            const live = document.querySelector('.message.live');
            if (live) window.liveSeen.push([live.querySelector('.swipe-count').textContent, live.querySelector('.body').textContent]);
        }).observe(document.querySelector('#message-list'), {subtree: true, childList: true, characterData: true});
    }""")

    # Three at once, asked for from the keyboard: the number, then Enter.
    field = bot.get_by_role("spinbutton", name="How many alternatives to write at once")
    field.fill("3")
    expect(bot.get_by_role("button", name="Write 3 alternatives at once", exact=True)).to_have_text("×3")
    field.press("Enter")
    # The three empty swipes come at once and the first is shown; the others can be flipped to as they grow.
    expect(bot.locator(".swipe-count")).to_have_text("2/4")
    bot.get_by_role("button", name="Next alternative", exact=True).click()
    expect(bot.locator(".swipe-count")).to_have_text("3/4")
    bot.get_by_role("button", name="Next alternative", exact=True).click()
    expect(bot.locator(".swipe-count")).to_have_text("4/4")
    wait_idle(tab, 1)

    # The swipe shown as they ended stays shown, now as the session's choice.
    expect(bot.locator(".swipe-count")).to_have_text("4/4")
    doc = get_session(tab, session["id"])
    swipes = [squash(swipe["text"]) for swipe in doc["messages"][1]["swipes"]]
    assert (len(swipes), doc["messages"][1]["chosen"]) == (4, 3)
    assert swipes[0] == original and all(swipes) and len(set(swipes[1:])) == 3
    # While they streamed, a swipe flipped to showed its own text growing, not the first new one's.
    seen = [(int(count.split("/")[0]), squash(text)) for count, text in tab.evaluate("window.liveSeen") if text.strip()]
    assert any(shown > 2 for shown, _ in seen)
    assert all(swipes[shown - 1].startswith(text) for shown, text in seen)
    shot(tab, "desktop-parallel-swipes")

    # After a reload they are ordinary swipes.
    tab.reload()
    bot = tab.locator("#message-list .message.bot").last
    expect(bot.locator(".swipe-count")).to_have_text("4/4")
    for number in (3, 2, 1):
        bot.get_by_role("button", name="Previous alternative", exact=True).click()
        expect(bot.locator(".swipe-count")).to_have_text(f"{number}/4")
        assert squash(bot.locator(".body").inner_text()) == swipes[number - 1]
    assert get_session(tab, session["id"])["messages"][1]["chosen"] == 0


def test_a_flip_is_never_lost_around_a_jobs_events(tab, chat_server):
    """The moments between a job's events last a few milliseconds; holding the server's events back here makes
    each last as long as the test needs. A flip in any of them is shown at once and kept, or, if the server
    refuses it, the user is told."""
    events = HeldEvents(tab)
    template = create_session(tab, chat_server, settings=PARALLEL)
    doc = api(tab, "POST", "/api/sessions/import",
              doc_with_messages(template, ["Tell me about the sea.", "The sea is deep."]))["session"]
    open_chat(tab, chat_server, doc["id"])
    events.wait_upgraded()
    watch_notices(tab)
    bot = message(tab, 1)
    count = bot.locator(".swipe-count")
    next_one = bot.get_by_role("button", name="Next alternative", exact=True)
    write_three = bot.get_by_role("button", name="Write 3 alternatives at once", exact=True)

    # The three new swipes are shown, empty, before they start streaming: the next one can be flipped to already.
    events.hold("generation_started")
    write_three.click()
    expect(count).to_have_text("2/4")
    next_one.click(timeout=5_000)
    expect(count).to_have_text("3/4")

    # A press on Next that the job's last events arrive in the middle of (each of them redraws the message)
    # is a click all the same.
    events.release(hold_from="generation_finished")
    events.wait_held("job_finished")
    expect(bot).to_have_class(re.compile(r"\blive\b"))
    box = next_one.bounding_box()
    tab.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    tab.mouse.down()
    events.release()
    expect(tab.locator('[data-action="stop"]')).to_be_hidden()
    assert next_one.bounding_box() == box, "the button moved away from under the pointer"
    tab.mouse.up()
    expect(count).to_have_text("4/4")
    events.wait(lambda: get_session(tab, doc["id"])["messages"][1]["chosen"] == 3, "the last swipe to be chosen")
    assert tab.evaluate("window.noticesSeen") == []

    # A flip made while a job runs goes to the server when the job ends; a refusal then is told, not swallowed.
    # Here the chat was renamed elsewhere just before, so the flip was based on an old revision.
    events.hold("generation_finished")
    write_three.click()
    events.wait_held("job_finished")
    expect(count).to_have_text("5/7")
    next_one.click()
    expect(count).to_have_text("6/7")
    api(tab, "PATCH", f"/api/sessions/{doc['id']}",
        {"revision": get_session(tab, doc["id"])["revision"], "title": "Renamed elsewhere"})
    events.release()
    expect(notice(tab, "changed in another tab")).to_be_visible()
    expect(count).to_have_text("5/7")
    expect(tab.locator("#chat-title")).to_have_text("Renamed elsewhere")
    assert get_session(tab, doc["id"])["messages"][1]["chosen"] == 4


def test_stop_continue_and_auto_scroll(tab, chat_server):
    template = create_session(tab, chat_server, settings=STORY)
    filler = [f"Message number {n}: the weather, the sea, the ship and the crew." for n in range(30)]
    doc = api(tab, "POST", "/api/sessions/import", doc_with_messages(template, filler, title="Long chat"))["session"]
    open_chat(tab, chat_server, doc["id"])
    tab.wait_for_function("() => { const m = document.querySelector('#messages');"
                          " return m.scrollHeight > m.clientHeight * 2 && m.scrollHeight - m.scrollTop - m.clientHeight < 48; }")

    # While the reply streams the view follows it...
    send(tab, LONG_PROMPT)
    wait_live_text(tab, 60)
    assert at_bottom(tab)
    # ...until the user scrolls up to read; then it stays where the user put it.
    tab.locator("#messages").hover()
    tab.mouse.wheel(0, -1500)
    expect(tab.locator("#jump-latest")).to_be_visible()
    position = tab.evaluate("document.querySelector('#messages').scrollTop")
    length = len(live_text(tab).text_content())
    wait_live_text(tab, length + 40)
    assert abs(tab.evaluate("document.querySelector('#messages').scrollTop") - position) < 2

    # Escape stops the reply; the text so far is kept.
    tab.keyboard.press("Escape")
    wait_idle(tab, 16)
    expect(tab.locator("#reply-stats")).to_have_attribute("title", re.compile("ended by cancelled"))
    stopped = get_session(tab, doc["id"])["messages"][-1]["swipes"][0]
    assert stopped["text"] and stopped["tokens"] < STORY["max_reply_tokens"]
    tab.locator("#jump-latest").click()
    assert at_bottom(tab)

    # Continue writes more of the same reply; the Stop button ends it.
    tab.locator("#message-list .message.bot").last.get_by_role("button", name="Let the bot write more of this reply", exact=True).click()
    expect(tab.locator(".message.live")).to_be_visible()
    wait_live_text(tab, len(stopped["text"]) + 20)
    tab.get_by_role("button", name="Stop", exact=True).click()
    wait_idle(tab, 16)
    continued = get_session(tab, doc["id"])["messages"][-1]["swipes"][0]
    assert continued["text"].startswith(stopped["text"]) and len(continued["text"]) > len(stopped["text"])
    assert len(get_session(tab, doc["id"])["messages"]) == 32
    shot(tab, "desktop-long-chat")


def test_reload_mid_reply_resumes(tab, chat_server):
    session = create_session(tab, chat_server, settings=LONG)
    open_chat(tab, chat_server, session["id"])
    send(tab, LONG_PROMPT)
    wait_live_text(tab, 30)
    before = squash(live_text(tab).inner_text())

    tab.reload()
    # The reloaded page shows the text so far and then the rest as it streams.
    expect(tab.locator(".message.live")).to_be_visible()
    expect(tab.locator("#job-status")).to_contain_text("is writing")
    tab.evaluate("""() => {
        window.lastLive = '';
        new MutationObserver(() => {
            const body = document.querySelector('.message.live .body');
            if (body) window.lastLive = body.innerText;
        }).observe(document.querySelector('#message-list'), {subtree: true, childList: true, characterData: true});
    }""")
    wait_live_text(tab, len(before) + 20)
    wait_idle(tab, 1)
    final = squash(message(tab, 1).locator(".body").inner_text())
    streamed = squash(tab.evaluate("window.lastLive"))
    # No gap and no repeat: what streamed after the reload is the start of the saved reply.
    assert final.startswith(before) and final.startswith(streamed) and len(streamed) > len(before)
    assert final == squash(text_of(get_session(tab, session["id"]), 1))


def test_lost_connection_comes_back_and_the_reply_goes_on(pages, chat_server):
    context = pages.context()
    tab = pages.tab(context)
    session = create_session(tab, chat_server, settings=STORY)
    open_chat(tab, chat_server, session["id"])
    send(tab, LONG_PROMPT)
    wait_live_text(tab, 20)

    context.set_offline(True)
    expect(notice(tab, "Connection to the server lost")).to_be_visible()
    expect(tab.locator("#connection-status")).to_have_class(re.compile(r"\boffline\b"))
    expect(tab.locator('[data-action="send"]')).to_be_disabled()
    shot(tab, "desktop-connection-lost")
    offline_length = len(live_text(tab).text_content())

    context.set_offline(False)
    expect(notice(tab, "Reconnected")).to_be_visible()
    expect(notice(tab, "Connection to the server lost")).to_have_count(0)
    # The reply went on while the page was away; the page shows all of it, then the rest as it comes.
    expect(tab.locator(".message.live")).to_be_visible()
    wait_live_text(tab, offline_length + 20)
    tab.keyboard.press("Escape")
    wait_idle(tab, 1)
    assert squash(message(tab, 1).locator(".body").inner_text()) == squash(text_of(get_session(tab, session["id"]), 1))


def test_two_tabs_stay_in_step_and_a_stale_tab_is_told(pages, chat_server):
    # Two windows rather than two tabs of one window: a background tab gets no animation frames in headless
    # Chromium, which only slows the test down. In local mode they are the same user either way.
    first, second = pages.tab(), pages.tab()
    session = create_session(first, chat_server)
    open_chat(first, chat_server, session["id"])
    send(first, "Hi there")
    wait_idle(first, 1)
    open_chat(second, chat_server, session["id"])
    expect(second.locator("#message-list .message")).to_have_count(2)

    # A reply asked for in one tab streams into the other.
    send(first, "Second message")
    expect(message(second, 2)).to_contain_text("Second message")
    wait_idle(second, 2)
    wait_idle(first, 2)

    # Both tabs edit the same message; the second to save was based on an old version and is told.
    message(second, 0).get_by_role("button", name="Edit this message", exact=True).click()
    message(first, 0).get_by_role("button", name="Edit this message", exact=True).click()
    message(first, 0).locator("textarea.editor").fill("Edited in the first tab")
    message(first, 0).get_by_role("button", name="Save", exact=True).click()
    expect(message(first, 0).locator(".body")).to_have_text("Edited in the first tab")
    message(second, 0).locator("textarea.editor").fill("Edited in the second tab")
    message(second, 0).get_by_role("button", name="Save", exact=True).click()
    expect(notice(second, "changed in another tab")).to_be_visible()
    expect(notice(second, "Save again to replace")).to_be_visible()
    assert text_of(get_session(first, session["id"]), 0) == "Edited in the first tab"
    shot(second, "desktop-stale-tab")
    # Saving again knowingly replaces the other version, and the first tab sees it.
    message(second, 0).get_by_role("button", name="Save", exact=True).click()
    expect(message(first, 0).locator(".body")).to_have_text("Edited in the second tab")

    # A title changed in one tab shows in the other; a chat deleted in one tab is reported in the other.
    api(first, "PATCH", f"/api/sessions/{session['id']}",
        {"revision": get_session(first, session["id"])["revision"], "title": "Renamed elsewhere"})
    expect(second.locator("#chat-title")).to_have_text("Renamed elsewhere")
    first.locator(f'#session-list [data-id="{session["id"]}"] [data-action="session-menu"]').click()
    first.locator('[data-action="delete-session"]').click()
    first.locator("#dialog").get_by_role("button", name="Delete", exact=True).click()
    expect(notice(second, "This chat was deleted")).to_be_visible()
    expect(second.locator(f'#session-list [data-id="{session["id"]}"]')).to_have_count(0)


def test_queue_position_is_shown(pages, chat_server):
    writer, waiter = pages.tab(), pages.tab()
    long_session = create_session(writer, chat_server, settings=STORY)
    short_session = create_session(waiter, chat_server)
    open_chat(writer, chat_server, long_session["id"])
    open_chat(waiter, chat_server, short_session["id"])
    send(writer, LONG_PROMPT)
    # Some text first: a reply stopped before its first word is dropped.
    wait_live_text(writer, 10)
    send(waiter, "Are you there?")
    expect(waiter.locator("#job-status")).to_have_text("Queued: 1 ahead")
    expect(waiter.locator('[data-action="stop"]')).to_be_visible()
    shot(waiter, "desktop-queued")
    writer.locator("#message-input").press("Escape")
    wait_idle(waiter, 1)
    wait_idle(writer, 1)


XSS = {
    "html": "<img src=x onerror=\"window.xss='html'\">",
    "script": "<script>window.xss='script'</script>",
    "link": "[click me](javascript:window.xss='link')",
    "svg": "<svg onload=\"window.xss='svg'\"><circle r=5></circle></svg>",
    "iframe": "<iframe src=\"javascript:parent.xss='iframe'\"></iframe>",
}
XSS_NAME = "<img src=n onerror=window.xss='name'>"
XSS_TITLE = "<b onmouseover=\"window.xss='title'\">T</b><script>window.xss='title'</script>"


def assert_inert(tab):
    assert tab.evaluate("window.xss") is None
    active = tab.evaluate("""() => [...document.querySelectorAll('body *')].filter(element =>
        ['SCRIPT', 'IFRAME', 'OBJECT', 'EMBED', 'SVG'].includes(element.tagName.toUpperCase())
        || [...element.attributes].some(a => a.name.startsWith('on'))
        || /^\\s*javascript:/i.test(element.getAttribute('href') || '')).map(element => element.outerHTML)""")
    assert active == []


def test_html_and_script_stay_inert(tab, chat_server):
    session = create_session(tab, chat_server)
    open_chat(tab, chat_server, session["id"])

    # In a message.
    send(tab, "\n\n".join(XSS.values()))
    wait_idle(tab, 1)
    user_message = message(tab, 0).locator(".body")
    expect(user_message).to_contain_text("<img src=x onerror=")
    expect(user_message).to_contain_text("<script>window.xss='script'</script>")
    user_message.get_by_text("click me").click()
    assert_inert(tab)

    # In a participant's name and persona, and in the title.
    tab.get_by_role("button", name="Chat setup", exact=True).click()
    row = tab.locator("#participant-rows .participant").nth(1)
    row.get_by_label("Name").fill(XSS_NAME)
    row.get_by_label("Persona").fill(XSS["html"])
    tab.get_by_role("button", name="Save participants", exact=True).click()
    expect(tab.locator("#participants-form .form-status")).to_have_text("Saved")
    tab.get_by_role("button", name="Close setup", exact=True).click()
    send(tab, "Who are you?")
    wait_idle(tab, 2)
    expect(tab.locator("#message-list .message.bot").last.locator(".author")).to_have_text(XSS_NAME)
    tab.locator("#chat-title").click()
    tab.locator("#dialog-input").fill(XSS_TITLE)
    tab.locator("#dialog").get_by_role("button", name="Save", exact=True).click()
    expect(tab.locator("#chat-title")).to_have_text(XSS_TITLE)
    expect(tab.locator(f'#session-list [data-id="{session["id"]}"] .title')).to_have_text(XSS_TITLE)
    assert_inert(tab)

    # In an imported file, everywhere at once.
    template = get_session(tab, session["id"])
    hostile = doc_with_messages(template, list(XSS.values()), title=XSS_TITLE + " imported")
    hostile["participants"] = [{"name": "You", "persona": "", "is_user": True},
                               {"name": XSS_NAME, "persona": XSS["script"], "is_user": False}]
    hostile["fixed_prompt"] = XSS["script"]
    for entry in hostile["messages"]:
        entry["author"] = "You" if entry["is_user"] else XSS_NAME
    import_file(tab, hostile, name="<img src=f onerror=window.xss='file'>.json")
    expect(tab.locator("#chat-title")).to_have_text(XSS_TITLE + " imported")
    expect(tab.locator("#message-list .message")).to_have_count(len(XSS))
    expect(message(tab, 1).locator(".author")).to_have_text(XSS_NAME)
    expect(message(tab, 1).locator(".body")).to_contain_text("<script>window.xss='script'</script>")
    tab.get_by_role("button", name="Chat setup", exact=True).click()
    tab.get_by_role("tab", name="Prompt").click()
    expect(tab.locator('#prompt-form textarea[name="fixed_prompt"]')).to_have_value(XSS["script"])
    assert_inert(tab)
    shot(tab, "desktop-xss-inert")
    # Reloading renders everything again from the stored file: still inert.
    tab.reload()
    expect(message(tab, 1).locator(".author")).to_have_text(XSS_NAME)
    assert_inert(tab)


def test_chat_list_rename_duplicate_export_import_delete(tab, chat_server, servers):
    session = create_session(tab, chat_server)
    open_chat(tab, chat_server, session["id"])
    item = tab.locator(f'#session-list [data-id="{session["id"]}"]')

    item.get_by_role("button", name="Actions for New chat", exact=True).click()
    item.get_by_role("button", name="Rename", exact=True).click()
    tab.locator("#dialog-input").fill("Trip planning")
    tab.locator("#dialog-input").press("Enter")
    expect(item.locator(".title")).to_have_text("Trip planning")
    expect(tab.locator("#chat-title")).to_have_text("Trip planning")

    item.get_by_role("button", name="Actions for Trip planning", exact=True).click()
    with tab.expect_download() as download:
        item.get_by_role("link", name="Export").click()
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["id"] == session["id"] and exported["title"] == "Trip planning"

    item.get_by_role("button", name="Duplicate", exact=True).click()
    expect(tab.locator("#chat-title")).to_have_text("Trip planning (copy)")
    copy_id = tab.evaluate("location.hash.slice(1)")

    import_file(tab, exported)
    expect(notice(tab, "Imported “Trip planning”")).to_be_visible()
    expect(tab.locator("#session-list .session .title", has_text=re.compile(r"^Trip planning$"))).to_have_count(2)

    copy = tab.locator(f'#session-list [data-id="{copy_id}"]')
    copy.get_by_role("button", name="Actions for Trip planning (copy)", exact=True).click()
    shot(tab, "desktop-chat-list")
    copy.get_by_role("button", name="Delete", exact=True).click()
    expect(tab.locator("#dialog")).to_contain_text("Delete “Trip planning (copy)” for good?")
    tab.locator("#dialog").get_by_role("button", name="Delete", exact=True).click()
    expect(copy).to_have_count(0)

    # A file that is no session export is refused with a visible reason.
    tab.locator("#import-file").set_input_files(
        files=[{"name": "notes.json", "mimeType": "application/json", "buffer": b'{"hello": "world"}'}])
    expect(notice(tab, "not a session export")).to_be_visible()

    # A damaged file is listed with its problem, not hidden.
    damaged = servers["local"].sessions_dir / "local" / ("0" * 32 + ".json")
    damaged.write_text("{ this is not json")
    tab.reload()
    expect(tab.locator("#session-list .session.damaged")).to_contain_text("Damaged chat")
    tab.locator("#session-list .session.damaged .open").click()
    expect(notice(tab, "is damaged")).to_be_visible()
    damaged.unlink()


def test_accounts_keep_chats_apart(pages, auth_server):
    alice = pages.tab()
    alice.goto(auth_server.url)
    expect(alice.locator("#login-screen")).to_be_visible()
    expect(alice.locator("#app")).to_be_hidden()
    shot(alice, "desktop-login")
    alice.get_by_label("User name").fill("alice")
    alice.get_by_label("Password").fill("alice-password")
    alice.get_by_role("button", name="Create account", exact=True).click()
    expect(alice.locator("#user-name")).to_have_text("Logged in as alice")
    alice.get_by_role("button", name="New chat", exact=True).click()
    expect(alice.locator("#message-input")).to_be_enabled()
    secret_id = alice.evaluate("location.hash.slice(1)")
    api(alice, "PATCH", f"/api/sessions/{secret_id}", {"revision": 1, "title": "Alice's secret plans"})
    expect(alice.locator("#chat-title")).to_have_text("Alice's secret plans")
    alice.get_by_role("button", name="Log out", exact=True).click()
    expect(alice.locator("#login-screen")).to_be_visible()
    expect(alice.get_by_text("Alice's secret plans")).to_have_count(0)

    # A wrong password is refused visibly.
    alice.get_by_label("User name").fill("alice")
    alice.get_by_label("Password").fill("not-her-password")
    alice.get_by_role("button", name="Log in", exact=True).click()
    expect(notice(alice, "Wrong user name or password")).to_be_visible()

    # Another user, in another browser, sees none of it, not even by the session's address.
    bob = pages.tab()
    bob.goto(f"{auth_server.url}/#{secret_id}")
    bob.get_by_label("User name").fill("bob")
    bob.get_by_label("Password").fill("bob-password")
    bob.get_by_role("button", name="Create account", exact=True).click()
    expect(bob.locator("#user-name")).to_have_text("Logged in as bob")
    expect(notice(bob, "no such session")).to_be_visible()
    expect(bob.locator("#session-list .session")).to_have_count(0)
    expect(bob.get_by_text("Alice's secret plans")).to_have_count(0)
    response = bob.request.get(f"{auth_server.url}/api/sessions/{secret_id}")
    assert response.status == 404

    # Alice logs back in and finds her chat.
    alice.get_by_label("Password").fill("alice-password")
    alice.get_by_role("button", name="Log in", exact=True).click()
    expect(alice.locator("#session-list .session .title")).to_have_text(["Alice's secret plans"])


def test_server_restart_keeps_everything(pages, chat_server):
    tab = pages.tab()
    session = create_session(tab, chat_server)
    open_chat(tab, chat_server, session["id"])
    send(tab, "Remember this.")
    wait_idle(tab, 1)
    tab.get_by_role("button", name="Write a new alternative", exact=True).click()
    expect(tab.locator(".message.bot .swipe-count")).to_have_text("2/2")
    wait_idle(tab, 1)
    before = get_session(tab, session["id"])
    listed_before = api(tab, "GET", "/api/sessions")["sessions"]

    # Stopped as with Ctrl+C: the page says so and keeps trying.
    watch_notices(tab)
    chat_server.stop(interrupt=True)
    expect(notice(tab, "Connection to the server lost")).to_be_visible()
    expect(tab.locator("#connection-status")).to_have_class(re.compile(r"\boffline\b"))
    shot(tab, "desktop-server-down")
    # A new process over the same folder: the page comes back by itself, and everything is there.
    chat_server.start().wait_ready()
    tab.wait_for_function("() => window.noticesSeen.some(text => text.includes('Reconnected'))")
    expect(tab.locator("#connection-status")).to_have_class(re.compile(r"\bonline\b"))
    expect(notice(tab, "Connection to the server lost")).to_have_count(0)
    expect(tab.locator(".message.bot .swipe-count")).to_have_text("2/2")
    assert get_session(tab, session["id"]) == before
    assert api(tab, "GET", "/api/sessions")["sessions"] == listed_before

    # It chats on as before.
    send(tab, "Still there?")
    wait_idle(tab, 2)
    tab.reload()
    expect(tab.locator("#message-list .message")).to_have_count(4)
    expect(tab.locator("#session-list .session")).to_have_count(len(listed_before))
    shot(tab, "desktop-after-restart")
