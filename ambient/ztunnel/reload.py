"""Config reload: on SIGHUP and when a mesh file changes. A valid new config becomes the snapshot
for new connections; an invalid one is refused with every error, and the old one stays. Whatever
goes wrong while applying a snapshot (a bug, a resource the platform refuses) is logged and
counted, the previous snapshot is put back, and the watcher keeps watching."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config import ConfigError, MeshCache, load_mesh
from ..identity.spiffe import DEFAULT_TRUST_DOMAIN
from ..mesh import Mesh

log = logging.getLogger(__name__)


class ConfigWatcher:
    """Polls the files' modification times (portable, no inotify needed) every ``interval``
    seconds; :meth:`reload` forces a reload (SIGHUP)."""

    def __init__(
        self,
        paths: Sequence[Path],
        apply: Callable[[Mesh], None],
        *,
        interval: float = 1.0,
        on_error: Callable[[ConfigError], None] | None = None,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        current: Mesh | None = None,
        cache: MeshCache | None = None,
    ) -> None:
        self.paths = list(paths)
        # What the last load read and made: a reload parses and translates only what changed.
        self.cache = cache if cache is not None else MeshCache()
        self.trust_domain = trust_domain
        self._apply = apply
        self._on_error = on_error
        self._interval = interval
        self._stamps = self._read_stamps()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.reloads = 0
        self.refusals = 0
        self.last_error: str | None = None
        # The snapshot applied last, put back if applying a new one fails half-way.
        self.current = current
        self._thread = threading.Thread(target=self._poll, name="config-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _read_stamps(self) -> list[tuple[int, int] | None]:
        stamps: list[tuple[int, int] | None] = []
        for path in self.paths:
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime_ns, st.st_size))
            except OSError:
                stamps.append(None)
        return stamps

    def reload(self) -> bool:
        """Load the files now; apply them if valid. True when applied."""
        with self._lock:
            self._stamps = self._read_stamps()
            try:
                mesh = load_mesh(self.paths, trust_domain=self.trust_domain, cache=self.cache)
            except ConfigError as e:
                self.refusals += 1
                self.last_error = str(e)
                log.error("new configuration refused; keeping the current one:\n%s", e)
                if self._on_error is not None:
                    self._on_error(e)
                return False
            try:
                self._apply(mesh)
            except Exception as e:
                self.refusals += 1
                self.last_error = f"applying the new configuration failed: {type(e).__name__}: {e}"
                log.exception("applying the new configuration failed; keeping the current one")
                self._restore()
                return False
            self.current = mesh
            self.reloads += 1
            self.last_error = None
            log.info("configuration reloaded from %s", ", ".join(map(str, self.paths)))
            return True

    def _restore(self) -> None:
        if self.current is None:
            return
        try:
            self._apply(self.current)
        except Exception:
            log.exception("putting the previous configuration back failed too")

    def _poll(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._poll_once()
            except Exception:  # the watcher must outlive any bug in one round
                log.exception("config watcher: checking the files failed; still watching")

    def _poll_once(self) -> None:
        seen = self._read_stamps()
        if seen == self._stamps:
            return
        # A file being written is read only once it has stopped changing for one interval, so a
        # half-written file is never taken for the new config.
        while not self._stop.wait(self._interval):
            again = self._read_stamps()
            if again == seen:
                break
            seen = again
        else:
            return
        self.reload()

    def status(self) -> dict[str, object]:
        return {
            "files": [str(p) for p in self.paths],
            "reloads": self.reloads,
            "refusals": self.refusals,
            "lastError": self.last_error,
        }

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
