"""The annotator's browser flow, driven through Playwright on Debian's chromium (headless)
against a real `align annotate serve` process. Screenshots go to test-artifacts/annotation/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.annotation.conftest import PASSWORD, REPO, ServerProcess, seed_database

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts" / "annotation"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium not installed (source .ci/services.sh)")
    pytest.importorskip("playwright.sync_api", reason="playwright (python) not installed")
    tmp = tmp_path_factory.mktemp("browser")
    db_url = f"sqlite:///{tmp / 'browser.db'}"
    seed_database(db_url, n_prompts=40, k=4, annotators_per_prompt=1,
                  users=["alice", "bob", "carol", "dave", "erin", "frank", *RECOVERY_USERS])
    from align.formats import Candidate, PromptRecord
    from annotation import services
    from annotation.db import open_db

    sm = open_db(db_url)
    with sm() as db:
        p = services.create_project(db, "xss", k=3)
        services.add_prompts(db, p, [PromptRecord(
            "Show me <b>bold</b> HTML", "x0",
            [Candidate("<img src=x onerror=alert(1)>"), Candidate("<script>window.__xss = 1; alert(2)</script>"),
             Candidate("A safe answer with `code` and\n\n1. a list\n2. items")],
        )])
        services.add_member(db, p, services.get_user(db, "dave"))
        odd = services.create_project(db, "a#b?c %2F", k=2)
        services.add_prompts(db, odd, [PromptRecord("Which is better?", "o0", [Candidate("this"), Candidate("that")])])
        services.add_member(db, odd, services.get_user(db, "frank"))
        top = services.create_project(db, "topm", k=4, rank_top=2)
        services.add_prompts(db, top, [PromptRecord(f"Top question {i}?", f"t{i}", [Candidate(f"top answer {j}") for j in range(4)])
                                       for i in range(3)])
        for name in ("gina", "hank"):
            services.add_member(db, top, services.create_user(db, name, PASSWORD))
        crowd_project(db)
        rtl_project(db)
        wide_project(db)
    sm.kw["bind"].dispose()
    srv = ServerProcess(db_url, tmp / "server.log").start()
    yield srv
    srv.stop()


# Annotators of the tests of failures on the way (network, session, a second tab): one each,
# so that each test starts on a task of its own.
RECOVERY_USERS = ["nora", "oscar", "paula", "quinn", "ruth", "tess"]
RTL_PROMPT = "Which city is the capital of France?\n\nما هي عاصمة فرنسا؟ أجب بجملة واحدة."
RTL_ANSWER = "عاصمة فرنسا هي باريس."


def rtl_project(db) -> None:
    """Project "rtl": Arabic text in the prompt (after an English paragraph), the guidelines,
    a candidate and a rationale, next to English ones; one prompt, ranked once already."""
    from align.formats import Candidate, PromptRecord
    from annotation import services

    p = services.create_project(db, "rtl", k=3, annotators_per_prompt=2, guidelines="رتّب الإجابات من الأفضل إلى الأسوأ.")
    services.add_prompts(db, p, [PromptRecord(RTL_PROMPT, "r0", [
        Candidate(RTL_ANSWER), Candidate("Paris is the capital of France."),
        Candidate("The answer is باريس, in Arabic.")])])
    services.add_member(db, p, services.create_user(db, "uma", PASSWORD))
    sim = services.create_user(db, "sim-rtl", None)
    services.add_member(db, p, sim)
    task = services.next_task(db, sim, p)
    services.submit_ranking(db, sim, task.assignment_id, [[c.id] for c in task.candidates],
                            rationale="الإجابة الأولى أوضح.")


WIDE_ID = "helpful-base/train/0001234#9f86d081884c7d65"


def wide_project(db) -> None:
    """Project "wide": a prompt with a long id, a long line of code and a long link, ranked by
    annotators with long names: what makes its page wider than a phone's screen."""
    from align.formats import Candidate, PromptRecord
    from annotation import services

    p = services.create_project(db, "wide", k=2, annotators_per_prompt=3)
    services.add_prompts(db, p, [PromptRecord("Print a long line.", WIDE_ID, [
        Candidate("```python\nprint('a long line of code that does not wrap, however narrow the screen')\n```"),
        Candidate("See https://example.org/a/very/long/address/with/no/spaces/in/it/at/all for more.")])])
    for name in ("sim-annotator-number-one", "sim-annotator-number-two", "sim-annotator-number-three"):
        user = services.create_user(db, name, None)
        services.add_member(db, p, user)
        task = services.next_task(db, user, p)
        services.submit_ranking(db, user, task.assignment_id, [[c.id] for c in task.candidates],
                                rationale="the first one shows the code, the second only links to it")


