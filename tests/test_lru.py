"""The byte-bounded cache the app keeps soups in: least recently used out, never past its budget."""

from __future__ import annotations

import threading
import time

import torch

from appkit.lru import ByteBudgetCache, tensor_bytes


def test_the_least_recently_used_goes_first_and_the_budget_holds():
    cache = ByteBudgetCache(budget_bytes=100)
    for key in "abc":
        cache.get_or_make(key, lambda: key, size=lambda _: 40)
    assert cache.keys() == ["b", "c"] and cache.bytes_held == 80  # a went when c came
    cache.get_or_make("b", lambda: "never made", size=lambda _: 40)  # b is used again: now the newest
    cache.get_or_make("d", lambda: "d", size=lambda _: 40)
    assert cache.keys() == ["b", "d"]


def test_an_entry_larger_than_the_budget_is_returned_not_kept():
    cache = ByteBudgetCache(budget_bytes=10)
    assert cache.get_or_make("big", lambda: "x" * 11, size=len) == "x" * 11 and cache.keys() == []


def ask_together(cache: ByteBudgetCache, key: str, make, threads: int) -> list:
    """``get_or_make(key, make)`` from ``threads`` threads released at once: what each got (or the
    text of the error it got)."""
    results, together = [], threading.Barrier(threads)

    def ask():
        together.wait()
        try:
            results.append(cache.get_or_make(key, make, size=len))
        except ValueError as exc:
            results.append(str(exc))
    workers = [threading.Thread(target=ask) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


def slow(value, made: list):
    """A maker that records each call and takes long enough for the others to arrive."""
    def make():
        made.append(1)
        time.sleep(0.5)
        if isinstance(value, Exception):
            raise value
        return value
    return make


def test_concurrent_requests_for_one_key_compute_it_once():
    cache, made = ByteBudgetCache(budget_bytes=100), []
    assert ask_together(cache, "k", slow("soup", made), 4) == ["soup"] * 4 and len(made) == 1


def test_tensor_bytes_counts_each_storage_once():
    w = torch.zeros(10)  # 40 bytes
    assert tensor_bytes({"w": w, "tied": w, "b": torch.zeros(2, dtype=torch.float64)}) == 40 + 16
    assert tensor_bytes(None) == 0


def test_the_apps_soups_are_held_within_the_byte_budget(monkeypatch):
    import appkit.cache as cache
    from soup_core.zoo import open_zoo
    zoo = open_zoo("digits-finetune", device="cpu")
    one_soup = tensor_bytes(zoo.state_dict("ft-00"))
    monkeypatch.setattr(cache, "SOUPS", ByteBudgetCache(budget_bytes=int(1.5 * one_soup)))
    key = cache.zoo_key(zoo)
    first = cache.recipe_result(zoo, key, "uniform", ("ft-00", "ft-01"))
    assert cache.recipe_result(zoo, key, "uniform", ("ft-00", "ft-01")) is first  # kept, not remade
    cache.recipe_result(zoo, key, "uniform", ("ft-02", "ft-03"))
    assert len(cache.SOUPS.keys()) == 1 and cache.SOUPS.bytes_held <= 1.5 * one_soup


def test_waiters_share_an_oversized_value_and_an_error_without_computing_again():
    cache, made = ByteBudgetCache(budget_bytes=1), []
    assert ask_together(cache, "k", slow("too big to keep", made), 3) == ["too big to keep"] * 3
    assert len(made) == 1 and cache.keys() == []
    assert ask_together(cache, "bad", slow(ValueError("no such soup"), made), 3) == ["no such soup"] * 3
    assert len(made) == 2
