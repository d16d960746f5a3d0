"""A light Streamlit client: one session over the server's own WebSocket protocol, no browser.

It speaks what the browser speaks on ``/_stcore/stream``: it sends ``BackMsg.rerun_script`` with
the query string, the page, the fragment a widget lives in and the widget states (ticks, button
triggers) and declares the cached messages it holds, as the browser does; it reads the
``ForwardMsg`` stream (new elements by delta path, references to cached messages, the end of each
run). One difference: the browser sends every widget's value, this client only those it changed
(the server keeps the others as they were, so they are the same). The server runs the same
scripts per action as for a browser, while the client costs a fraction of Chromium's CPU: a load
test on one machine then measures the server.

It renders nothing: an element is kept as its protobuf, and ``text()`` is the protobuf's text
form, enough to find a label or a number.

    async with ProtocolSession("http://127.0.0.1:8501") as s:
        await s.open()
        await s.set_checkbox("ft-03", False)
        await s.click("Run")
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from google.protobuf import text_format
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.proto.WidgetStates_pb2 import WidgetState
from websockets.asyncio.client import connect


class ProtocolSession:
    """One participant: a WebSocket to the server and the page as the server last drew it."""

    def __init__(self, url: str, timeout: float = 600.0):
        parts = urlsplit(url)
        self.ws_url = f"ws://{parts.netloc}/_stcore/stream"
        self.timeout = timeout
        self.query = ""
        self.page_hash = ""
        self.pages: dict[str, str] = {}        # page title -> page_script_hash
        self.elements: dict[tuple, tuple] = {}  # delta path -> (Element, fragment_id)
        self.widgets: dict[str, WidgetState] = {}  # widget id -> the state this client set
        self.cache: dict[str, ForwardMsg] = {}  # hash -> cacheable message, as the browser keeps them
        self.exceptions: list[str] = []
        self._running = False
        self._runs_finished = 0
        self._changed = asyncio.Event()

    async def __aenter__(self) -> "ProtocolSession":
        self._ws = await connect(self.ws_url, subprotocols=["streamlit"], max_size=None,
                                 open_timeout=self.timeout)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        self._reader.cancel()
        await self._ws.close()

    # --- what a participant does -------------------------------------------------------------

    async def open(self, query: str = "") -> None:
        """Load the app (the default page) with ``query`` (``a=1&b=2``) and wait for the run."""
        self.query = query
        await self._rerun()

    async def goto(self, title: str) -> None:
        """Switch page by its title in the navigation, as a click in the sidebar does."""
        await self._rerun(page_hash=self.pages[title])

    async def set_checkbox(self, label: str, value: bool) -> None:
        element, fragment = self._widget("checkbox", label)
        state = WidgetState(id=element.checkbox.id, bool_value=value)
        self.widgets[state.id] = state
        await self._rerun(fragment=fragment)

    async def set_text(self, label: str, value: str) -> None:
        """Type ``value`` into a text input and leave it (the browser sends the value on blur/Enter)."""
        element, fragment = self._widget("text_input", label)
        state = WidgetState(id=element.text_input.id, string_value=value)
        self.widgets[state.id] = state
        await self._rerun(fragment=fragment)

    async def click(self, label: str) -> None:
        """Press a button: a trigger sent once, as the browser sends it."""
        element, fragment = self._widget("button", label)
        await self._rerun(fragment=fragment, trigger=WidgetState(id=element.button.id, trigger_value=True))

    # --- what the page shows ----------------------------------------------------------------

    def text(self) -> str:
        return "\n".join(text_format.MessageToString(e, as_utf8=True) for e, _ in self._ordered())

    def has(self, kind: str, label: str | None = None) -> bool:
        return any(e.WhichOneof("type") == kind and (label is None or getattr(e, kind).label == label)
                   for e, _ in self._ordered())

    def metric(self, label: str) -> str:
        for e, _ in self._ordered():
            if e.WhichOneof("type") == "metric" and e.metric.label == label:
                return e.metric.body
        raise LookupError(f"no metric labelled {label!r} on the page")

    # --- the protocol -----------------------------------------------------------------------

    def _ordered(self):
        return [self.elements[k] for k in sorted(self.elements)]

    def _widget(self, kind: str, label: str):
        for element, fragment in self._ordered():
            if element.WhichOneof("type") == kind and getattr(element, kind).label == label:
                return element, fragment
        raise LookupError(f"no {kind} labelled {label!r} on the page")

    async def _rerun(self, page_hash: str | None = None, fragment: str = "",
                     trigger: WidgetState | None = None) -> None:
        msg = BackMsg()
        state = msg.rerun_script
        state.query_string = self.query
        state.page_script_hash = self.page_hash if page_hash is None else page_hash
        state.fragment_id = fragment
        state.widget_states.widgets.extend(self.widgets.values())
        if trigger is not None:
            state.widget_states.widgets.append(trigger)
        state.cached_message_hashes.extend(self.cache)
        finished = self._runs_finished
        await self._ws.send(msg.SerializeToString())
        await asyncio.wait_for(self._settled(finished), self.timeout)

    async def _settled(self, finished_before: int) -> None:
        """Until a run started after the request has ended and none is running."""
        while self._runs_finished == finished_before or self._running:
            self._changed.clear()
            await self._changed.wait()

    async def _read(self) -> None:
        async for frame in self._ws:
            msg = ForwardMsg()
            msg.ParseFromString(frame)
            self._handle(msg)
            self._changed.set()

    def _handle(self, msg: ForwardMsg) -> None:
        kind = msg.WhichOneof("type")
        if kind == "ref_hash":
            cached = self.cache[msg.ref_hash]
            cached.metadata.CopyFrom(msg.metadata)
            msg, kind = cached, "delta"
        elif msg.metadata.cacheable:
            self.cache[msg.hash] = msg
        if kind == "new_session":
            self.page_hash = msg.new_session.page_script_hash
            if not msg.metadata.run.fragment_ids:  # a full run redraws the page
                self.elements.clear()
        elif kind == "navigation":
            self.pages = {p.page_name: p.page_script_hash for p in msg.navigation.app_pages}
            self.page_hash = msg.navigation.page_script_hash or self.page_hash
        elif kind == "page_info_changed":
            self.query = msg.page_info_changed.query_string
        elif kind == "session_status_changed":
            self._running = msg.session_status_changed.script_is_running
        elif kind == "script_finished":
            self._runs_finished += 1
        elif kind == "delta" and msg.delta.WhichOneof("type") == "new_element":
            element = msg.delta.new_element
            self.elements[tuple(msg.metadata.delta_path)] = (element, msg.delta.fragment_id)
            if element.WhichOneof("type") == "exception":
                self.exceptions.append(f"{element.exception.type}: {element.exception.message}")
