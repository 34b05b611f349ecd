"""Background threads whose unexpected end is logged rather than lost."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def start_guarded(run: Callable[[], None], name: str) -> threading.Thread:
    """Run ``run`` in a daemon thread; an exception escaping it is logged with the thread's
    name (a forever-loop that dies silently is an outage nobody sees)."""

    def guarded() -> None:
        try:
            run()
        except BaseException:
            log.exception("%s stopped unexpectedly", name)
            raise

    thread = threading.Thread(target=guarded, name=name, daemon=True)
    thread.start()
    return thread
