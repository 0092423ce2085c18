"""The episode browser on a real run dir: two HotpotQA-wiki conditions run through
`pipeline.run_condition` with a scripted model (the real agent loop, BM25 search and record writer),
FireAct's training trajectories saved by `data.save_dataset`; the page read back with an HTML parser,
and (slow) opened in a real headless Chromium, filtered and clicked."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from bs4 import BeautifulSoup
from scripted import ScriptedLLM, by_question

from fireact_utils import browser
from fireact_utils.cli import main
from fireact_utils.config import AgentParams, load_params
from fireact_utils.data import load_fireact, save_dataset
from fireact_utils.failures import failure_class, gold_titles_by_id
from fireact_utils.io import atomic_write_json, read_jsonl, write_jsonl
from fireact_utils.pipeline import condition_questions, run_condition

N = 4
SCRIPT_TAG = "<script>alert('boo')</script>"  # in a thought: must reach the page as text
BOLD = "<b>yes</b>"  # an answer: must reach the table as text


def _search(title: str) -> str:
    return f"Thought: look it up.\nAction: search[{title}]"


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir, multihop_dir):
    """(run dir, task, {condition: records}) with a few-shot-like and a fine-tuned-like condition on the
    same 4 HotpotQA-wiki test questions, and 3 of FireAct's trajectories as the training data."""
    p = load_params("params/smoke.yaml", {"output_root": str(tmp_path_factory.mktemp("runs"))})
    task, idx = condition_questions(p, "hotpotqa-wiki", None, N)
    q, ans, gold = ([getattr(task, f)[i] for i in idx] for f in ("questions", "answers", "gold_titles"))
    scripts = {  # q[1]'s gold is "no"
        "fewshot": {q[0]: [_search(gold[0][0]), _search(gold[0][1]), f"Action: finish[{ans[0]}]"],  # right
                    q[1]: [f"Thought: I know it {SCRIPT_TAG}\nAction: finish[{BOLD}]"],  # never searched
                    q[2]: [_search("zebra xylophone quantum"), "Action: finish[no]"],  # searched, missed
                    q[3]: [_search(gold[3][0]), f"Action: finish[{gold[3][0]}]"]},  # saw one of two gold
        "finetuned": {q[0]: ["Thought: I recall it.\nAction: finish[Nobody]"],
                      q[1]: [_search(gold[1][0]), f"Action: finish[{ans[1]}]"],
                      q[2]: [_search(gold[2][0]), _search(gold[2][1]), f"Action: finish[{ans[2]}]"],
                      q[3]: [_search(gold[3][0]), f"Action: finish[{gold[3][0]}]"]}}
    conds = {name: run_condition(p, name, ScriptedLLM(by_question(s)), AgentParams(max_turns=4),
                                 task="hotpotqa-wiki", n=N, progress=False) for name, s in scripts.items()}
    save_dataset(load_fireact("hotpotqa", data_dir=data_dir)[:3], p.run_dir / "dataset")
    return p.run_dir, task, conds


@pytest.fixture(scope="module")
def page(run):
    """The run's page, parsed."""
    run_dir, _, _ = run
    return BeautifulSoup(browser.write(run_dir).read_text(), "html.parser")


def _table_rows(html: str) -> list[list]:
    """The rows of the page's DataTable, as itables embeds them (a JSON string inside its arguments; a
    float as [shown, value])."""
    rows = json.loads(json.loads(re.search(r'"data_json": ("(?:[^"\\]|\\.)*")', html).group(1)))
    return [[v[1] if isinstance(v, list) else v for v in row] for row in rows]


def test_every_episode_in_table_and_detail(run, page):
    """A row (its id linking to its detail) and a detail per episode of every condition, each row's
    failure class and scores the record's own."""
    run_dir, task, conds = run
    rows = _table_rows((run_dir / browser.PAGE).read_text())
    gold = gold_titles_by_id(task)
    expected = sorted([name, f'<a href="#{browser.anchor(name, r["id"])}">{r["id"]}</a>', bool(r["em"]),
                       round(r["f1"], 2), r["turns"], failure_class(r, gold[r["id"]])]
                      for name, recs in conds.items() for r in recs)
    col = [browser.COLUMNS.index(c) for c in ("condition", "id", "correct", "F1", "turns", "failure class")]
    assert sorted([row[i] for i in col] for row in rows) == expected  # rows in file order: as episodes finished
    for name, recs in conds.items():
        assert all(len(page.find_all(id=browser.anchor(name, r["id"]))) == 1 for r in recs)
    assert len(page.select("details.episode")) == 2 * N


