"""`resrl view` in a real browser (Debian's chromium, driven by Selenium through chromedriver): what a reader sees
on pages made from tiny runs (tests/view_runs.py) against the runs' files. One browser for the module; every test
saves a screenshot of its page into its tmp_path and leaves no error in the browser console.

`.ci/run` installs chromium and chromium-driver when they are missing; elsewhere these tests skip with the reason."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from view_runs import read_dump, slow_shared

from resrl_analysis.results import load_results
from resrl_analysis.view import write_view
from resrl_analysis.view.data import num

pytestmark = pytest.mark.e2e  # a real browser

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or \
    "/usr/bin/chromedriver"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra: pip install -e '.[dev]'")
if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
    pytest.skip("no chromium/chromedriver: apt-get install chromium chromium-driver (.ci/run does)",
                allow_module_level=True)

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def driver():
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
              "--disable-background-networking", "--no-first-run", "--disable-extensions"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)  # the system driver: nothing is downloaded
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture(scope="module")
def pages(view_fixture_runs, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("view-pages")
    r = view_fixture_runs
    return {"ours": write_view([r["ours"]], out / "ours.html"),
            "trl": write_view([r["trl"]], out / "trl.html"),
            "verl": write_view([r["verl"]], out / "verl.html"),
            "pair": write_view([r["trl"], r["verl"]], out / "pair.html")}


@pytest.fixture(autouse=True)
def page_checks(driver, tmp_path):
    """Every test: its page's screenshot in tmp_path, and no error in the browser console."""
    driver.get_log("browser")  # what earlier tests left
    yield
    shot = tmp_path / "page.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == []


def open_page(driver, path: Path) -> None:
    driver.get(path.as_uri())
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.documentElement.dataset.ready"))


def choose(driver, control: str, value: str) -> None:
    Select(driver.find_element(By.ID, control)).select_by_value(value)


def counts(driver) -> tuple[int, int]:
    return len(driver.find_elements(By.CSS_SELECTOR, "#groups .group")), len(
        driver.find_elements(By.CSS_SELECTOR, "#groups .t"))


def tip_rows(driver) -> dict[str, str]:
    """The hover box as the reader sees it: its first line (the token's text), then label → value."""
    WebDriverWait(driver, 5).until(lambda d: d.find_element(By.ID, "tip").is_displayed())
    tip = driver.find_element(By.ID, "tip")
    rows = {tr.find_elements(By.TAG_NAME, "td")[0].text: tr.find_elements(By.TAG_NAME, "td")[1].text
            for tr in tip.find_elements(By.TAG_NAME, "tr")}
    rows["text"] = tip.find_element(By.CLASS_NAME, "tt").text
    return rows


def token(driver, group_id: int, response: int, position: int, side: int = 0):
    return driver.find_element(By.CSS_SELECTOR, f'.group[data-side="{side}"][data-gid="{group_id}"] '
                                                f'.resp[data-r="{response}"] .t[data-p="{position}"]')


def number(text: str) -> float:
    return float(text.split()[0])


def background(el) -> tuple[int, int, int]:
    rgb = el.value_of_css_property("background-color")  # "rgba(r, g, b, a)"
    return tuple(int(float(x)) for x in rgb[rgb.index("(") + 1: rgb.index(")")].split(",")[:3])


# ----------------------------------------------------------------------------- what is drawn


def test_every_group_and_token_of_our_run_is_drawn(driver, pages, view_fixture_runs):
    open_page(driver, pages["ours"])
    for step in (0, 1):
        choose(driver, "step", f"rollouts:{step}")
        rows = read_dump(view_fixture_runs["ours"] / "rollouts" / f"step_{step:06d}.jsonl")
        assert counts(driver) == (len({r["group_id"] for r in rows}), sum(len(r["response_ids"]) for r in rows))
        status = driver.find_element(By.ID, "status").text
        assert status.startswith(f"step {step} · rollout batch") and "groups" in status
        assert driver.find_element(By.ID, "groups").get_attribute("data-tokens") == str(
            sum(len(r["response_ids"]) for r in rows))


