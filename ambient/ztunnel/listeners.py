"""The listeners ztunnel runs for one pod, kept in step with the config.

Each listener is known by a key that names everything it depends on (its port's role, its
address, the pod's namespace, the identity it serves as). A new snapshot is applied by comparing
keys: a listener whose key is unchanged is left alone — its live connections with it — even when
other things about the pod change (a Service port added elsewhere, a label); only listeners whose
key went are closed, and new keys opened. Decisions never need a listener re-created: they read
the current snapshot per connection.

A listener that cannot be opened (its address not on this host yet, a port taken) is recorded
with the error, reported by readiness, and retried with backoff by the proxy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from ..hbone import Listener, Netns
from ..mesh import Workload

log = logging.getLogger(__name__)

# (role, address, namespace inode, identity): what a listener depends on.
ListenerKey = tuple[str, str, int | None, str | None]
Opener = Callable[[], Listener]


@dataclass
class PodListeners:
    """The listeners of one pod, by key, and the ones that failed to open."""

    workload: Workload
    netns: Netns | None = None
    listeners: dict[ListenerKey, Listener] = field(default_factory=dict)
    # Listeners that could not be opened: key -> (opener, the error).
    failed: dict[ListenerKey, tuple[Opener, str]] = field(default_factory=dict)

    @property
    def errors(self) -> list[str]:
        return [error for _, error in self.failed.values()]

    def sync(self, wanted: dict[ListenerKey, Opener], reason: str) -> None:
        """Close the listeners not ``wanted`` (their connections cut with ``reason``), open the
        wanted ones not open yet."""
        for key in [k for k in self.listeners if k not in wanted]:
            self.listeners.pop(key).close(0.0, reason)
        for key in [k for k in self.failed if k not in wanted]:
            del self.failed[key]
        for key, opener in wanted.items():
            if key not in self.listeners:
                self._open(key, opener)

    def retry(self) -> None:
        """Try the failed listeners again."""
        for key, (opener, _) in list(self.failed.items()):
            self._open(key, opener)

    def _open(self, key: ListenerKey, opener: Opener) -> None:
        try:
            self.listeners[key] = opener()
        except (OSError, ValueError, RuntimeError) as e:
            # One pod's unusable address must not stop the others being served.
            self.failed[key] = (opener, str(e))
            log.error("pod %s: %s", self.workload.key, e)
        else:
            if self.failed.pop(key, None) is not None:
                log.info("pod %s: %s %s open after a retry", self.workload.key, key[0], key[1])

    def close(self, reason: str) -> None:
        """Close every listener; their live connections are cut, each reported with ``reason``."""
        for listener in self.listeners.values():
            listener.close(0.0, reason)
        self.listeners.clear()
        self.failed.clear()
