"""Workers: one thread each (a one-thread ``ThreadPool``) for blocking
store writes, and their shutdown."""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


def worker_thread(name: str) -> ThreadPool:
    """A pool of one thread, so writes to one store stay in order.

    It is started by its first :func:`run_in`, not here: twistd builds the
    service tree before it forks into a daemon, and threads do not survive
    a fork.
    """
    return ThreadPool(minthreads=1, maxthreads=1, name=name)


def run_in(reactor, worker: ThreadPool, fn: Callable, *args) -> defer.Deferred:
    """``deferToThreadPool``, starting the worker on first use."""
    if not worker.started:
        worker.start()
    return deferToThreadPool(reactor, worker, fn, *args)


def stop_when_idle(reactor, busy: Callable[[], bool], worker: ThreadPool) -> defer.Deferred:
    """Wait until ``busy()`` is false (writes under way have finished),
    then stop ``worker``; fires once it is stopped."""
    done: defer.Deferred = defer.Deferred()

    def check() -> None:
        if busy():
            reactor.callLater(0.01, check)
        else:
            if worker.started:
                worker.stop()
            done.callback(None)

    check()
    return done
