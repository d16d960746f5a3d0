"""The workshop room: submissions kept in SQLite, ranked on val, test hidden until the facilitator
reveals it; a participant replaces only their own entry; a wrong token unlocks nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from appkit.plain import as_read
from appkit.room import Room, RoomError, clean_name, is_facilitator, spreadsheet_text
from soup_core.significance import versus
from soup_core.zoo import make_soup, open_zoo

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "correct horse battery staple"


@pytest.fixture
def shared_room(tmp_path, monkeypatch):
    path = tmp_path / "room.sqlite"
    monkeypatch.setenv("SOUP_ROOM_DB", str(path))
    monkeypatch.setenv("SOUP_FACILITATOR_TOKEN", TOKEN)
    return path


def test_a_participant_replaces_their_own_entry_and_never_another_ones(tmp_path):
    room = Room(tmp_path / "room.sqlite")
    room.submit("z", "token-a", "Ada", ("m1", "m2"), val=0.5, test=0.4)
    room.submit("z", "token-b", "Ada", ("m3",), val=0.7, test=0.6)  # same name, another person
    room.submit("z", "token-a", "Ada", ("m1",), val=0.6, test=0.5)  # Ada's second try replaces her first
    assert [(s.token, s.ingredients, s.val) for s in room.submissions("z")] == [
        ("token-b", ("m3",), 0.7), ("token-a", ("m1",), 0.6)]
    assert room.submissions("other zoo") == []
    assert room.reset("z") == 2 and room.submissions("z") == []


def test_the_room_survives_a_restart_and_is_shared_by_another_process(tmp_path):
    path = tmp_path / "room.sqlite"
    Room(path).submit("z", "token-a", "Ada", ("m1",), val=0.5, test=0.4)
    Room(path).reveal(True)
    code = ("import sys; from pathlib import Path; from appkit.room import Room; r = Room(Path(sys.argv[1])); "
            "r.submit('z', 'token-b', 'Grace', ('m2',), val=0.9, test=None); print(r.revealed())")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "True"
    assert [s.name for s in Room(path).submissions("z")] == ["Grace", "Ada"]


@pytest.mark.parametrize("name, message", [("   ", "type your name"), ("x" * 41, "at most 40"),
                                           ("Ada\x1b[31m", "no control characters")])
def test_a_name_the_room_cannot_show_is_one_line(name, message):
    with pytest.raises(RoomError, match=message):
        clean_name(name)


def test_names_are_trimmed_and_a_formula_stays_text_in_the_csv(tmp_path):
    assert clean_name("  Ada   Lovelace ") == "Ada Lovelace"
    room = Room(tmp_path / "room.sqlite")
    room.submit("z", "t", "=HYPERLINK(\"http://x\")", ("m1",), val=0.5, test=0.25)
    assert "'=HYPERLINK" in room.csv("z") and ",m1,1,0.500000,0.250000," in room.csv("z")
    assert spreadsheet_text("Ada") == "Ada" and "t" not in room.csv("z").split("\n")[0].split(",")  # no tokens


def test_the_facilitator_token_unlocks_only_when_set_and_equal(monkeypatch):
    monkeypatch.delenv("SOUP_FACILITATOR_TOKEN", raising=False)
    assert not is_facilitator("") and not is_facilitator("anything")
    monkeypatch.setenv("SOUP_FACILITATOR_TOKEN", TOKEN)
    assert is_facilitator(TOKEN) and not is_facilitator(TOKEN + " ") and not is_facilitator(None)


def _app(query: dict | None = None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.query_params.update(query or {})
    return at.run()


def _submit(name: str, untick: tuple[str, ...] = ()) -> AppTest:
    at = _app()
    for checkpoint in untick:
        at.checkbox(key=f"tick:digits-finetune:{checkpoint}").uncheck().run()
    at.text_input(key="room-name").input(name).run()
    at.button(key="room-submit").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    return at


def _room_text(at: AppTest) -> str:
    table = at.dataframe[0].value
    return " ".join(as_read(m.value) for m in at.markdown) + table.to_string()


def test_two_participants_are_ranked_on_val_with_test_hidden_until_the_facilitator_reveals_it(shared_room):
    zoo = open_zoo("digits-finetune")
    _submit("Ada")  # every checkpoint ticked
    grace = _submit("Grace", untick=tuple(zoo.names[10:]))
    assert grace.query_params["me"]  # her token is in her link, so she can submit again
    participant = _app()
    participant.switch_page("pages/room.py").run()
    table = participant.dataframe[0].value
    mine = {n: make_soup(zoo, "uniform", list(zoo.names) if n == "Ada" else list(zoo.names[:10]))
            for n in ("Ada", "Grace")}
    ranked = sorted(mine, key=lambda n: -mine[n].metrics["val"].accuracy)
    assert list(table["name"][:2]) == ranked
    assert list(table["val (%)"][:2]) == pytest.approx([100 * mine[n].metrics["val"].accuracy for n in ranked])
    assert set(table["test"]) == {"hidden until revealed"} and "test (%)" not in table
    assert not [b for b in participant.button if b.key == "room-reveal"]  # no controls for a participant

    wrong = _app({"facilitator": "guess"})
    wrong.switch_page("pages/room.py").run()
    assert not [b for b in wrong.button if b.key == "room-reveal"] and "facilitator" not in wrong.query_params

    facilitator = _app({"facilitator": TOKEN})
    assert "facilitator" not in facilitator.query_params  # never kept in a link
    facilitator.switch_page("pages/room.py").run()
    facilitator.button(key="room-reveal").click().run()
    participant.switch_page("pages/room.py").run()  # everyone sees it now
    table = participant.dataframe[0].value.set_index("name")
    greedy = make_soup(zoo, "greedy")
    for name in ranked:
        assert table.loc[name, "test (%)"] == pytest.approx(100 * mine[name].metrics["test"].accuracy)
        expected = versus(greedy, mine[name], zoo.ingredients(), zoo.evaluator, ["test"])[0].p_value
        assert table.loc[name, "p vs greedy (test)"] == pytest.approx(expected)
    assert table.loc["Greedy soup (reference)", "val (%)"] == pytest.approx(100 * greedy.metrics["val"].accuracy)


def test_a_participant_submitting_again_replaces_only_their_own_entry(shared_room):
    first = _submit("Ada")
    token = first.query_params["me"]
    again = _app({"me": token})
    again.checkbox(key="tick:digits-finetune:ft-00").uncheck().run()
    again.text_input(key="room-name").input("Ada L.").run()
    again.button(key="room-submit").click().run()
    _submit("Grace")
    names = sorted(s.name for s in Room(shared_room).submissions("digits-finetune"))
    assert names == ["Ada L.", "Grace"]


def test_a_bad_name_is_one_line_and_nothing_is_recorded(shared_room):
    at = _app()
    at.button(key="room-submit").click().run()
    assert "type your name" in at.error[0].value and not at.exception
    assert Room(shared_room).submissions("digits-finetune") == []


def test_the_facilitator_resets_the_room_and_downloads_it(shared_room):
    _submit("Ada")
    at = _app({"facilitator": TOKEN})
    at.switch_page("pages/room.py").run()
    assert "Ada" in _room_text(at)
    at.checkbox(key="room-reset-sure").check().run()
    at.button(key="room-reset").click().run()
    assert Room(shared_room).submissions("digits-finetune") == []


def test_the_presenter_moves_every_open_tour_to_their_zoo_and_step(shared_room):
    presenter = _app({"facilitator": TOKEN})
    presenter.switch_page("pages/tour.py").run()
    presenter.checkbox(key="tour-present").check().run()
    presenter.radio(key="tour-step").set_value("3 · Uniform soups").run()
    assert Room(shared_room).presented() == ("digits-finetune", "3 · Uniform soups")

    follower = _app({"zoo": "digits-bn"})
    follower.switch_page("pages/tour.py").run()
    assert follower.radio(key="tour-step").value == "3 · Uniform soups"
    assert follower.selectbox(key="zoo").value == "digits-finetune"  # the presenter's zoo, too
    assert follower.query_params["step"] == "3" and not follower.exception

    presenter.button(key="tour-next").click().run()
    follower.run()  # what the follower's 3-second watch does when the step changes
    assert follower.radio(key="tour-step").value == "4 · Greedy and pruned soups"

    presenter.checkbox(key="tour-present").uncheck().run()
    assert Room(shared_room).presented() is None
    follower.radio(key="tour-step").set_value("6 · BatchNorm").run()  # free again
    assert follower.radio(key="tour-step").value == "6 · BatchNorm"
    bystander = _app({"facilitator": "guess"})
    bystander.switch_page("pages/tour.py").run()
    assert not [c for c in bystander.checkbox if c.key == "tour-present"]  # a wrong token presents nothing


TEST_NUMBER = re.compile(r"\btest\b[^.;\n]{0,24}?\d|\d+(\.\d+)?\s*%\s+on test\b", re.IGNORECASE)


def _test_shown_on(at: AppTest) -> list[str]:
    """Every place a page shows a test figure: a metric, a table column, a chart's axis or trace, a sentence."""
    found = [f"metric {m.label}" for m in at.metric if "test" in m.label.lower()]
    found += [f"table column {c}" for frame in at.dataframe for c in frame.value.columns if "test" in str(c).lower()]
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        found += [f"chart {t.get('name')}" for t in spec.get("data", []) if "test" in str(t.get("name", "")).lower()]
        layout = spec.get("layout", {})
        found += [f"axis {a}" for a in ("xaxis", "yaxis") if "test" in json.dumps(layout.get(a, {}).get("title", ""))]
    texts = [*at.markdown, *at.caption, *at.info, *at.success, *at.warning, *at.subheader]
    found += [f"text {as_read(t.value)!r}" for t in texts if TEST_NUMBER.search(as_read(t.value))]
    found += [f"code {c.value[:40]!r}" for c in at.code if re.search(r'"test"|\|\s*test\s*\|', c.value)]
    return found


