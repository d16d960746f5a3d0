"""The README's promises that had no test of their own (issue 29), each checked as the README words it."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import safetensors.torch
import torch

from appkit.workspace import LandscapeSettings, Workspace
from soup_core.errors import SoupError
from soup_core.export import Candidate
from soup_core.zoo import open_zoo, read_manifest
from appkit.plain import as_read
from tests.test_bad_inputs import _app, _count

UPLOADER = "upload:digits-finetune:False"


def test_checkpoint_names_with_commas_semicolons_and_equals_signs_survive_every_link(tmp_path):
    names = ["lr=1e-4,wd=0", "run;2", "50%@best", "plain"]
    for i, name in enumerate(names):
        safetensors.torch.save_file({"w": torch.full((2,), float(i))}, tmp_path / f"{name}.safetensors")
    zoo = open_zoo(tmp_path)
    assert sorted(zoo.names) == sorted(names)
    chosen = ["lr=1e-4,wd=0", "run;2", "50%@best"]
    shared = Workspace(shown=zoo.name, ticks={zoo.name: {n: n in chosen for n in zoo.names}}).to_query()
    assert Workspace.from_query(shared).ticked(zoo) == [n for n in zoo.names if n in chosen]
    for candidate in (Candidate.of_recipe("greedy", chosen, passes=2),
                      Candidate.point(("lr=1e-4,wd=0", "run;2", "50%@best"), (0.5, -1.0), "keep", align="run;2")):
        assert Candidate.from_query(candidate.to_query()) == candidate
    settings = LandscapeSettings(("run;2", "50%@best", "lr=1e-4,wd=0"))
    assert LandscapeSettings.from_query(settings.to_query(), LandscapeSettings(("plain", "run;2", "50%@best")),
                                        choices=zoo.names, splits=("val",)) == settings


def test_without_allowed_roots_the_app_opens_only_the_sample_zoos(monkeypatch, tmp_path):
    for i in range(2):
        safetensors.torch.save_file({"w": torch.randn(4)}, tmp_path / f"run{i}.safetensors")
    monkeypatch.delenv("SOUP_ALLOWED_ROOTS", raising=False)
    at = _app()
    at.sidebar.text_input(key="folder").input(str(tmp_path)).run()
    assert not at.exception
    assert "outside the allowed folders" in " ".join(e.value for e in at.sidebar.error)
    assert _count(at) == "32"  # the sample zoo stays open


def test_a_path_outside_the_roots_gets_the_same_answer_whether_or_not_it_exists(tmp_path):
    allowed, real, missing = tmp_path / "allowed", tmp_path / "secret", tmp_path / "nothing"
    allowed.mkdir()
    real.mkdir()
    safetensors.torch.save_file({"w": torch.ones(2)}, real / "a.safetensors")
    answers = []
    for path in (real, missing, real / "a.safetensors", missing / "a.safetensors"):
        with pytest.raises(SoupError) as refused:
            read_manifest(path, [allowed])
        answers.append(str(refused.value).replace(str(path), "PATH"))
    assert answers[0] == answers[1] and answers[2] == answers[3] and "outside the allowed folders" in answers[0]


def test_one_upload_budget_holds_every_sessions_uploads_and_a_removed_upload_frees_its_share(monkeypatch):
    from appkit.uploads import server_upload_bytes
    zoo = open_zoo("digits-finetune")
    mine, theirs = zoo.path("ft-05").read_bytes(), zoo.path("ft-06").read_bytes()
    gc.collect()  # sessions of earlier tests that are gone have removed their folders
    monkeypatch.setenv("SOUP_UPLOAD_BUDGET_MB", str((server_upload_bytes() + 1.5 * len(mine)) / 2**20))
    first, second = _app(), _app()
    first.file_uploader(key=UPLOADER).set_value([("mine.safetensors", mine, "application/octet-stream")]).run()
    assert not first.exception and _count(first) == "33"
    second.file_uploader(key=UPLOADER).set_value([("theirs.safetensors", theirs, "application/octet-stream")]).run()
    assert _count(second) == "32" and "(SOUP_UPLOAD_BUDGET_MB)" in " ".join(as_read(e.value) for e in second.error)
    first.file_uploader(key=UPLOADER).set_value([]).run()  # removed from the uploader: its file goes
    assert _count(first) == "32"
    second.run()  # the same upload, now that the room has space again
    assert not second.exception and _count(second) == "33" and not second.error


def test_at_most_two_uploads_are_decoded_at_once(monkeypatch):
    import appkit.uploads as uploads
    real, active, most, lock = uploads.load_state_dict_bytes, [0], [0], threading.Lock()

    def slow_decode(data, name):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.5)  # four uploads arriving together overlap here
            return real(data, name)
        finally:
            with lock:
                active[0] -= 1
    monkeypatch.setattr(uploads, "load_state_dict_bytes", slow_decode)
    data = open_zoo("digits-finetune").path("ft-00").read_bytes()
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(uploads.decoded(data, f"u{i}.safetensors",
                                                                                  lambda state: None)))
               for i in range(4)]  # what four sessions' uploads call, on the server's threads
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 4 and all(set(r) == set(results[0]) for r in results)
    assert most[0] == 2  # two at once (never more), and the other two waited


def test_with_every_heavy_slot_taken_heavy_work_waits_and_the_live_soup_does_not():
    from appkit.admission import HEAVY_WORK
    from appkit.cache import live_soup, load_zoo, recipe_result, zoo_key
    zoo = load_zoo("digits-finetune")
    release, holding = threading.Event(), threading.Barrier(HEAVY_WORK.slots + 1)

    def hold() -> None:
        with HEAVY_WORK.admitted():
            holding.wait()
            release.wait(120)
    holders = [threading.Thread(target=hold) for _ in range(HEAVY_WORK.slots)]
    for thread in holders:
        thread.start()
    holding.wait(60)  # every slot is held
    done: dict[str, object] = {}
    live = threading.Thread(target=lambda: done.update(live=live_soup(zoo, ["ft-02", "ft-09", "ft-30"])))
    greedy = threading.Thread(target=lambda: done.update(
        greedy=recipe_result(zoo, zoo_key(zoo), "greedy", ("ft-04", "ft-13", "ft-29"))))
    try:
        live.start()
        greedy.start()
        live.join(120)
        assert "live" in done  # ticking never waits in the line for heavy work
        deadline = time.monotonic() + 60
        while not HEAVY_WORK.waiting() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert HEAVY_WORK.waiting() == 1 and "greedy" not in done  # greedy is in line for a slot
    finally:
        release.set()
    greedy.join(120)
    assert done["greedy"].ingredients and set(done["greedy"].ingredients) <= {"ft-04", "ft-13", "ft-29"}
    for thread in holders:
        thread.join(10)


@pytest.mark.parametrize("name, inside", [("fp32", (False, False)), ("tf32", (True, True))])
def test_the_tf32_switches_are_set_for_a_run_and_restored_after_it_even_when_it_fails(name, inside):
    from soup_core.precision import precision
    switches = torch.backends.cuda.matmul, torch.backends.cudnn
    before = tuple(s.allow_tf32 for s in switches)
    with pytest.raises(RuntimeError, match="the run failed"):
        with precision(name, torch.device("cuda")):  # the switches only; nothing runs on a GPU here
            assert tuple(s.allow_tf32 for s in switches) == inside
            raise RuntimeError("the run failed")
    assert tuple(s.allow_tf32 for s in switches) == before


def test_soup_warm_0_starts_no_warm_up(monkeypatch):
    from appkit.warm import WARM_THREAD, start_warming
    monkeypatch.setenv("SOUP_WARM", "0")
    assert start_warming() is None
    assert WARM_THREAD not in {thread.name for thread in threading.enumerate()}
