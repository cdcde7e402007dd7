"""The page in a real browser: headless Chromium (Debian package) driven by Playwright.

Real everything: the web UI app on a threaded werkzeug server, the gRPC model server with the
built-in default model (the ImageNet MobileNetV2, so a cat photo must come back as a cat), and
real photographs chosen with the file picker, dropped with a synthetic drop event, or chosen
from the keyboard. Screenshots go to the test's output folder.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import time
import urllib.request
from pathlib import Path

import pytest
import test_webui_support as support
from PIL import Image

from webui import create_app

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs the Debian chromium package at /usr/bin/chromium (.ci/run installs it: "
        "apt-get install -y chromium)",
    ),
]

LAUNCH_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# ImageNet classes a photo of a cat may fairly get (the default model names objects).
CAT_CLASSES = ("tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat", "lynx")


@pytest.fixture(scope="session")
def default_grpc(request) -> support.GrpcServer:
    return support.default_server(request)


@pytest.fixture(scope="session")
def tiny_grpc(request) -> support.GrpcServer:
    return support.tiny_server(request)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def site(default_grpc):
    """The web UI over the default model, on a real HTTP port."""
    app = create_app({"HAR_GRPC_TARGET": default_grpc.target, "HAR_RATE_LIMIT_ENABLED": False})
    server = support.WsgiServer(app)
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def tiny_site(tiny_grpc):
    """The web UI over the tiny action model whose class names contain markup."""
    app = create_app(
        {
            "HAR_GRPC_TARGET": tiny_grpc.target,
            "HAR_GRPC_TOKEN": support.TINY_TOKEN,
            "HAR_RATE_LIMIT_ENABLED": False,
        }
    )
    server = support.WsgiServer(app)
    yield server.url
    server.stop()


class Watched:
    """A page plus everything it requested and every console error it logged."""

    def __init__(self, browser, url: str, **context_args):
        self.context = browser.new_context(**context_args)
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.set_default_timeout(30_000)
        self.url = url
        self.page.goto(url)

    def close(self) -> None:
        self.context.close()

    def assert_offline_and_clean(self) -> None:
        """Only our own origin was contacted (blob: previews aside), and no script errors."""
        foreign = [u for u in self.requests if not u.startswith((self.url, "blob:", "data:"))]
        assert foreign == [], f"requests to other origins: {foreign}"
        assert self.errors == [], f"console errors: {self.errors}"


@contextlib.contextmanager
def page_with_the_model_server_down(browser):
    """A page of a web UI whose model server address has nothing behind it yet.

    Yields (watched page, the TcpForwarder at that address, the web UI's URL); the test calls
    ``front.forward(target)`` to bring a model server "back".
    """
    front = support.TcpForwarder()  # nothing listens there yet
    app = create_app({"HAR_GRPC_TARGET": front.target, "HAR_RATE_LIMIT_ENABLED": False})
    server = support.WsgiServer(app)
    w = Watched(browser, server.url)
    try:
        yield w, front, server.url
    finally:
        w.close()
        server.stop()
        front.close()
        app.extensions["har_client"].close()


@pytest.fixture
def watched(browser, site):
    w = Watched(browser, site)
    yield w
    w.close()


def poll(page, expression: str, timeout_s: float = 30) -> None:
    """Waits until `expression` is truthy in the page.

    Not page.wait_for_function: it evaluates strings with eval(), which the page's CSP
    (rightly) forbids; page.evaluate runs through the DevTools protocol instead.
    """
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"still false after {timeout_s} s: {expression}"
        time.sleep(0.05)


def watch_spinner(page) -> None:
    """Records, without timing races, whether the spinner was ever shown."""
    page.evaluate(
        """() => {
          const spinner = document.getElementById("spinner");
          window.__spinnerSeen = false;
          new MutationObserver(() => {
            if (!spinner.hidden && getComputedStyle(spinner).display !== "none") {
              window.__spinnerSeen = true;
            }
          }).observe(spinner, {attributes: true});
        }"""
    )


def bar_rows(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#bars li",
        """rows => rows.map(li => ({
             label: li.querySelector('.bar-label').textContent,
             value: li.querySelector('.bar-value').textContent,
             width: li.querySelector('.bar-fill').getBoundingClientRect().width,
             visible: !li.hidden,
           }))""",
    )


def api_predict(url: str, image: bytes, filename: str = "photo.jpg") -> dict:
    """POST /predict over plain HTTP, the independent reference for what the page shows."""
    boundary = "----har-test-boundary"
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    )
    body = head.encode() + image + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        url + "predict",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def test_choose_a_photo_see_spinner_results_bars_then_try_another(watched, cat_jpeg, output_dir):
    page = watched.page
    page.wait_for_selector("#model-info:has-text('ImageNet object classifier')")
    assert page.is_visible("#imagenet-notice")  # says plainly that these are objects
    assert page.is_visible("#start-view") and not page.is_visible("#result-view")
    # The 1001 class names scroll down in their box, not sideways out of reach of a wheel.
    page.click("#classes-summary")
    box = page.eval_on_selector(
        "#class-list", "el => [el.scrollWidth, el.clientWidth, el.scrollHeight, el.clientHeight]"
    )
    assert box[0] <= box[1] + 1 and box[2] > 10 * box[3], box
    page.click("#classes-summary")

    page.set_input_files(
        "#file-input", files=[{"name": "cat.jpg", "mimeType": "image/jpeg", "buffer": cat_jpeg}]
    )
    page.wait_for_selector("#preview-view:not([hidden])")
    poll(page, "document.querySelector('#preview-list img').naturalWidth > 0")
    assert "cat.jpg" in page.text_content("#preview-caption")

    watch_spinner(page)
    page.get_by_role("button", name="Recognize action").click()
    page.wait_for_selector("#result-view:not([hidden])")
    assert page.evaluate("window.__spinnerSeen") is True
    assert page.is_hidden("#spinner")

    top = page.text_content("#top-action")
    assert any(name in top for name in CAT_CLASSES), f"a cat photo came back as {top!r}"
    assert page.text_content("#top-confidence").endswith("%")
    rows = bar_rows(page)
    reference = api_predict(watched.url, cat_jpeg)
    n = len(reference["all_predictions"])  # every class (1001 for the TF ImageNet head)
    assert n > 1000 - 1 and len(rows) == n
    assert [r["visible"] for r in rows[:6]] == [True] * 5 + [False]
    assert rows[0]["label"] == top and rows[0]["width"] > rows[4]["width"]
    assert [r["label"] for r in rows[:5]] == [p["action"] for p in reference["all_predictions"][:5]]
    page.screenshot(path=str(output_dir / "results.png"), full_page=False)

    page.get_by_role("button", name=f"Show all {n} classes").click()
    show_all = page.locator("#show-all")
    assert show_all.get_attribute("aria-expanded") == "true"
    assert show_all.text_content() == "Show top 5 only"
    assert sum(r["visible"] for r in bar_rows(page)) == n

    page.get_by_role("button", name="Try another").click()
    page.wait_for_selector("#start-view:not([hidden])")
    assert page.is_hidden("#result-view") and page.is_hidden("#preview-view")
    assert page.evaluate("document.activeElement.id") == "choose-button"
    assert page.eval_on_selector("#file-input", "el => el.files.length") == 0
    watched.assert_offline_and_clean()


def test_drop_a_photo_and_recognize_it_with_the_keyboard(watched, photos):
    page = watched.page
    encoded = base64.b64encode(photos["coffee"]).decode()
    data_transfer = page.evaluate_handle(
        """(b64) => {
          const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
          const dt = new DataTransfer();
          dt.items.add(new File([bytes], "coffee.jpg", {type: "image/jpeg"}));
          return dt;
        }""",
        encoded,
    )
    page.dispatch_event("#dropzone", "dragenter", {"dataTransfer": data_transfer})
    assert "dragging" in page.get_attribute("#dropzone", "class")
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": data_transfer})
    page.wait_for_selector("#preview-view:not([hidden])")
    # The Recognize button has the focus after a choice, so Enter is all it takes.
    assert page.evaluate("document.activeElement.id") == "recognize-button"
    watch_spinner(page)
    page.keyboard.press("Enter")
    page.wait_for_selector("#result-view:not([hidden])")
    assert page.evaluate("window.__spinnerSeen") is True
    reference = api_predict(watched.url, photos["coffee"])
    assert page.text_content("#top-action") == reference["action"]
    # Screen readers are told the answer (focus on the "Result" heading says only that).
    said = f"Result: {reference['action']}, {page.text_content('#top-confidence')}."
    poll(page, f"document.getElementById('announce').textContent === {json.dumps(said)}")
    watched.assert_offline_and_clean()


def test_a_text_file_gets_a_readable_error_and_try_another(watched):
    page = watched.page
    page.set_input_files(
        "#file-input",
        files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a photo\n"}],
    )
    page.wait_for_selector("#error-view:not([hidden])")
    message = page.text_content("#error-message")
    assert "notes.txt" in message and "not a photo" in message and "JPEG" in message
    page.get_by_role("button", name="Try another").click()
    page.wait_for_selector("#start-view:not([hidden])")
    assert page.is_hidden("#error-view")
    watched.assert_offline_and_clean()


def test_an_undecodable_photo_shows_the_model_servers_message(watched):
    page = watched.page
    page.set_input_files(
        "#file-input",
        files=[{"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": b"plain text " * 50}],
    )
    page.wait_for_selector("#preview-view:not([hidden])")
    page.get_by_role("button", name="Recognize action").click()
    page.wait_for_selector("#error-view:not([hidden])")
    message = page.text_content("#error-message")
    # Named as the person knows it (the file), not by the API's field (images[0]).
    assert message.startswith("broken.jpg: ") and "not an image" in message, message
    # The 400 itself is logged by Chromium as a failed resource; nothing else may be.
    watched.errors[:] = [e for e in watched.errors if "400" not in e]
    watched.assert_offline_and_clean()


def test_phone_sized_screen_works_from_the_keyboard(browser, site, cat_jpeg, output_dir):
    w = Watched(browser, site, viewport={"width": 360, "height": 740}, is_mobile=True)
    try:
        page = w.page
        # Listen from the start: interception of file dialogs is switched on asynchronously,
        # and a listener added just before the key press can miss the dialog.
        choosers = []
        page.on("filechooser", lambda chooser: choosers.append(chooser))
        page.wait_for_selector("#classes-details:not([hidden])")
        for _ in range(10):  # Tab through the page to the picker button
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.id") == "choose-button":
                break
        assert page.evaluate("document.activeElement.id") == "choose-button"
        page.keyboard.press("Enter")
        deadline = time.monotonic() + 30
        while not choosers:
            assert time.monotonic() < deadline, "Enter on the picker button opened no file dialog"
            page.wait_for_timeout(50)
        choosers[0].set_files(
            files=[{"name": "cat.jpg", "mimeType": "image/jpeg", "buffer": cat_jpeg}]
        )
        page.wait_for_selector("#preview-view:not([hidden])")
        page.keyboard.press("Enter")
        page.wait_for_selector("#result-view:not([hidden])")
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"the page is {overflow}px wider than a 360px screen"
        page.screenshot(path=str(output_dir / "results-phone.png"), full_page=True)
        w.assert_offline_and_clean()
    finally:
        w.close()


def test_class_names_are_shown_as_text_never_as_html(browser, tiny_site, cat_jpeg):
    w = Watched(browser, tiny_site)
    try:
        page = w.page
        page.wait_for_selector("#classes-details:not([hidden])")
        listed = page.eval_on_selector_all("#class-list li", "els => els.map(e => e.textContent)")
        assert listed == list(support.TINY_CLASSES)
        assert page.is_hidden("#imagenet-notice")  # an action model: no ImageNet warning
        page.set_input_files(
            "#file-input",
            files=[{"name": "cat.jpg", "mimeType": "image/jpeg", "buffer": cat_jpeg}],
        )
        page.get_by_role("button", name="Recognize action").click()
        page.wait_for_selector("#result-view:not([hidden])")
        labels = [r["label"] for r in bar_rows(page)]
        assert sorted(labels) == sorted(support.TINY_CLASSES)
        # Markup in a class name would have become elements if inserted as HTML.
        for selector in ("#class-list", "#bars", "#top-action"):
            assert page.eval_on_selector_all(f"{selector} b, {selector} img", "e => e.length") == 0
        w.assert_offline_and_clean()
    finally:
        w.close()


def test_a_page_opened_while_the_model_server_was_down_catches_up(browser, default_grpc, cat_jpeg):
    # The page loads while nothing answers at the model server's address; the server then
    # comes back (the built-in ImageNet model). The first result must come with the "not an
    # action model" notice and a header that describes the model, not "not reachable".
    with page_with_the_model_server_down(browser) as (w, front, url):
        page = w.page
        page.wait_for_selector("#model-info.warning")
        header = page.text_content("#model-info")
        assert "not reachable" in header, header
        # Plain words only: no internal address, no gRPC core text.
        for internal in (front.target, str(front.port), "ipv4", "failed to connect"):
            assert internal not in header, header
        assert page.is_hidden("#imagenet-notice")

        front.forward(default_grpc.target)
        support.wait_http(url + "health", timeout_s=15)
        page.set_input_files(
            "#file-input",
            files=[{"name": "cat.jpg", "mimeType": "image/jpeg", "buffer": cat_jpeg}],
        )
        page.get_by_role("button", name="Recognize action").click()
        page.wait_for_selector("#result-view:not([hidden])")
        assert any(name in page.text_content("#top-action") for name in CAT_CLASSES)
        assert page.is_visible("#imagenet-notice")
        page.wait_for_selector("#model-info:has-text('ImageNet object classifier')")
        assert "warning" not in (page.get_attribute("#model-info", "class") or "")
        page.wait_for_selector("#classes-details:not([hidden])")
        # Chromium logs the 503s of /classes while the server was down as failed resources.
        w.errors[:] = [e for e in w.errors if "503" not in e]
        w.assert_offline_and_clean()


def test_results_survive_a_round_trip_through_json(site, cat_jpeg):
    """The API the page uses answers DESIGN.md's JSON for a real photo over real HTTP."""
    body = api_predict(site, cat_jpeg)
    assert body["model"]["kind"] == "imagenet"
    assert any(name in body["action"] for name in CAT_CLASSES)
    assert abs(sum(p["confidence"] for p in body["all_predictions"]) - 1) < 1e-3


# --- Several photos, waiting, cancelling, retrying, small screens -------------------------------


def jpeg_files(photos, names, *, prefix: str = "") -> list[dict]:
    return [{"name": f"{prefix}{n}.jpg", "mimeType": "image/jpeg", "buffer": photos[n]}
            for n in names]  # fmt: skip


def test_several_photos_for_a_still_image_model_are_each_classified_and_averaged(
    browser, tiny_site, photos
):
    w = Watched(browser, tiny_site)
    try:
        page = w.page
        page.wait_for_selector("#classes-details:not([hidden])")  # the tiny model: T = 1
        assert "each classified and their scores averaged" in page.text_content("#frames-hint")
        page.set_input_files(
            "#file-input", files=jpeg_files(photos, ["rocket", "chelsea", "coffee"])
        )
        page.wait_for_selector("#preview-view:not([hidden])")
        assert page.text_content("#preview-caption") == (
            "3 photos, each classified and their scores averaged."
        )
        page.get_by_role("button", name="Recognize action").click()
        page.wait_for_selector("#result-view:not([hidden])")
        meta = page.text_content("#result-meta")
        assert meta.startswith("3 frames, each classified and their scores averaged, "), meta
        w.assert_offline_and_clean()
    finally:
        w.close()


def test_a_panorama_and_a_tower_get_thumbnails_not_slivers(browser, tiny_site, photos):
    """Previews and result thumbnails keep a visible box whatever the photo's shape."""

    def jpeg(size: tuple[int, int]) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", size, (200, 90, 40)).save(out, "JPEG")
        return out.getvalue()

    def files(shapes):
        return [{"name": f"{n}.jpg", "mimeType": "image/jpeg", "buffer": jpeg(s)}
                for n, s in shapes.items()]  # fmt: skip

    # With a photo of usual shape in the row, flexbox stretches the others to its height; a
    # row of panoramas alone has only their own minimum heights to keep.
    uploads = [
        jpeg_files(photos, ["chelsea"]) + files({"panorama": (1600, 16), "tower": (16, 1600)}),
        files({"wide": (1600, 16), "wider": (2000, 20), "widest": (1200, 12)}),
    ]
    sizes = """imgs => imgs.map(i => {
                 const r = i.getBoundingClientRect();
                 return [Math.round(r.width), Math.round(r.height)];
               })"""
    w = Watched(browser, tiny_site)
    try:
        page = w.page
        page.wait_for_selector("#classes-details:not([hidden])")
        for upload in uploads:
            page.set_input_files("#file-input", files=upload)
            page.wait_for_selector("#preview-caption:has-text('3 photos')")
            previews = page.eval_on_selector_all("#preview-list img", sizes)
            page.get_by_role("button", name="Recognize action").click()
            page.wait_for_selector("#result-view:not([hidden])")
            thumbnails = page.eval_on_selector_all("#result-photos img", sizes)
            assert len(previews) == len(thumbnails) == 3
            # At least 3rem (48 px) in the preview list and 2.5rem (40 px) in the result.
            for kind, found, least in (("preview", previews, 48), ("thumbnail", thumbnails, 40)):
                assert min(min(size) for size in found) >= least, f"a {kind} is a sliver: {found}"
            page.get_by_role("button", name="Try another").click()
        w.assert_offline_and_clean()
    finally:
        w.close()


def test_a_refusal_with_retry_after_says_how_long_to_wait(watched, photos):
    """A rate limit (or a model server starting) tells the page when to come back: the person
    reads it, rather than pressing Try again at once into the same refusal."""
    page = watched.page
    said = "Too many requests from this address; wait a moment and try again."
    body = json.dumps({"error": said, "code": "RESOURCE_EXHAUSTED", "reason": "RATE_LIMITED"})
    page.route("**/predict", lambda route: route.fulfill(
        status=429, headers={"Retry-After": "28"}, content_type="application/json", body=body,
    ))  # fmt: skip
    page.set_input_files("#file-input", files=jpeg_files(photos, ["chelsea"]))
    page.get_by_role("button", name="Recognize action").click()
    page.wait_for_selector("#error-view:not([hidden])")
    message = page.text_content("#error-message")
    assert message.startswith("Too many requests") and message.endswith(
        "You can try again in 28 s."
    ), message
    assert page.is_visible("#error-retry")
    page.unroute("**/predict")
    watched.errors[:] = [e for e in watched.errors if "429" not in e]
    watched.assert_offline_and_clean()


def test_a_slow_answer_can_be_cancelled_or_replaced_by_new_photos(watched, photos):
    page = watched.page
    held = []  # /predict requests held back, as if the model server were slow
    page.route("**/predict", lambda route: held.append(route))
    page.set_input_files("#file-input", files=jpeg_files(photos, ["chelsea"]))
    page.get_by_role("button", name="Recognize action").click()
    page.wait_for_selector("#spinner:not([hidden])")
    deadline = time.monotonic() + 30
    while not held:
        assert time.monotonic() < deadline, "the page sent no /predict request"
        page.wait_for_timeout(50)
    # Focus is on the status while waiting: not lost when Recognize is disabled, and not on
    # Cancel, which the second press of a double Enter pressed (nothing shown, nothing said) ...
    assert page.evaluate("document.activeElement.id") == "busy-status"
    page.keyboard.press("Enter")
    page.wait_for_timeout(300)
    assert page.is_visible("#spinner") and len(held) == 1
    # ... and Escape cancels: back to the photo, ready to try again, no error, and it is said.
    page.keyboard.press("Escape")
    page.wait_for_selector("#spinner", state="hidden")
    assert page.is_visible("#preview-view") and page.is_hidden("#error-view")
    assert page.evaluate("document.activeElement.id") == "recognize-button"
    poll(page, "document.getElementById('announce').textContent === 'Cancelled.'")

    # Recognising again, then dropping other photos while waiting: the new photos replace the
    # old ones, and the old answer, when it comes, is not shown for them.
    page.get_by_role("button", name="Recognize action").click()
    page.wait_for_selector("#spinner:not([hidden])")
    page.set_input_files("#file-input", files=jpeg_files(photos, ["coffee"]))
    page.wait_for_selector("#spinner", state="hidden")
    assert page.text_content("#preview-caption").startswith("coffee.jpg")
    for route in held:
        route.continue_()  # the server answers the abandoned requests; nobody listens
    page.unroute("**/predict")
    page.get_by_role("button", name="Recognize action").click()
    page.wait_for_selector("#result-view:not([hidden])")
    assert page.text_content("#top-action") == api_predict(watched.url, photos["coffee"])["action"]
    assert page.get_attribute("#result-photos img", "alt") == "coffee.jpg"
    # Cancelled fetches are logged by Chromium as failed resources; nothing else may be.
    watched.errors[:] = [e for e in watched.errors if "net::ERR_ABORTED" not in e]
    watched.assert_offline_and_clean()


def test_try_again_resends_the_same_photo_once_the_model_server_is_back(
    browser, default_grpc, cat_jpeg
):
    with page_with_the_model_server_down(browser) as (w, front, url):
        page = w.page
        page.set_input_files(
            "#file-input", files=[{"name": "cat.jpg", "mimeType": "image/jpeg", "buffer": cat_jpeg}]
        )
        page.get_by_role("button", name="Recognize action").click()
        page.wait_for_selector("#error-view:not([hidden])")
        assert "not reachable" in page.text_content("#error-message")
        # The upload was fine: the photo is kept, and Try again has the focus.
        assert page.evaluate("document.activeElement.id") == "error-retry"
        assert page.is_visible("#error-try-another")

        front.forward(default_grpc.target)
        support.wait_http(url + "health", timeout_s=15)
        page.get_by_role("button", name="Try again").click()
        page.wait_for_selector("#result-view:not([hidden])")
        assert any(name in page.text_content("#top-action") for name in CAT_CLASSES)
        assert page.get_attribute("#result-photos img", "alt") == "cat.jpg"

        # A refused upload (not a photo at all) offers no Try again: the same bytes would fail.
        page.get_by_role("button", name="Try another").click()
        page.set_input_files(
            "#file-input", files=[{"name": "x.jpg", "mimeType": "image/jpeg", "buffer": b"x" * 99}]
        )
        page.get_by_role("button", name="Recognize action").click()
        page.wait_for_selector("#error-view:not([hidden])")
        assert page.is_hidden("#error-retry")
        assert page.evaluate("document.activeElement.id") == "error-try-another"
        w.errors[:] = [e for e in w.errors if "503" not in e and "400" not in e]
        w.assert_offline_and_clean()


def test_long_names_and_many_photos_fit_a_small_screen(browser, site, photos, output_dir):
    w = Watched(browser, site, viewport={"width": 375, "height": 667}, is_mobile=True)
    overflow = "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    long = "a_really_long_file_name_without_any_spaces_that_goes_on_and_on_and_on_forever_"
    try:
        page = w.page
        page.wait_for_selector("#classes-details:not([hidden])")
        page.set_input_files("#file-input", files=jpeg_files(photos, ["chelsea"], prefix=long))
        page.wait_for_selector("#preview-view:not([hidden])")
        assert page.evaluate(overflow) <= 0, "a long file name widens the page"
        page.get_by_role("button", name="Choose a different photo").click()  # no-op dialog
        names = ["chelsea", "coffee", "rocket", "astronaut"] * 2
        page.set_input_files(
            "#file-input",
            files=[
                {**f, "name": f"{i}-{f['name']}"}
                for i, f in enumerate(jpeg_files(photos, names, prefix=long))
            ],  # fmt: skip
        )
        page.wait_for_selector("#preview-caption:has-text('8 photos')")
        page.get_by_role("button", name="Recognize action").click()
        page.wait_for_selector("#result-view:not([hidden])")
        assert page.evaluate(overflow) <= 0, "8 result thumbnails widen the page"
        page.screenshot(path=str(output_dir / "eight-photos-phone.png"), full_page=True)
        page.get_by_role("button", name="Try another").click()
        page.set_input_files(
            "#file-input",
            files=[{"name": long + ".txt", "mimeType": "text/plain", "buffer": b"notes\n"}],
        )
        page.wait_for_selector("#error-view:not([hidden])")
        assert page.evaluate(overflow) <= 0, "a long file name in an error widens the page"
        w.assert_offline_and_clean()
    finally:
        w.close()


def test_a_photo_without_a_file_type_is_left_to_the_server(watched, cat_jpeg, tmp_path):
    page = watched.page
    # One control to choose a photo for screen readers too (the file input is hidden).
    assert page.get_by_role("button", name="Photo file").count() == 0
    assert page.get_by_role("button", name="Choose a photo…").count() == 1
    photo = tmp_path / "catnoext"  # a real file: the browser guesses no type from its name
    photo.write_bytes(cat_jpeg)
    # What the browser guessed, seen before the page empties the input (capture runs first).
    page.evaluate(
        """() => document.addEventListener(
             "change", (e) => { window.__type = e.target.files[0].type; }, {capture: true})"""
    )
    page.set_input_files("#file-input", files=[str(photo)])
    assert page.evaluate("window.__type") == ""
    page.wait_for_selector("#preview-view:not([hidden])")
    page.get_by_role("button", name="Recognize action").click()
    page.wait_for_selector("#result-view:not([hidden])")
    assert any(name in page.text_content("#top-action") for name in CAT_CLASSES)
    watched.assert_offline_and_clean()


def test_the_same_photo_chosen_again_after_a_drop_replaces_the_dropped_one(browser, tmp_path):
    """The file input kept its last choice, so choosing that photo again after a drop was no
    change to the browser: the dropped photo stayed, and the one chosen was never sent."""
    chosen, dropped = tmp_path / "chosen.jpg", "dropped.jpg"
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 120, 40)).save(buf, format="JPEG")
    chosen.write_bytes(buf.getvalue())
    # No model server is needed to choose photos: the preview is the page's own.
    with page_with_the_model_server_down(browser) as (w, _front, _url):
        page = w.page
        page.set_input_files("#file-input", files=[str(chosen)])  # a real file, as a person picks
        poll(page, "document.getElementById('preview-caption').textContent.startsWith('chosen')")
        data_transfer = page.evaluate_handle(
            """(name) => {
              const dt = new DataTransfer();
              dt.items.add(new File([new Uint8Array(8)], name, {type: "image/jpeg"}));
              return dt;
            }""",
            dropped,
        )
        page.dispatch_event("#dropzone", "drop", {"dataTransfer": data_transfer})
        poll(page, "document.getElementById('preview-caption').textContent.startsWith('dropped')")
        page.set_input_files("#file-input", files=[str(chosen)])
        poll(page, "document.getElementById('preview-caption').textContent.startsWith('chosen')", 5)