def crowd_project(db) -> None:
    """Project "crowd": 60 prompts ranked by 3 of 8 simulated annotators each, one of whom
    ranks against the others; some skips and all-bad marks, so prompts are flagged."""
    import random

    from align.formats import Candidate, PromptRecord
    from annotation import services

    p = services.create_project(db, "crowd", k=4, annotators_per_prompt=3)
    services.add_prompts(db, p, [PromptRecord(f"Crowd question {i}?", f"c{i:03d}",
                                              [Candidate(f"answer {j} to {i}") for j in range(4)]) for i in range(60)])
    rng = random.Random(0)
    team = [services.create_user(db, f"sim-{n}", None) for n in ("ada", "bo", "cy", "di", "ed", "flo", "gus", "hal")]
    active = list(team)
    while active:
        for user in list(active):
            task = services.next_task(db, user, p)
            if task is None:
                active.remove(user)
                continue
            by_text = sorted(task.candidates, key=lambda c: c.text, reverse=user.username == "sim-hal")
            ids = [c.id for c in by_text]
            if rng.random() < 0.25:
                i = rng.randrange(3)
                ids[i], ids[i + 1] = ids[i + 1], ids[i]
            if rng.random() < 0.05:
                services.skip_task(db, user, task.assignment_id, "off-topic prompt")
                continue
            services.submit_ranking(db, user, task.assignment_id, [[i] for i in ids], all_bad=rng.random() < 0.05,
                                    time_spent_ms=rng.randrange(5_000, 60_000))


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1100, "height": 900})
    pg = ctx.new_page()
    pg.dialogs = []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    yield pg
    ctx.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def login(page, server, user: str) -> None:
    page.goto(server.url + "/")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("text=Projects")


def start(page, project: str = "load") -> int:
    page.locator(f"li.card:has(h2:text-is('{project}')) button:has-text('Start ranking')").click()
    page.wait_for_url("**/tasks/*")
    page.wait_for_selector("#ranking li.cand")
    return int(page.url.rsplit("/", 1)[1])


def dom_order(page) -> list[list[int]]:
    """Tie groups of candidate ids as shown on the page."""
    groups: list[list[int]] = []
    for card in page.locator("#ranking li.cand").all():
        cid, tie = int(card.get_attribute("data-id")), card.get_attribute("data-tie") == "1"
        if tie and groups:
            groups[-1].append(cid)
        else:
            groups.append([cid])
    return groups


def stored(server, task_id: int):
    from annotation.db import open_db
    from annotation.models import RankingRow

    sm = open_db(server.db_url)
    with sm() as db:
        rows = db.query(RankingRow).filter_by(assignment_id=task_id).order_by(RankingRow.revision).all()
        out = [(r.order, r.all_bad, r.skipped) for r in rows]
    sm.kw["bind"].dispose()
    return out


def submit_and_wait_next(page, task_id: int) -> int:
    page.click("#submit")
    page.wait_for_url(lambda url: url.rstrip("/").rsplit("/", 1)[-1] not in (str(task_id),), timeout=10_000)
    return int(page.url.rsplit("/", 1)[1]) if "/tasks/" in page.url else -1


def test_login_drag_tie_submit_next(page, server):
    login(page, server, "alice")
    shot(page, "01-projects")
    task_id = start(page)
    assert page.locator("#ranking li.cand").count() == 4
    first_ids = [g[0] for g in dom_order(page)]
    # drag the last response to the top by its handle
    page.locator("#ranking li.cand").nth(3).locator(".handle").drag_to(page.locator("#ranking li.cand").nth(0), target_position={"x": 20, "y": 5})
    after_drag = [g[0] for g in dom_order(page)]
    assert after_drag[0] == first_ids[3] and sorted(after_drag) == sorted(first_ids)
    # tie the 3rd with the 2nd via its "=" button
    page.locator("#ranking li.cand").nth(2).locator("button.tie").click()
    expected = dom_order(page)
    assert len(expected) == 3 and len(expected[1]) == 2
    assert page.locator("#ranking li.cand").nth(2).locator(".rank-label").inner_text() == "#2"
    shot(page, "02-ranking-drag-tie")
    next_id = submit_and_wait_next(page, task_id)
    assert next_id != task_id and next_id > 0  # the next task opened
    assert stored(server, task_id) == [(expected, False, False)]
    assert page.dialogs == []