def test_text_is_escaped(run, page):
    """A <script> in a thought and HTML in an answer are shown as text: never markup, nowhere."""
    run_dir, _, conds = run
    html = (run_dir / browser.PAGE).read_text()
    assert SCRIPT_TAG in conds["fewshot"][1]["steps"][0]["thought"]
    assert "alert(" in html and not re.search(r"<script>\s*alert", html)
    assert BOLD not in html
    shown = {row[browser.COLUMNS.index("prediction")] for row in _table_rows(html)}
    assert "&lt;b&gt;yes&lt;/b&gt;" in shown  # the table's cell: shown as text
    detail = page.find(id=browser.anchor("fewshot", conds["fewshot"][1]["id"]))
    assert SCRIPT_TAG in detail.select_one(".thought").get_text()  # parsed back: text, not a tag
    assert not detail.find("script") and not page.find("b", string="yes")


def test_gold_titles_beside_retrieved(run, page):
    """Wiki episodes list the gold paragraphs (found or missed) and what each search retrieved."""
    _, task, conds = run
    gold = gold_titles_by_id(task)

    def titles(rec, row):
        d = page.find(id=browser.anchor("fewshot", rec["id"]))
        cells = {tr.th.get_text(): tr.td for tr in d.select("table.facts tr")}
        return [(s.get_text(), "gold" in s["class"]) for s in cells[row].select(".title")]

    right, missed, partial = (conds["fewshot"][k] for k in (0, 2, 3))
    assert titles(right, "gold paragraphs") == [(t, True) for t in gold[right["id"]]]
    assert titles(right, "retrieved")[:2] == [(t, True) for t in gold[right["id"]]]  # each search's top hit
    assert titles(missed, "gold paragraphs") == [(t, False) for t in gold[missed["id"]]]
    assert titles(missed, "retrieved") and not any(g for _, g in titles(missed, "retrieved"))
    assert titles(partial, "gold paragraphs") == [(gold[partial["id"]][0], True), (gold[partial["id"]][1], False)]
    step = page.find(id=browser.anchor("fewshot", right["id"])).select("ol.steps li")[0]
    assert step.select_one(".obs").get_text().removeprefix("observation").startswith(f"{gold[right['id']][0]}: ")


def test_question_view_pairs_by_id(run, tmp_path):
    """Each question's view lists every condition's episode of that id (never by position: one
    condition's file is written in reverse), with its answer, EM and link."""
    run_dir, _, conds = run
    other = tmp_path / "run"
    (other / "eval").mkdir(parents=True)
    write_jsonl(other / "eval" / "fewshot.jsonl", conds["fewshot"])
    write_jsonl(other / "eval" / "finetuned.jsonl", conds["finetuned"][::-1])
    soup = BeautifulSoup(browser.write(other).read_text(), "html.parser")
    for r in conds["fewshot"]:
        view = soup.find(id=browser.question_anchor(r["id"]))
        rows = view.select("table.side tr")[1:]
        assert [tr.a["href"] for tr in rows] == [f"#{browser.anchor(c, r['id'])}" for c in ("fewshot", "finetuned")]
        by = [next(x for x in conds[c] if x["id"] == r["id"]) for c in ("fewshot", "finetuned")]
        assert [tr.select("td")[1].get_text() for tr in rows] == [x["answer"] for x in by]
        assert [tr.select("td")[2].get_text() for tr in rows] == [str(int(x["em"])) for x in by]


def test_filters(run):
    """`select` (behind `show`, `browse --ids/--conditions`) keeps the rows asked for and their details."""
    run_dir, _, conds = run
    kept, table = browser.select(conds, browser.episode_table(conds), conditions=["fewshot"], correct=False)
    assert list(kept) == ["fewshot"] and [r["id"] for r in kept["fewshot"]] == [r["id"] for r in conds["fewshot"][1:]]
    assert list(table["id"]) == [r["id"] for r in kept["fewshot"]]
    shown = browser.show(run_dir, failure_class="never searched").data
    assert shown.count('<details class="episode') == 2 and "<html" not in shown  # a fragment for a notebook
    with pytest.raises(ValueError, match="no column 'colour'"):
        browser.select(conds, browser.episode_table(conds), colour="red")
    with pytest.raises(ValueError, match="no episode has condition few_shot"):
        browser.select(conds, browser.episode_table(conds), conditions=["fewshot", "few_shot"])