@pytest.mark.parametrize("kind", ["trl", "verl"])
def test_every_probed_group_and_token_of_a_foreign_run_is_drawn(driver, pages, view_fixture_runs, kind):
    open_page(driver, pages[kind])
    tok = load_results(view_fixture_runs[kind] / "probes")["scores"].tokens
    steps = [o.get_attribute("value") for o in Select(driver.find_element(By.ID, "step")).options]
    assert steps == ["probe:0", "probe:1", "probe:2"]
    for s in (0, 2):
        choose(driver, "step", f"probe:{s}")
        t = tok[tok.step == s]
        assert counts(driver) == (t.group_id.nunique(), len(t))
    # A token's log-prob on hover is the one in the table, at the checkpoint chosen.
    row = next(t.iloc[len(t) // 2:].itertuples())
    ActionChains(driver).move_to_element(token(driver, row.group_id, row.response_index, row.position)).perform()
    shown = tip_rows(driver)
    assert shown["token id"] == str(row.token_id) and number(shown["log-prob"]) == num(row.logp)
    assert number(shown["entropy"]) == num(row.entropy)


# ----------------------------------------------------------------------------- hover and keyboard


def test_hover_shows_the_token_text_id_and_every_number_in_the_files(driver, pages, view_fixture_runs):
    run = view_fixture_runs["ours"]
    open_page(driver, pages["ours"])
    rows = read_dump(run / "rollouts" / "step_000000.jsonl")
    tok = load_results(run / "probes")["scores"].tokens
    choose(driver, "pair", "0-2")
    checked = 0
    for row in rows[::5]:  # a few responses of several groups, negatives among them
        gid = row["group_id"]
        k = [r for r in rows if r["group_id"] == gid].index(row)
        for p in sorted({0, len(row["response_ids"]) - 1}):
            ActionChains(driver).move_to_element(token(driver, gid, k, p)).perform()
            shown = tip_rows(driver)
            assert shown["token id"] == str(row["response_ids"][p]) and shown["position"].startswith(f"{p} of ")
            assert shown["text"] == json.dumps(_char(row["response_ids"][p]))
            assert number(shown["reward"]) == row["reward"]
            assert number(shown["sequence advantage"]) == num(row["advantage"])
            for field, label in (("token_logprobs", "log-prob"), ("token_entropies", "entropy"),
                                 ("token_advantages", "token advantage"), ("resrl_weights", "ResRL weight ω"),
                                 ("resrl_residuals", "residual energy e(x)"), ("nthr_weights", "NTHR weight"),
                                 ("nthr_scores", "NTHR score s⁻")):
                v = row[field][p]
                if v is None:
                    assert shown[label] == "—", (field, shown[label])
                else:
                    assert math.isclose(number(shown[label]), v, rel_tol=5e-4, abs_tol=1e-12), (field, shown[label], v)
            at = {s: tok[(tok.step == s) & (tok.group_id == gid) & (tok.response_index == k) & (tok.position == p)]
                  .logp.item() for s in (0, 2)}
            assert math.isclose(number(shown["Δ log-prob 0→2"]), at[2] - at[0], rel_tol=5e-4, abs_tol=1e-9)
            assert shown["shared / unique"] == ("shared prefix" if p < _shared(rows, row) else "unique")
            checked += 1
    assert checked >= 8


def _char(token_id: int) -> str:
    from resrl_analysis.probes.synthetic import char_tokenizer

    return char_tokenizer().decode([token_id], skip_special_tokens=False)


def _shared(rows: list[dict], row: dict) -> int:
    group = [r for r in rows if r["group_id"] == row["group_id"]]
    return slow_shared([r["response_ids"] for r in group], [r["reward"] > 0 for r in group])[group.index(row)]


def test_keyboard_focus_shows_the_numbers_and_moves_token_by_token(driver, pages, view_fixture_runs):
    rows = read_dump(view_fixture_runs["ours"] / "rollouts" / "step_000000.jsonl")
    open_page(driver, pages["ours"])
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys("j")  # the first group's header
    active = driver.switch_to.active_element
    assert "ghead" in active.get_attribute("class")
    active.send_keys(Keys.ENTER)  # its first token
    first = rows[0]
    shown = tip_rows(driver)
    assert shown["token id"] == str(first["response_ids"][0])
    assert shown["position"] == f"0 of {len(first['response_ids'])}"
    assert number(shown["log-prob"]) == num(first["token_logprobs"][0])
    driver.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    shown = tip_rows(driver)
    assert shown["position"].startswith("1 of ") and number(shown["entropy"]) == num(first["token_entropies"][1])
    driver.switch_to.active_element.send_keys(Keys.ARROW_DOWN)  # the same position in the next response
    shown = tip_rows(driver)
    assert shown["response"].startswith("1 ") and shown["token id"] == str(rows[1]["response_ids"][1])
    driver.switch_to.active_element.send_keys(Keys.ESCAPE)
    assert "ghead" in driver.switch_to.active_element.get_attribute("class")
    assert driver.find_element(By.ID, "tip").is_displayed() is False
    body.send_keys("]")  # the next step
    assert Select(driver.find_element(By.ID, "step")).first_selected_option.get_attribute("value") == "rollouts:1"


# ----------------------------------------------------------------------------- colours and filters


def test_delta_logprob_colours_follow_the_sign_of_the_deltas_on_disk(driver, pages, view_fixture_runs):
    run = view_fixture_runs["ours"]
    tok = load_results(run / "probes")["scores"].tokens
    open_page(driver, pages["ours"])
    choose(driver, "quantity", "delta_logp")
    for a, b in ((0, 1), (1, 2)):
        choose(driver, "pair", f"{a}-{b}")
        lo = driver.find_element(By.CSS_SELECTOR, "#legend .ticks span:last-child").text
        top = float(lo.replace("≥", "").strip())
        x = tok[tok.step == a].merge(tok[tok.step == b], on=["group_id", "response_index", "position"])
        x["d"] = x.logp_y - x.logp_x
        strong = x[x.d.abs() > 0.2 * top]
        assert (strong.d < 0).sum() >= 3 and (strong.d > 0).sum() >= 3
        for row in strong.itertuples():
            r, _, bl = background(token(driver, row.group_id, row.response_index, row.position))
            assert (r > bl) == (row.d < 0), (row, r, bl)  # red: the token lost likelihood; blue: it gained


def test_groups_in_lld_filter_leaves_the_groups_resrl_probe_marked(driver, pages, view_fixture_runs):
    d = load_results(view_fixture_runs["ours"] / "probes")["lld"].deltas
    open_page(driver, pages["ours"])
    driver.find_element(By.ID, "lld").click()
    for a, b in ((0, 1), (0, 2), (1, 2)):
        choose(driver, "pair", f"{a}-{b}")
        marked = d[(d.step_from == a) & (d.step_to == b) & (d.lld_sum == True)].group_id  # noqa: E712 (nullable)
        shown = [int(g.get_attribute("data-gid")) for g in driver.find_elements(By.CSS_SELECTOR, "#groups .group")]
        assert sorted(shown) == sorted(set(marked.tolist())) and 0 < len(shown) < 5
        groups = driver.find_elements(By.CSS_SELECTOR, "#groups .group")
        assert all(g.find_elements(By.CLASS_NAME, "lld") for g in groups)
    driver.find_element(By.ID, "lld").click()
    assert counts(driver)[0] == 5


def test_mixed_reward_search_and_sort(driver, pages, view_fixture_runs):
    rows = read_dump(view_fixture_runs["ours"] / "rollouts" / "step_000001.jsonl")
    d = load_results(view_fixture_runs["ours"] / "probes")["lld"].deltas
    open_page(driver, pages["ours"])
    driver.find_element(By.ID, "mixed").click()
    groups = {r["group_id"]: [x["reward"] > 0 for x in rows if x["group_id"] == r["group_id"]] for r in rows}
    choose(driver, "step", "rollouts:1")
    assert counts(driver)[0] == sum(any(v) and not all(v) for v in groups.values())
    driver.find_element(By.ID, "mixed").click()
    choose(driver, "reward", "neg")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#groups .resp")) == sum(not (r["reward"] > 0) for r in rows)
    assert not driver.find_elements(By.CSS_SELECTOR, "#groups .rmeta.pos")
    choose(driver, "reward", "all")
    box = driver.find_element(By.ID, "search")
    box.send_keys(rows[-1]["prompt"])
    WebDriverWait(driver, 5).until(lambda dr: counts(dr)[0] == 1)
    assert driver.find_element(By.CSS_SELECTOR, "#groups .prompt").text == rows[-1]["prompt"]
    box.clear()
    box.send_keys(" ")  # trimmed: no filter
    WebDriverWait(driver, 5).until(lambda dr: counts(dr)[0] == len(groups))
    choose(driver, "step", "rollouts:0")
    choose(driver, "pair", "0-2")
    choose(driver, "sort", "asc")
    shown = [int(g.get_attribute("data-gid")) for g in driver.find_elements(By.CSS_SELECTOR, "#groups .group")]
    want = d[(d.step_from == 0) & (d.step_to == 2) & (d.comparison == "vs_initial")]
    want = want.assign(v=want.delta_pos_sum.map(num)).sort_values(["v"], na_position="last", kind="stable")
    assert shown == want.group_id.tolist()


def test_two_runs_side_by_side_on_the_same_prompts(driver, pages, view_fixture_runs):
    open_page(driver, pages["pair"])
    assert Select(driver.find_element(By.ID, "right")).first_selected_option.text == "verl"
    rows = driver.find_elements(By.CSS_SELECTOR, "#groups .row.two")
    prompts = {s: set(load_results(view_fixture_runs[s] / "probes")["scores"].prompts.prompt) for s in ("trl", "verl")}
    assert len(rows) == len(prompts["trl"] | prompts["verl"])
    both = 0
    for row in rows:
        panes = row.find_elements(By.CLASS_NAME, "pane")
        texts = [p.find_elements(By.CLASS_NAME, "prompt") for p in panes]
        if all(texts):
            assert texts[0][0].text == texts[1][0].text
            both += 1
        else:
            assert "no group with this prompt" in row.text
    assert both == len(prompts["trl"] & prompts["verl"]) >= 1
    choose(driver, "right", "-1")
    assert not driver.find_elements(By.CSS_SELECTOR, "#groups .row.two")


# ----------------------------------------------------------------------------- self-contained, readable


def test_no_network_request_and_no_console_error(driver, pages):
    driver.get_log("performance")
    open_page(driver, pages["pair"])
    for q in ("delta_logp", "entropy", "nthr_weight", "shared"):
        choose(driver, "quantity", q)
    ActionChains(driver).move_to_element(driver.find_element(By.CSS_SELECTOR, "#groups .t")).perform()
    tip_rows(driver)
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            urls.append(msg["params"].get("request", {}).get("url") or msg["params"].get("url"))
    assert urls == [pages["pair"].as_uri()]  # the file itself, nothing else
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert [e for e in driver.get_log("browser") if e["level"] != "INFO"] == []


def test_dark_and_light_schemes_and_the_legend(driver, pages):
    try:
        for scheme, dark in (("dark", True), ("light", False)):
            driver.execute_cdp_cmd("Emulation.setEmulatedMedia",
                                   {"features": [{"name": "prefers-color-scheme", "value": scheme}]})
            open_page(driver, pages["ours"])
            bg = background(driver.find_element(By.TAG_NAME, "body"))
            assert (sum(bg) < 150) == dark, bg
            choose(driver, "quantity", "advantage")
            legend = driver.find_element(By.ID, "legend").text
            assert "token advantage" in legend and "no value for this token" in legend and "shared prefix" in legend
            assert "LLD" in legend and "positive (reward > 0)" in legend
            for t in driver.find_elements(By.CSS_SELECTOR, "#groups .t")[:40]:  # text readable on its colour
                fg = t.value_of_css_property("color")
                c = [int(float(x)) for x in fg[fg.index("(") + 1: fg.index(")")].split(",")[:3]]
                b = background(t) if "na" not in t.get_attribute("class") else bg
                assert abs(sum(c) - sum(b)) > 200, (c, b)
    finally:
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


def test_the_page_says_what_it_left_out(driver, view_fixture_runs, tmp_path):
    page = write_view([view_fixture_runs["ours"]], tmp_path / "capped.html", max_groups=2)
    open_page(driver, page)
    summary = driver.find_element(By.ID, "omitted-summary").text  # the first note, in view without a click
    assert summary.startswith("Left out: at most 2 prompt groups per step (--max-groups 2)")
    driver.find_element(By.ID, "omitted-summary").click()
    assert "4 of 10 groups embedded" in driver.find_element(By.ID, "omitted-box").text
    assert counts(driver)[0] == 2


def test_the_address_fragment_sets_the_first_view(driver, pages):
    driver.get(pages["ours"].as_uri() + "#step=rollouts:1&q=entropy&pair=1-2&mixed=1&sort=desc")
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.documentElement.dataset.ready"))
    picked = {c: Select(driver.find_element(By.ID, c)).first_selected_option.get_attribute("value")
              for c in ("step", "quantity", "pair", "sort")}
    assert picked == {"step": "rollouts:1", "quantity": "entropy", "pair": "1-2", "sort": "desc"}
    assert driver.find_element(By.ID, "mixed").is_selected()
    assert driver.find_element(By.CSS_SELECTOR, "#legend strong").text.startswith("entropy")
