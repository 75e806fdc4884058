"""One-thread worker pools for blocking store writes, and their shutdown."""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.python.threadpool import ThreadPool


def worker_pool(name: str) -> ThreadPool:
    """A started pool of one thread: writes to one store stay in order."""
    pool = ThreadPool(minthreads=1, maxthreads=1, name=name)
    pool.start()
    return pool


def stop_when_idle(reactor, busy: Callable[[], bool], pool: ThreadPool) -> defer.Deferred:
    """Wait until ``busy()`` is false (writes under way have finished),
    then stop ``pool``; fires once it is stopped."""
    done: defer.Deferred = defer.Deferred()

    def check() -> None:
        if busy():
            reactor.callLater(0.01, check)
        else:
            pool.stop()
            done.callback(None)

    check()
    return done