def test_training_data_marks_the_loss(run, page, tmp_path):
    """The training trajectories with the agent's own Thought/Action text marked as carrying the loss,
    observations and the prompt not; under train.loss_on=all (the run's params.json) everything is."""
    run_dir, _, _ = run
    trajs = page.select("#training ~ details.traj pre")
    recs = read_jsonl(run_dir / "dataset" / "trajectories.jsonl")
    assert len(trajs) == len(recs) == 3
    marked = [m.get_text() for m in trajs[0].find_all("mark")]
    assert marked and all(m.startswith(("Thought:", "Action:")) and "Observation:" not in m for m in marked)
    assert "### Instruction" in trajs[0].get_text() and "### Instruction" not in "".join(marked)
    everything = tmp_path / "all"
    shutil.copytree(run_dir / "dataset", everything / "dataset")
    p = load_params("params/smoke.yaml", ["train.loss_on=all"])
    atomic_write_json(everything / "params.json", {"params": p.dump()})
    view = browser.training_view(everything)
    assert view["loss_on"] == "all" and all(loss for t in view["trajectories"] for _, loss in t["pieces"])


def test_cli_browse_and_compare(run, tmp_path, capsys):
    """`browse` writes the page where asked; `compare --html` writes only the flipped questions, both
    runs' episodes of each side by side."""
    run_dir, _, conds = run
    out = tmp_path / "few.html"
    assert main(["browse", str(run_dir), "--out", str(out), "--conditions", "fewshot"]) == 0
    assert out.read_text().count('<details class="episode') == N and str(out) in capsys.readouterr().out
    run_b = tmp_path / "b"
    write_jsonl(run_b / "eval" / "fewshot.jsonl", conds["finetuned"])  # b's few-shot: a's fine-tuned episodes
    flips = tmp_path / "flips.html"
    assert main(["compare", str(run_dir), str(run_b), "--html", str(flips)]) == 0
    soup = BeautifulSoup(flips.read_text(), "html.parser")
    flipped = [a["id"] for a, b in zip(conds["fewshot"], conds["finetuned"], strict=True) if a["em"] != b["em"]]
    assert len(flipped) == 3
    assert sorted(d["id"] for d in soup.select(".detail[id^=ep-]")) == sorted(
        browser.anchor(f"{side}:fewshot", i) for i in flipped for side in "ab")
    assert main(["browse", str(tmp_path / "nowhere")]) == 2


# ---------------------------------------------------------------- a real browser


@pytest.fixture
def chromium():
    """Selenium driving Debian's chromium and chromedriver, headless (skipped where they are missing,
    unless $FIREACT_REQUIRE_BROWSER is set: CI installs them)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.environ.get("FIREACT_REQUIRE_BROWSER"):
            pytest.fail("chromium or chromedriver is missing and $FIREACT_REQUIRE_BROWSER is set")
        pytest.skip("no chromium/chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


@pytest.mark.slow
def test_filter_and_open_an_episode_in_chromium(run, chromium):
    """From file://: the table draws from the embedded bundle; filtering the condition and correct
    columns leaves that condition's wrong episodes; clicking one's id opens its detail, its steps shown
    as text (the <script> in its thought runs nowhere); the search box finds an id in both conditions."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run_dir, _, conds = run
    d = chromium
    d.get(browser.write(run_dir).as_uri())
    wait = WebDriverWait(d, 60)
    rows = lambda: d.find_elements(By.CSS_SELECTOR, "#episodes tbody tr")  # noqa: E731
    wait.until(lambda _: len(rows()) == 2 * N and rows()[0].find_elements(By.TAG_NAME, "a"))
    filters = d.find_elements(By.CSS_SELECTOR, "#episodes thead input")
    filters[browser.COLUMNS.index("condition")].send_keys("fewshot")
    filters[browser.COLUMNS.index("correct")].send_keys("false")
    wrong = [r["id"] for r in conds["fewshot"] if not r["em"]]
    wait.until(lambda _: [r.find_element(By.TAG_NAME, "a").text for r in rows()] == wrong)
    target = conds["fewshot"][1]
    link = next(a for a in d.find_elements(By.CSS_SELECTOR, "#episodes tbody a") if a.text == target["id"])
    link.click()
    detail = d.find_element(By.ID, browser.anchor("fewshot", target["id"]))
    wait.until(lambda _: detail.is_displayed())
    text = detail.text
    assert SCRIPT_TAG in text and target["question"] in text and f"finish[{BOLD}]" in text
    assert d.execute_script("return location.hash") == f"#{browser.anchor('fewshot', target['id'])}"
    d.execute_script("location.hash = '#top'")
    for f in filters:
        f.clear()
        f.send_keys(" \b")  # clearing by script leaves DataTables' filter: a keystroke redraws
    search = d.find_element(By.CSS_SELECTOR, "input[type=search]:not(thead input)")
    search.send_keys(conds["fewshot"][2]["id"])
    wait.until(lambda _: sorted(r.find_element(By.TAG_NAME, "td").text for r in rows()) == ["fewshot", "finetuned"])
