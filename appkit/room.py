"""The workshop room: what participants submitted, kept in SQLite so that a restart and several
server processes on one machine share it.

A submission is a participant's soup (its ingredients, uniformly averaged) with its val and test
accuracy, under a name they chose and a token only their own link holds: submitting again with
the same token replaces their entry, never someone else's. Test accuracy is stored but shown only
after the facilitator reveals it (:func:`revealed`); choosing on val and reporting test is the
lesson the room makes with its own choices.

The facilitator is whoever holds ``SOUP_FACILITATOR_TOKEN`` (set on the server): the token is
compared in constant time and never shown. Without it set, the room has no facilitator.

>>> import tempfile, pathlib
>>> room = Room(pathlib.Path(tempfile.mkdtemp()) / "room.sqlite")
>>> room.submit("digits", "tok-a", "Ada", ("ft-01", "ft-02"), val=0.9, test=0.8)
>>> room.submit("digits", "tok-a", "Ada L.", ("ft-01",), val=0.95, test=0.85)  # her own entry, replaced
>>> [(s.name, s.ingredients, s.val) for s in room.submissions("digits")]
[('Ada L.', ('ft-01',), 0.95)]
"""

from __future__ import annotations

import csv
import hmac
import io
import os
import secrets
import sqlite3
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from soup_core.export import link_names, names_from_link

ROOM_DB_ENV, FACILITATOR_ENV = "SOUP_ROOM_DB", "SOUP_FACILITATOR_TOKEN"
MAX_NAME = 40  # characters of a participant's name
MAX_INGREDIENTS = 4096
SCHEMA = """
CREATE TABLE IF NOT EXISTS submissions (
    zoo TEXT NOT NULL, token TEXT NOT NULL, name TEXT NOT NULL, ingredients TEXT NOT NULL,
    val REAL NOT NULL, test REAL, submitted REAL NOT NULL, PRIMARY KEY (zoo, token));
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class RoomError(ValueError):
    """A submission the room refuses; the message says what to change."""


@dataclass(frozen=True)
class Submission:
    zoo: str
    token: str
    name: str
    ingredients: tuple[str, ...]
    val: float
    test: float | None
    submitted: float


def default_path() -> Path:
    """``SOUP_ROOM_DB``, else ``room.sqlite`` in the server's data folder (the system's temporary folder)."""
    return Path(os.environ.get(ROOM_DB_ENV) or Path(tempfile.gettempdir()) / "model-soup-lab-room.sqlite")


def new_token() -> str:
    """A participant's token: 128 random bits, kept in their link (no cookie)."""
    return secrets.token_urlsafe(16)


def clean_name(name: str) -> str:
    """A participant's name as the room shows it: trimmed, at most MAX_NAME characters, printable."""
    name = " ".join(str(name).split())
    if not name:
        raise RoomError("type your name first (what the room's table shows for your soup)")
    if len(name) > MAX_NAME:
        raise RoomError(f"a name of at most {MAX_NAME} characters, please ({len(name)} given)")
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise RoomError("a name of letters, digits and punctuation, please (no control characters)")
    return name


def spreadsheet_text(text: str) -> str:
    """Text a spreadsheet shows as text: a leading =, +, -, @ would make it a formula."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def is_facilitator(given: str | None) -> bool:
    """Whether ``given`` is the server's facilitator token (constant time; False when none is set)."""
    expected = os.environ.get(FACILITATOR_ENV, "")
    return bool(expected) and bool(given) and hmac.compare_digest(str(given).encode(), expected.encode())


class Room:
    """Submissions and the room's switches (test revealed) in one SQLite file (WAL mode)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path or default_path())
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)  # autocommit; one statement each
        db.execute("PRAGMA busy_timeout=10000")
        return db

    def submit(self, zoo: str, token: str, name: str, ingredients: tuple[str, ...], *, val: float,
               test: float | None) -> None:
        """Record (or replace, for the same ``token``) a participant's soup."""
        if not token:
            raise RoomError("this session has no room token; reload the page")
        if not ingredients or len(ingredients) > MAX_INGREDIENTS:
            raise RoomError("tick at least one checkpoint: the room records the soup of the ticked ones")
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO submissions VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (zoo, token, clean_name(name), link_names(ingredients), float(val),
                        None if test is None else float(test), time.time()))

    def submissions(self, zoo: str) -> list[Submission]:
        """The zoo's submissions, best val first (then the earlier one)."""
        with self._connect() as db:
            rows = db.execute("SELECT zoo, token, name, ingredients, val, test, submitted FROM submissions "
                              "WHERE zoo = ? ORDER BY val DESC, submitted", (zoo,)).fetchall()
        return [Submission(z, t, n, tuple(names_from_link(i)), v, s, when) for z, t, n, i, v, s, when in rows]

    def reset(self, zoo: str) -> int:
        """Remove the zoo's submissions; returns how many there were."""
        with self._connect() as db:
            return db.execute("DELETE FROM submissions WHERE zoo = ?", (zoo,)).rowcount

    def revealed(self) -> bool:
        with self._connect() as db:
            row = db.execute("SELECT value FROM settings WHERE key = 'revealed'").fetchone()
        return bool(row) and row[0] == "1"

    def reveal(self, shown: bool) -> None:
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO settings VALUES ('revealed', ?)", ("1" if shown else "0",))

    def hide_everywhere(self, hidden: bool) -> None:
        """While on and test is not revealed, every page shows val and the shifts only (:meth:`hiding`)."""
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO settings VALUES ('hide', ?)", ("1" if hidden else "0",))

    def hiding(self) -> bool:
        """Whether test is hidden on every page: the facilitator asked for it and has not revealed test."""
        with self._connect() as db:
            rows = dict(db.execute("SELECT key, value FROM settings WHERE key IN ('hide', 'revealed')").fetchall())
        return rows.get("hide") == "1" and rows.get("revealed") != "1"

    def present(self, zoo: str, step: str) -> None:
        """Pin the zoo and Tour step every following session shows (the presenter's)."""
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO settings VALUES ('presenter', ?)", (f"{zoo}\n{step}",))

    def stop_presenting(self) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM settings WHERE key = 'presenter'")

    def presented(self) -> tuple[str, str] | None:
        """``(zoo, step)`` the presenter shows, or None."""
        with self._connect() as db:
            row = db.execute("SELECT value FROM settings WHERE key = 'presenter'").fetchone()
        if not row or "\n" not in row[0]:
            return None
        zoo, step = row[0].split("\n", 1)
        return zoo, step

    def csv(self, zoo: str) -> str:
        """The zoo's submissions as CSV (tokens left out: they are the participants' keys)."""
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["rank", "name", "ingredients", "count", "val", "test", "submitted (UTC)"])
        for rank, s in enumerate(self.submissions(zoo), 1):
            writer.writerow([rank, spreadsheet_text(s.name), " ".join(s.ingredients), len(s.ingredients), f"{s.val:.6f}",
                             "" if s.test is None else f"{s.test:.6f}",
                             time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s.submitted))])
        return out.getvalue()