def test_keyboard_only_ranking(page, server):
    login(page, server, "bob")
    task_id = start(page)
    ids = [g[0] for g in dom_order(page)]
    # the first card has focus on load; everything below is keys only
    page.keyboard.press("3")  # first card -> position 3
    page.keyboard.press("ArrowUp")  # -> position 2
    for _ in range(20):  # Tab through the card buttons until the last card has focus
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.dataset.id") == str(ids[3]):
            break
    page.keyboard.press("t")  # tie the last with the one above
    expected = [[ids[1]], [ids[0]], [ids[2], ids[3]]]
    assert dom_order(page) == expected
    assert page.locator("#ranking li.cand").nth(3).locator(".tie-label").is_visible()
    shot(page, "03-keyboard")
    page.keyboard.press("Enter")  # submit from the focused card
    page.wait_for_url(lambda url: not url.endswith(f"/tasks/{task_id}"), timeout=10_000)
    assert stored(server, task_id) == [(expected, False, False)]


def test_unchanged_order_asks_for_confirmation(page, server):
    login(page, server, "carol")
    task_id = start(page)
    shown = dom_order(page)
    page.click("#submit")
    assert page.locator("#confirm").is_visible()
    page.keyboard.press("Escape")  # as "Keep ranking": the question closes, nothing is sent
    assert not page.locator("#confirm").is_visible()
    assert page.evaluate("document.activeElement.classList.contains('cand')")
    page.click("#submit")
    assert page.locator("#confirm").is_visible()
    assert stored(server, task_id) == []  # nothing sent yet
    page.check("#all-bad")
    page.click("#confirm-yes")
    page.wait_for_url(lambda url: not url.endswith(f"/tasks/{task_id}"), timeout=10_000)
    assert stored(server, task_id) == [(shown, True, False)]


def test_xss_candidates_render_as_text(page, server):
    login(page, server, "dave")
    start(page, "xss")
    bodies = page.locator("#ranking li.cand .cand-body")
    texts = " ".join(bodies.all_inner_texts())
    assert "<img src=x onerror=alert(1)>" in texts and "<script>window.__xss = 1; alert(2)</script>" in texts
    assert page.locator("#ranking img").count() == 0 and page.locator("#ranking script").count() == 0
    assert page.evaluate("window.__xss === undefined")
    assert "<b>bold</b>" in page.locator(".prompt").inner_text()
    assert page.locator(".cand-body ol li").count() == 2  # Markdown list still rendered
    shot(page, "04-xss-as-text")
    assert page.dialogs == []


