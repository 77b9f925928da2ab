"""One HTTP/2 connection of the pure-Python HBONE peer and its CONNECT streams, with flow
control and half-close, on asyncio streams."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable

import h2.events
import h2.exceptions
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings

from .common import (
    CONNECTION_WINDOW,
    DEFAULT_WINDOW,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE,
    READ_SIZE,
    STREAM_WINDOW,
    HboneError,
    _close_writer,
    _h2_errors,
    _text,
)

log = logging.getLogger(__name__)


class _Connection:
    """An h2 state machine over an asyncio TLS stream, with the streams it carries.

    A reader task feeds received bytes to h2 and dispatches the events; senders call h2 directly
    (asyncio is single-threaded, so no lock is needed between awaits) and flush its output. The
    reader never waits for the write buffer to drain (that could deadlock two peers that both send);
    only stream writers do, which is where back-pressure belongs.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        client_side: bool,
        on_request: Callable[[HboneStream, dict[str, str]], None] | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.client_side = client_side
        self.on_request = on_request
        self.h2 = H2Connection(H2Configuration(client_side=client_side, header_encoding="utf-8"))
        settings: dict[SettingCodes, int] = {
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
        }
        if client_side:
            settings[SettingCodes.ENABLE_PUSH] = 0
        # Replace the defaults before the preface so that one SETTINGS frame carries ours; h2 reads
        # the inbound frame size limit from max_inbound_frame_size, fixed at construction.
        self.h2.local_settings = Settings(client=client_side, initial_values=settings)
        self.h2.max_inbound_frame_size = MAX_FRAME_SIZE
        self.streams: dict[int, HboneStream] = {}
        self.closed = False
        self.goaway = False
        self.error: HboneError | None = None
        self._slot_freed = asyncio.Event()
        self._close_started = False

    # -- output

    def start(self) -> None:
        """Queue the preface: SETTINGS, then widen the connection window to 16 MiB."""
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - DEFAULT_WINDOW)
        self.flush()

    def flush(self) -> None:
        """Hand whatever h2 queued to the transport (never blocks)."""
        data = self.h2.data_to_send()
        if data and not self.closed and not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        """Wait for the transport's write buffer to drain."""
        try:
            await self.writer.drain()
        except OSError as e:  # ConnectionError and ssl.SSLError included
            raise self._lost_error(e) from e

    def ack(self, stream_id: int, size: int) -> None:
        """Return ``size`` consumed bytes to the peer's windows (h2 batches the WINDOW_UPDATEs)."""
        if size and not self.closed:
            self.h2.acknowledge_received_data(size, stream_id)
            self.flush()

    # -- input

    async def run(self) -> None:
        """Read and dispatch until the peer goes away; then fail every stream."""
        error: BaseException | None = None
        try:
            while True:
                data = await self.reader.read(READ_SIZE)
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    log.warning("HTTP/2 protocol error from peer: %r", e)
                    self.flush()  # the GOAWAY h2 queued
                    error = e
                    break
                for event in events:
                    self._dispatch(event)
                self.flush()
        except OSError as e:
            error = e
        finally:
            self._lost(self._lost_error(error))
            if not self.writer.is_closing():
                self.writer.close()  # answers the peer's close_notify; the connection is done

    def _lost_error(self, cause: BaseException | None) -> HboneError:
        if self.error is not None:
            return self.error
        if cause is None:
            return HboneError("HBONE connection closed by peer")
        return HboneError(f"HBONE connection lost: {cause!r}")

    def _lost(self, error: HboneError) -> None:
        if self.error is None:
            self.error = error
        self.closed = True
        for stream in list(self.streams.values()):
            stream._fail(error)
        self.streams.clear()
        self._slot_freed.set()

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            padding = event.flow_controlled_length - len(event.data)
            if stream is None or stream._error is not None:
                self.ack(event.stream_id, event.flow_controlled_length)
            else:
                self.ack(event.stream_id, padding)  # padding is never read, return it now
                stream._feed(event.data)
        elif isinstance(event, h2.events.RequestReceived):
            headers = {_text(k): _text(v) for k, v in event.headers}
            stream = HboneStream(self, event.stream_id)
            self.streams[event.stream_id] = stream
            if self.on_request is None:
                stream.reset(ErrorCodes.REFUSED_STREAM)
            else:
                self.on_request(stream, headers)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_response({_text(k): _text(v) for k, v in event.headers})
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_end()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                code = event.error_code
                name = code.name if isinstance(code, ErrorCodes) else str(code)
                stream._fail(HboneError(f"stream {event.stream_id} reset by peer ({name})"))
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                for stream in self.streams.values():
                    stream._window.set()
            else:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._window.set()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for stream in self.streams.values():
                stream._window.set()
            self._slot_freed.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = True
            code = event.error_code or 0
            name = code.name if isinstance(code, ErrorCodes) else str(code)
            error = HboneError(f"GOAWAY from peer ({name})")
            last = event.last_stream_id or 0
            for stream_id, stream in list(self.streams.items()):
                outbound = (stream_id % 2 == 1) == self.client_side
                if code != ErrorCodes.NO_ERROR or (outbound and stream_id > last):
                    stream._fail(error)
            if code != ErrorCodes.NO_ERROR:
                self.error = self.error or error
        # SettingsAcknowledged, PingReceived (h2 answers it), PingAckReceived, PriorityUpdated,
        # TrailersReceived, InformationalResponseReceived ...: nothing to do.

    def forget(self, stream: HboneStream) -> None:
        """Drop a finished stream; unread data it had is returned to the connection window."""
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
            self._slot_freed.set()

    async def wait_for_slot(self) -> None:
        """Wait until the peer's SETTINGS_MAX_CONCURRENT_STREAMS allows one more outbound stream."""
        while (
            not self.closed
            and self.h2.open_outbound_streams >= self.h2.remote_settings.max_concurrent_streams
        ):
            self._slot_freed.clear()
            await self._slot_freed.wait()

    async def aclose(self, *, graceful: bool = True) -> None:
        """Send GOAWAY (if still possible) and close the transport, gracefully or by abort."""
        if self._close_started:
            if not graceful:
                self.writer.transport.abort()
            return
        self._close_started = True
        if not self.closed:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.h2.close_connection()
            self.flush()
        self._lost(self.error or HboneError("HBONE connection closed locally"))
        await _close_writer(self.writer, abort=not graceful)