def test_hide_test_everywhere_leaves_val_and_shifts_on_every_page_until_the_reveal(shared_room):
    pages = ["ingredients", "recipes", "geometry", "landscape", "export", "tour"]
    participant = _app()
    participant.switch_page("pages/landscape.py").run()  # a landscape on test, computed before the switch
    participant.slider(key="land-grid").set_value(5).run()
    participant.selectbox(key="land-split").set_value("test").run()
    participant.button(key="land-compute").click().run()
    assert _test_shown_on(participant), "the check finds a landscape on test"
    participant.switch_page("pages/recipes.py").run()
    assert _test_shown_on(participant), "the check finds test where it is shown"
    facilitator = _app({"facilitator": TOKEN})
    facilitator.switch_page("pages/room.py").run()
    facilitator.checkbox(key="room-hide-everywhere:False").check().run()
    assert Room(shared_room).hiding()
    for page in pages:
        participant.switch_page(f"pages/{page}.py").run()
        assert not participant.exception, page
        assert _test_shown_on(participant) == [], page
    participant.switch_page("pages/geometry.py").run()
    assert "test" not in participant.selectbox(key="geometry-split").options
    participant.switch_page("pages/landscape.py").run()
    assert "test" not in participant.selectbox(key="land-split").options

    facilitator.button(key="room-reveal").click().run()  # the reveal shows test everywhere again
    participant.switch_page("pages/recipes.py").run()
    assert any("table column test" == f for f in _test_shown_on(participant))