def test_narrow_viewport_375px(browser, server):
    ctx = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    page = ctx.new_page()
    login(page, server, "alice")
    task_id = start(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # no sideways scrolling
    for sel in ["#submit", ".prompt", "#ranking li.cand >> nth=0"]:
        box = page.locator(sel).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, sel
    shot(page, "05-mobile-375")
    page.locator("#ranking li.cand").nth(1).locator("button.mv-up").click()
    expected = dom_order(page)
    page.locator("#submit").scroll_into_view_if_needed()
    page.click("#submit")
    page.wait_for_url(lambda url: not url.endswith(f"/tasks/{task_id}"), timeout=10_000)
    assert stored(server, task_id) == [(expected, False, False)]
    ctx.close()


def test_skip_with_reason(page, server):
    login(page, server, "erin")
    task_id = start(page)
    page.click("details.skip summary")
    page.click("#skip")  # no reason yet: refused on the page, nothing sent
    assert "reason" in page.locator("#message").inner_text()
    assert stored(server, task_id) == []
    page.fill("#skip-reason", "not in my language")
    page.click("#skip")
    page.wait_for_url(lambda url: not url.endswith(f"/tasks/{task_id}"), timeout=10_000)
    assert stored(server, task_id) == [(None, False, True)]


def stored_top(server, task_id: int) -> list[tuple]:
    """(order, below) of each stored revision of the task."""
    from annotation.db import open_db
    from annotation.models import RankingRow

    sm = open_db(server.db_url)
    with sm() as db:
        out = [(r.order, r.below) for r in db.query(RankingRow).filter_by(assignment_id=task_id).order_by(RankingRow.revision)]
    sm.kw["bind"].dispose()
    return out


def page_items(page) -> list[str]:
    """The list as shown: candidate ids, and "|" where the below line is."""
    return [li.get_attribute("data-id") or "|" for li in page.locator("#ranking > li").all()]


def test_top_m_drag_a_response_from_below_into_the_ranking(page, server):
    login(page, server, "gina")
    task_id = start(page, "topm")
    ids = [g[0] for g in dom_order(page)]
    assert page_items(page) == [str(ids[0]), str(ids[1]), "|", str(ids[2]), str(ids[3])]  # the best 2, then the line
    assert "Rank the best 2" in page.locator("#rank-legend").inner_text()
    # drag the last response (below the line) to the top: it is ranked first, the second ranked one drops below
    page.locator("#ranking li.cand").nth(3).locator(".handle").drag_to(
        page.locator("#ranking li.cand").nth(0), target_position={"x": 20, "y": 5})
    assert page_items(page) == [str(ids[3]), str(ids[0]), "|", str(ids[1]), str(ids[2])]
    assert page.locator("#ranking li.cand").nth(2).locator(".rank-label").inner_text() == "–"
    shot(page, "08-top-m-drag")
    submit_and_wait_next(page, task_id)
    assert stored_top(server, task_id) == [([[ids[3]], [ids[0]]], [ids[1], ids[2]])]
    assert page.dialogs == []


def test_top_m_keyboard_only(page, server):
    login(page, server, "hank")
    task_id = start(page, "topm")
    i0, i1, i2, i3 = [g[0] for g in dom_order(page)]
    page.keyboard.press("4")  # the focused first card to the bottom: below the line
    assert page_items(page) == [str(i1), str(i2), "|", str(i3), str(i0)]
    page.keyboard.press("t")  # below the line nothing ties
    assert "not ranked" in page.locator("#message").inner_text()
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowUp")  # back above the line, second
    page.keyboard.press("t")  # tied with the first
    assert page_items(page) == [str(i1), str(i0), "|", str(i2), str(i3)]
    assert dom_order(page)[0] == [i1, i0]
    shot(page, "09-top-m-keyboard")
    page.keyboard.press("Enter")
    page.wait_for_url(lambda url: not url.endswith(f"/tasks/{task_id}"), timeout=10_000)
    assert stored_top(server, task_id) == [([[i1, i0]], [i2, i3])]
    # the stored ranking shows again with its line where it was
    page.goto(f"{server.url}/tasks/{task_id}")
    assert page_items(page)[:3] == [str(i1), str(i0), "|"]


def test_admin_dashboard(page, server):
    from annotation import services
    from annotation.db import open_db

    sm = open_db(server.db_url)
    with sm() as db:  # an annotator of this test's own, with one ranking
        gwen = services.create_user(db, "gwen", None)
        project = services.get_project(db, "load")
        services.add_member(db, project, gwen)
        task = services.next_task(db, gwen, project)
        services.submit_ranking(db, gwen, task.assignment_id, [[c.id] for c in task.candidates])
    sm.kw["bind"].dispose()
    page.goto(server.url + "/")
    shot(page, "00-login")
    login(page, server, "admin")
    page.locator("li.card:has(h2:text-is('load')) a:has-text('Dashboard')").click()
    page.wait_for_selector("text=Krippendorff")
    assert page.locator("td", has_text="gwen").count() == 1
    shot(page, "06-dashboard")
    page.click("text=Create invite link")  # made, then shown on the People page (post/redirect/get)
    page.wait_for_url("**/admin/projects/load/people#new-invite")
    assert "/invite/" in page.locator("#invite-link").input_value()


def test_new_invite_link_copies_and_fits_a_375px_screen(browser, server):
    """The People page on a phone: the new invite link is in a read-only field the keyboard
    reaches, Copy puts it on the clipboard, nothing widens the page, and a reload shows it no more."""
    from playwright.sync_api import expect

    ctx = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page = ctx.new_page()
    login(page, server, "admin")
    page.goto(server.url + "/admin/projects/load/people")
    page.click("text=Create invite link")
    page.wait_for_url("**/people#new-invite")
    field = page.locator("#invite-link")
    link = field.input_value()
    assert "/invite/" in link and field.get_attribute("readonly") is not None
    page.locator("text=← Dashboard").focus()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "invite-link"
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.click("button[data-copy]")
    expect(page.locator("#copy-status")).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()") == link
    shot(page, "06b-people-375")
    page.reload()
    assert page.locator("#invite-link").count() == 0 and page.locator("#invite-list tr").count() >= 2
    ctx.close()


def test_finished_task_shows_its_stored_ranking_with_ties(page, server):
    login(page, server, "frank")
    task_id = start(page)
    page.locator("#ranking li.cand").nth(3).locator("button.tie").click()  # tie the last two
    page.locator("#ranking li.cand").nth(0).locator("button.mv-down").click()  # and swap the first two
    expected = dom_order(page)
    assert len(expected) == 3 and len(expected[2]) == 2
    submit_and_wait_next(page, task_id)
    assert stored(server, task_id) == [(expected, False, False)]
    page.goto(f"{server.url}/tasks/{task_id}")
    page.wait_for_selector("#ranking li.cand")
    assert dom_order(page) == expected  # the stored ranking, not the original shuffle
    assert page.locator("#ranking li.cand").nth(3).locator(".tie-label").is_visible()
    assert [page.locator("#ranking li.cand").nth(i).locator(".rank-label").inner_text() for i in range(4)] == \
        ["#1 best", "#2", "#3", "#3"]
    assert "revision 2" in page.locator("#stored-notice").inner_text()
    assert page.locator("#lease").count() == 0
    shot(page, "07-finished-task-stored-ranking")


def test_rank_legend_and_lease_countdown(page, server):
    login(page, server, "frank")
    start(page)
    assert "#1 is the best" in page.locator("#rank-legend").inner_text()
    first = page.locator("#lease").inner_text()
    assert first.startswith("held for you: ")
    for _ in range(50):  # the countdown ticks every second (polled: the CSP forbids evaluated predicates)
        page.wait_for_timeout(100)
        if page.locator("#lease").inner_text() != first:
            break
    assert page.locator("#lease").inner_text() != first
    minutes, seconds = page.locator("#lease").inner_text().split(": ")[1].split(":")
    assert 0 < int(minutes) * 60 + int(seconds) <= 900


def test_project_names_with_hash_and_question_mark(page, server):
    login(page, server, "frank")
    task_id = start(page, "a#b?c %2F")
    assert page.locator("#task").get_attribute("data-project") == "a#b?c %2F"
    page.locator("#ranking li.cand").nth(1).locator("button.mv-up").click()
    page.click("#submit")
    page.wait_for_url("**/done", timeout=10_000)  # the only prompt: on to the project's done page
    assert "a#b?c %2F" in page.locator("main").inner_text()
    assert len(stored(server, task_id)) == 1


def test_dashboard_charts_paged_flagged_and_prompt_page(page, server):
    login(page, server, "admin")
    page.goto(server.url + "/admin/projects/crowd")
    page.wait_for_selector("#progress-chart")
    assert page.locator("#progress-chart path").count() == 1
    bars = page.locator("#agreement-chart rect")
    assert bars.count() == 8
    assert "sim-hal" in page.locator("#agreement-chart text").nth(0).text_content()  # the outlier sorts first
    flagged = page.locator("ul.flagged li")
    assert 1 <= flagged.count() <= 20
    total = int(page.locator("h2:has-text('Flagged prompts') .muted").inner_text().strip("()"))
    assert total > 20 and page.locator("nav.pager a[rel=next]").count() == 1
    shot(page, "08-dashboard-charts")
    page.click("nav.pager a[rel=next]")
    page.wait_for_url("**?page=2")
    assert page.locator("nav.pager").inner_text().startswith("← previous")
    link = page.locator("ul.flagged li a").first
    pid = link.inner_text()
    link.click()
    page.wait_for_selector("#prompt-rankings")
    assert pid in page.locator("h1").inner_text()
    heads = page.locator("#prompt-rankings tr").first.locator("th").all_inner_texts()
    assert len(heads) == 1 + 3 and all(h.startswith("sim-") for h in heads[1:])
    shot(page, "09-flagged-prompt")


# --------------------------------------------------------------------------- failures on the way
# What an annotator meets when the network, the session or a second tab gets in the way: the
# page says what happened in plain words and offers a way on; a saved ranking is never
# reported as not saved, and an unsaved one is never lost.


def wait_for_error(page) -> str:
    """The message the page shows once an action failed."""
    page.wait_for_selector("#message.error", timeout=10_000)
    return page.locator("#message").inner_text()


def test_next_task_fails_after_the_ranking_is_saved(page, server):
    from playwright.sync_api import expect

    login(page, server, "nora")
    task_id = start(page)
    page.locator("#ranking li.cand").nth(1).locator("button.mv-up").click()
    expected = dom_order(page)
    page.route("**/api/projects/*/next", lambda r: r.fulfill(status=500, content_type="application/json",
                                                              body='{"detail": "internal error"}'))
    page.click("#submit")
    text = wait_for_error(page)
    assert "saved" in text and "not saved" not in text.lower(), text
    assert stored(server, task_id) == [(expected, False, False)]
    assert page.locator("#next-task").is_visible()
    # the network fails too: still saved, and the way on stays
    page.unroute("**/api/projects/*/next")
    page.route("**/api/projects/*/next", lambda r: r.abort())
    page.click("#next-task")
    expect(page.locator("#message")).to_contain_text("network")
    assert "not saved" not in page.locator("#message").inner_text().lower()
    page.unroute("**/api/projects/*/next")
    page.click("#next-task")
    page.wait_for_url(lambda url: not url.endswith(f"/tasks/{task_id}"), timeout=10_000)
    assert "/tasks/" in page.url
    assert stored(server, task_id) == [(expected, False, False)]  # stored once, nothing refused


def test_skip_network_error_can_be_tried_again(page, server):
    from playwright.sync_api import expect

    login(page, server, "oscar")
    task_id = start(page)
    page.route("**/api/tasks/*/skip", lambda r: r.abort())
    page.click("details.skip summary")
    page.fill("#skip-reason", "not in my language")
    page.click("#skip")
    expect(page.locator("#message")).to_have_text("Network error: not skipped. Try again.")
    assert stored(server, task_id) == []
    page.unroute("**/api/tasks/*/skip")
    page.click("#skip")
    page.wait_for_url(lambda url: not url.endswith(f"/tasks/{task_id}"), timeout=10_000)
    assert stored(server, task_id) == [(None, False, True)]


def test_back_button_shows_the_stored_ranking(page, server):
    login(page, server, "paula")
    task_id = start(page)
    page.locator("#ranking li.cand").nth(1).locator("button.mv-up").click()
    expected = dom_order(page)
    submit_and_wait_next(page, task_id)
    page.go_back()  # the page comes from the server again, not from the browser's cache
    page.wait_for_url(f"**/tasks/{task_id}")
    page.wait_for_selector("#ranking li.cand")
    assert page.locator("#task").get_attribute("data-status") == "done"  # not the page as it was, leased
    assert page.locator("#stored-notice").is_visible()
    assert dom_order(page) == expected


def test_two_tabs_on_one_task(page, server):
    login(page, server, "quinn")
    task_id = start(page)
    other = page.context.new_page()
    other.goto(f"{server.url}/tasks/{task_id}")
    other.wait_for_selector("#ranking li.cand")
    page.locator("#ranking li.cand").nth(1).locator("button.mv-up").click()
    expected = dom_order(page)
    submit_and_wait_next(page, task_id)
    other.locator("#ranking li.cand").nth(3).locator("button.mv-up").click()
    other.click("#submit")
    text = wait_for_error(other)
    assert "already ranked" in text and "PUT" not in text and "revision" not in text, text
    assert other.locator("#next-task").is_visible()
    other.click("#reload-task")  # shows the ranking the first tab stored
    other.wait_for_selector("#stored-notice")
    assert dom_order(other) == expected
    assert stored(server, task_id) == [(expected, False, False)]


def end_web_sessions(server, username: str) -> None:
    """What a session's expiry does on the server: the browser's cookie signs nobody in any more."""
    from sqlalchemy import delete

    from annotation import services
    from annotation.db import open_db
    from annotation.models import WebSession

    sm = open_db(server.db_url)
    with sm() as db:
        db.execute(delete(WebSession).where(WebSession.user_id == services.get_user(db, username).id))
        db.commit()
    sm.kw["bind"].dispose()


def test_session_ends_mid_ranking(page, server):
    from playwright.sync_api import expect

    login(page, server, "ruth")
    task_id = start(page)
    page.locator("#ranking li.cand").nth(1).locator("button.mv-up").click()
    expected = dom_order(page)
    end_web_sessions(server, "ruth")
    page.click("#submit")
    expect(page.locator("#message")).to_have_text(
        "Your session has ended: sign in again (in another tab); your ranking is kept on this page.")
    assert stored(server, task_id) == [] and dom_order(page) == expected
    with page.context.expect_page() as opened:  # sign in again in the tab the page's link opens
        page.click("#sign-in")
    other = opened.value
    other.fill("input[name=username]", "ruth")
    other.fill("input[name=password]", PASSWORD)
    other.click("button[type=submit]")
    other.wait_for_selector("text=Projects")
    other.close()
    page.click("#submit")  # the page's CSRF token belonged to the old session: it takes the new one
    page.wait_for_url(lambda url: not url.endswith(f"/tasks/{task_id}"), timeout=10_000)
    assert stored(server, task_id) == [(expected, False, False)]


def test_draft_survives_a_reload(page, server):
    login(page, server, "tess")
    task_id = start(page)
    shuffle = dom_order(page)
    page.locator("#ranking li.cand").nth(2).locator("button.mv-up").click()
    page.locator("#ranking li.cand").nth(3).locator("button.tie").click()
    page.check("#all-bad")
    page.fill("#rationale", "the second is clearer")
    expected = dom_order(page)
    assert expected != shuffle
    page.reload()
    page.wait_for_selector("#ranking li.cand")
    assert dom_order(page) == expected
    assert page.locator("#all-bad").is_checked() and page.input_value("#rationale") == "the second is clearer"
    assert "restored" in page.locator("#message").inner_text()
    page.click("#submit")  # the order was changed before the reload: no confirmation to ask
    page.wait_for_url(lambda url: not url.endswith(f"/tasks/{task_id}"), timeout=10_000)
    assert stored(server, task_id) == [(expected, True, False)]
    assert page.evaluate("sessionStorage.length") == 0  # a saved ranking leaves no draft
    # a draft is never applied to another task (here the first, ranked meanwhile) ...
    next_id = int(page.url.rsplit("/", 1)[1])
    next_shuffle = dom_order(page)
    page.locator("#ranking li.cand").nth(1).locator("button.mv-up").click()
    key = f"align-draft:{next_id}"
    draft = page.evaluate("k => sessionStorage.getItem(k)", key)
    assert draft
    page.evaluate("([k, v]) => sessionStorage.setItem(k, v)", [f"align-draft:{task_id}", draft])
    page.goto(f"{server.url}/tasks/{task_id}")
    page.wait_for_selector("#ranking li.cand")
    assert dom_order(page) == expected and page.input_value("#rationale") == "the second is clearer"
    assert "restored" not in page.locator("#message").inner_text()
    # ... nor to its own task where the candidates are not the page's
    page.evaluate("k => { const d = JSON.parse(sessionStorage.getItem(k)); d.list[0] = '999999'; "
                  "sessionStorage.setItem(k, JSON.stringify(d)); }", key)
    page.goto(f"{server.url}/tasks/{next_id}")
    page.wait_for_selector("#ranking li.cand")
    assert dom_order(page) == next_shuffle
    assert "restored" not in page.locator("#message").inner_text()
    assert page.evaluate("sessionStorage.length") == 0  # both dropped


# Where a paragraph's text sits in its box, and whether its last character (a full stop)
# shows left of its first: so for a right-to-left paragraph, its full stop at its left end.
SIDES_JS = """el => {
  const cs = getComputedStyle(el), box = el.getBoundingClientRect();
  const all = document.createRange(); all.selectNodeContents(el);
  const text = all.getBoundingClientRect();
  const node = Array.from(el.childNodes).find(n => n.nodeType === 3);
  const at = i => { const r = document.createRange(); r.setStart(node, i); r.setEnd(node, i + 1); return r.getBoundingClientRect().left; };
  return {left: text.left - box.left - parseFloat(cs.paddingLeft), right: box.right - parseFloat(cs.paddingRight) - text.right,
          lastLeftOfFirst: at(node.length - 1) < at(0)};
}"""


def is_rtl(locator) -> bool:
    s = locator.evaluate(SIDES_JS)
    if s["right"] < 2 and s["left"] > 20 and s["lastLeftOfFirst"]:
        return True
    assert s["left"] < 2 and s["right"] > 20 and not s["lastLeftOfFirst"], s
    return False


def test_right_to_left_text(page, server):
    login(page, server, "uma")
    start(page, "rtl")
    prompt = page.locator(".prompt .md p")
    assert not is_rtl(prompt.nth(0)) and is_rtl(prompt.nth(1))  # English, then Arabic, in one prompt
    page.click("details.guidelines summary")
    assert is_rtl(page.locator(".guidelines .md p"))
    assert is_rtl(page.locator("#ranking li.cand", has_text=RTL_ANSWER).locator(".cand-body p"))
    assert not is_rtl(page.locator("#ranking li.cand", has_text="Paris is the capital").locator(".cand-body p"))
    page.fill("#rationale", "الثانية أوضح")
    assert page.locator("#rationale").evaluate("el => el.matches(':dir(rtl)')")
    page.fill("#rationale", "the second is clearer")
    assert page.locator("#rationale").evaluate("el => el.matches(':dir(ltr)')")
    shot(page, "10-right-to-left")
    # the admin's page of the prompt: the prompt, the Arabic candidate and the rationale
    page.click("text=Sign out")
    login(page, server, "admin")
    page.goto(f"{server.url}/admin/projects/rtl/prompts/r0")
    page.wait_for_selector("#prompt-rankings")
    assert is_rtl(page.locator(".msg .md p").nth(1))
    assert is_rtl(page.locator("td.cand-cell", has_text=RTL_ANSWER).locator("p"))
    assert is_rtl(page.locator("#prompt-rankings td.notes p"))


def test_prompt_page_fits_a_390px_screen(browser, server):
    from urllib.parse import quote

    ctx = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = ctx.new_page()
    login(page, server, "admin")
    for path in ("crowd/prompts/c000", "rtl/prompts/r0", "wide/prompts/" + quote(WIDE_ID, safe="/")):
        page.goto(f"{server.url}/admin/projects/{path}")
        page.wait_for_selector("#prompt-rankings")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, path  # no sideways scrolling
    shot(page, "11-prompt-page-390")
    ctx.close()


def test_a_handle_click_keeps_ties_and_an_active_page_keeps_its_lease(page, server):
    """A press on a card's handle that does not move it left its tie broken (a card shown
    tied at #1 became #2, with no message). And the page renews its lease while the
    annotator works (every lease_seconds / 3), but not for a tab left alone for a lease
    period, whose lease then runs out. The page's clock is Playwright's, moved on by hand."""
    from annotation.db import open_db
    from annotation.models import Assignment

    def leased_until(task_id: int) -> float:
        sm = open_db(server.db_url)
        with sm() as db:
            until = db.get(Assignment, task_id).leased_until
        sm.kw["bind"].dispose()
        return until

    page.clock.install()
    login(page, server, "bob")
    task_id = start(page)
    page.focus("#ranking > li:nth-child(2)")
    page.keyboard.press("t")
    tied = dom_order(page)
    assert len(tied[0]) == 2 and page.locator("#ranking li.cand").nth(1).locator(".rank-label").inner_text() == "#1 best"
    page.locator("#ranking li.cand").nth(1).locator(".handle").click()  # pressed and let go, not moved
    assert dom_order(page) == tied
    assert page.locator("#ranking li.cand").nth(1).locator(".rank-label").inner_text() == "#1 best"
    page.locator("#ranking li.cand").nth(1).locator(".handle").drag_to(
        page.locator("#ranking li.cand").nth(3), target_position={"x": 20, "y": 60})  # a real move unties it
    assert [len(g) for g in dom_order(page)] == [1, 1, 1, 1]

    renewals: list[str] = []
    page.on("request", lambda r: renewals.append(r.url) if r.url.endswith(f"/api/tasks/{task_id}/lease") else None)
    before = leased_until(task_id)
    with page.expect_response(lambda r: r.url.endswith("/lease")) as renewed:
        page.clock.fast_forward("05:01")  # a third of the project's 900 s, the annotator active
    assert renewed.value.status == 200 and leased_until(task_id) > before
    page.clock.run_for(2000)
    assert page.locator("#lease").inner_text() in ("held for you: 14:58", "held for you: 14:59")
    with page.expect_response(lambda r: r.url.endswith("/lease")):
        page.clock.fast_forward("05:00")  # 10 minutes since the last key: still active
    page.clock.fast_forward("05:00")  # 15 minutes: the tab counts as left alone, nothing is sent
    page.wait_for_timeout(500)
    assert len(renewals) == 2