class HboneStream:
    """One CONNECT stream: a bidirectional byte pipe with HTTP/2 flow control and half-close.

    ``status`` and ``response_headers`` are the response the client received (on the server side
    ``request_headers`` holds the request instead). Reads return ``b""`` once the peer sent
    END_STREAM; a reset or a lost connection raises :class:`HboneError`.
    """

    def __init__(self, conn: _Connection, stream_id: int, *, expect_response: bool = False) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.status: int = 0
        self.response_headers: dict[str, str] = {}
        self.request_headers: dict[str, str] = {}
        self._chunks: collections.deque[bytes] = collections.deque()
        self._offset = 0  # bytes already consumed from _chunks[0]
        self._eof = False  # END_STREAM received
        self._sent_eof = False  # END_STREAM sent
        self._error: HboneError | None = None
        self._readable = asyncio.Event()
        self._window = asyncio.Event()
        self._response: asyncio.Future[None] | None = (
            asyncio.get_running_loop().create_future() if expect_response else None
        )

    def __repr__(self) -> str:
        return f"<HboneStream {self.stream_id} status={self.status}>"

    # -- public API

    async def read(self, n: int = 65536) -> bytes:
        """Up to ``n`` bytes; ``b""`` at END_STREAM. Consumed bytes reopen the peer's window."""
        if n <= 0:
            return b""
        while not self._chunks:
            if self._eof:
                return b""
            if self._error is not None:
                raise self._error
            self._readable.clear()
            await self._readable.wait()
        head = self._chunks[0]
        start = self._offset
        available = len(head) - start
        if available <= n:
            self._chunks.popleft()
            self._offset = 0
            data = head if start == 0 else head[start:]
        else:
            data = head[start : start + n]
            self._offset = start + n
        self._conn.ack(self.stream_id, len(data))
        return data

    async def write(self, data: bytes) -> None:
        """Send ``data``, in frames no larger than the peer allows, waiting for window as needed."""
        view = memoryview(data)
        total = len(view)
        offset = 0
        h2conn = self._conn.h2
        while offset < total:
            self._check_writable()
            with _h2_errors(f"stream {self.stream_id}"):
                window = h2conn.local_flow_control_window(self.stream_id)
            if window <= 0:
                self._window.clear()
                await self._window.wait()
                continue
            size = min(total - offset, window, h2conn.max_outbound_frame_size)
            chunk = data if size == total else view[offset : offset + size]
            with _h2_errors(f"stream {self.stream_id}"):
                h2conn.send_data(self.stream_id, chunk)
            offset += size
            self._conn.flush()
            await self._conn.drain()

    async def write_eof(self) -> None:
        """Half-close: send END_STREAM; reading goes on until the peer half-closes too."""
        self._check_writable()
        with _h2_errors(f"stream {self.stream_id}"):
            self._conn.h2.end_stream(self.stream_id)
        self._sent_eof = True
        self._conn.flush()
        if self._eof:
            self._conn.forget(self)
        await self._conn.drain()

    def reset(self, error_code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """Abort the stream with RST_STREAM (CANCEL by default); pending reads and writes fail."""
        if self._error is None and not (self._eof and self._sent_eof) and not self._conn.closed:
            with contextlib.suppress(h2.exceptions.H2Error):
                self._conn.h2.reset_stream(self.stream_id, error_code)
            self._conn.flush()
        self._fail(HboneError(f"stream {self.stream_id} reset locally"))

    # -- connection callbacks

    def _check_writable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._sent_eof:
            raise HboneError(f"stream {self.stream_id}: write after write_eof()")

    def _feed(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self._readable.set()

    def _on_end(self) -> None:
        self._eof = True
        self._readable.set()
        if self._response is not None and not self._response.done():
            self._response.set_exception(
                HboneError(f"stream {self.stream_id} ended without response")
            )
        if self._sent_eof:
            self._conn.forget(self)

    def _on_response(self, headers: dict[str, str]) -> None:
        self.response_headers = headers
        try:
            self.status = int(headers.get(":status", "0"))
        except ValueError:
            self.status = 0
        if self._response is not None and not self._response.done():
            self._response.set_result(None)

    def _fail(self, error: HboneError) -> None:
        if self._error is None:
            self._error = error
        if not self._eof:  # an incomplete inbound byte stream is worthless: return its window
            unread = sum(len(c) for c in self._chunks) - self._offset
            self._chunks.clear()
            self._offset = 0
            self._conn.ack(self.stream_id, unread)
        self._readable.set()
        self._window.set()
        if self._response is not None and not self._response.done():
            self._response.set_exception(error)
        self._conn.forget(self)

    def _respond(self, status: int) -> None:
        """Server side: send the response headers; anything but 200 also ends the stream."""
        if self._error is not None:
            return
        end = status != 200
        with _h2_errors(f"stream {self.stream_id}"):
            self._conn.h2.send_headers(self.stream_id, [(":status", str(status))], end_stream=end)
        self._conn.flush()
        if end:
            self._sent_eof = True
            self._conn.forget(self)  # data the client may still send is acked and dropped


async def _splice(
    stream: HboneStream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Relay bytes both ways between a stream and a TCP socket, forwarding half-closes.

    If either direction fails (reset, lost connection, socket error), the stream is reset and the
    socket aborted; if both end cleanly, the socket is closed.
    """

    async def stream_to_socket() -> None:
        while True:
            data = await stream.read(READ_SIZE)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    async def socket_to_stream() -> None:
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                await stream.write_eof()
                return
            await stream.write(data)

    tasks = [asyncio.create_task(stream_to_socket()), asyncio.create_task(socket_to_stream())]
    clean = False
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        errors = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
        for error in errors:
            log.debug("stream %d relay ended: %r", stream.stream_id, error)
        clean = not errors
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if clean:
            writer.close()
        else:
            stream.reset()
            writer.transport.abort()


# ----------------------------------------------------------------------------------------------
# Server
