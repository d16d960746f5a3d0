"""The workspace: one typed object for what a participant chose, and the link that shares it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from appkit.workspace import LandscapeSettings, Workspace
from soup_core.zoo import open_zoo


@pytest.fixture(scope="module")
def zoo():
    return open_zoo("digits-finetune")


LINK = {"zoo": "digits-finetune", "use": "ft-03,ft-17", "export": "greedy;passes=2",
        "plane": "base,ft-17,ft-22", "grid": "9", "margin": "0.2", "split": "test", "bn": "keep", "precision": "bf16"}


def test_a_link_is_read_into_the_workspace_and_written_back_unchanged(zoo):
    ws = Workspace.from_query(LINK)
    assert ws.ticked(zoo) == ["ft-03", "ft-17"]
    assert ws.export.title() == "Greedy soup" and ws.export.params == (("passes", 2),)
    assert ws.to_query() == LINK


def test_without_a_link_everything_is_ticked(zoo):
    assert Workspace().ticked(zoo) == list(zoo.names)
    assert Workspace.from_query({"use": "not-a-checkpoint"}).ticked(zoo) == list(zoo.names)
    assert Workspace.from_query({"use": "ft-17,not-a-checkpoint"}).ticked(zoo) == ["ft-17"]


def test_ticking_sends_the_export_back_to_the_ticked_set_and_the_url_follows(zoo):
    ws = Workspace.from_query(LINK)
    ws = replace(ws, shown=zoo.name).with_ticks(zoo, ["ft-22", "ft-01"])
    assert ws.export is None and ws.ticked(zoo) == ["ft-01", "ft-22"]  # in the zoo's order
    assert ws.to_query()["use"] == "ft-01,ft-22" and "export" not in ws.to_query()
    assert ws.with_ticks(zoo, []).ticked(zoo) == []  # none ticked is a choice, not "all"


def test_an_unreadable_export_in_a_link_is_dropped():
    ws = Workspace.from_query({"export": "greedy;passes=many"})
    assert ws.export is None and "export" not in ws.to_query()


def test_landscape_settings_come_from_the_workspace_then_the_link_then_the_default(zoo):
    default = LandscapeSettings(("base", "ft-00", "ft-01"))
    choices, splits = ["base", *zoo.names], list(zoo.evaluator.split_names)
    from_link = Workspace.from_query(LINK).landscape_for(zoo, default, choices=choices, splits=splits)
    assert from_link == LandscapeSettings(("base", "ft-17", "ft-22"), 9, 0.2, "test", "keep", "bf16")
    bad = Workspace.from_query({"plane": "base,base,ft-01", "grid": "8", "bn": "melt"})
    assert bad.landscape_for(zoo, default, choices=choices, splits=splits) == default
    mine = LandscapeSettings(("ft-01", "ft-02", "ft-03"), grid=21)
    ws = Workspace.from_query(LINK)
    ws = replace(ws, landscape=(zoo.name, mine))
    assert ws.landscape_for(zoo, default, choices=choices, splits=splits) == mine
    assert ws.to_query()["plane"] == "ft-01,ft-02,ft-03" and ws.to_query()["grid"] == "21"


def test_showing_a_zoo_fixes_its_ticks_and_a_checkpoint_added_later_arrives_unticked(zoo):
    ws = Workspace.from_query({"use": "ft-03,ft-17", "export": "greedy"}).with_zoo_shown(zoo)
    assert ws.shown == zoo.name and ws.ticked(zoo) == ["ft-03", "ft-17"]
    assert ws.export is not None  # showing the zoo is not ticking: the link's export choice stays
    seen_before_the_upload = {n: on for n, on in ws.ticks[zoo.name].items() if n != "ft-31"}
    ws = replace(ws, ticks={zoo.name: seen_before_the_upload}, link={})
    assert ws.ticked(zoo) == ["ft-03", "ft-17"]  # ft-31 plays the upload: not ticked until its owner ticks it
