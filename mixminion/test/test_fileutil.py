"""Zeroing ranges and synchronous writes of segment files."""

from __future__ import annotations

import errno
import os

from twisted.trial import unittest

from mixminion import fileutil


class _OpenFile(unittest.TestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, self.fd)


class WriteZerosTests(_OpenFile):

    def test_overwrites_exactly_the_range(self) -> None:
        size = 3 * (1 << 20) + 12345  # more than the shared buffer, not a multiple
        os.pwrite(self.fd, b"\xff" * (size + 200), 0)
        fileutil.write_zeros(self.fd, 100, size)
        data = os.pread(self.fd, size + 200, 0)
        self.assertEqual(data[:100], b"\xff" * 100)
        self.assertEqual(data[100:100 + size].count(0), size)
        self.assertEqual(data[100 + size:], b"\xff" * 100)

    def test_small_and_empty_ranges(self) -> None:
        os.pwrite(self.fd, b"abcdefgh", 0)
        fileutil.write_zeros(self.fd, 2, 3)
        fileutil.write_zeros(self.fd, 7, 0)
        self.assertEqual(os.pread(self.fd, 8, 0), b"ab\0\0\0fgh")

    def test_extends_the_file_like_pwrite(self) -> None:
        fileutil.write_zeros(self.fd, 10, 5)
        self.assertEqual(os.fstat(self.fd).st_size, 15)


class WriteDurablyTests(_OpenFile):

    def test_writes_the_buffers_in_order(self) -> None:
        written = fileutil.write_durably(self.fd, [b"head", b"-", b"tail"], 3)
        self.assertEqual(written, 9)
        self.assertEqual(os.pread(self.fd, 12, 0), b"\0\0\0head-tail")

    def test_falls_back_to_fdatasync_where_the_flag_is_refused(self) -> None:
        calls = []
        real_pwritev, real_fdatasync = os.pwritev, os.fdatasync

        def pwritev(fd, buffers, offset, *flags):
            calls.append(("pwritev", flags))
            if flags:
                raise OSError(errno.EOPNOTSUPP, "no RWF_DSYNC here")
            return real_pwritev(fd, buffers, offset)

        def fdatasync(fd):
            calls.append(("fdatasync", ()))
            real_fdatasync(fd)

        self.patch(os, "pwritev", pwritev)
        self.patch(os, "fdatasync", fdatasync)
        self.patch(fileutil, "_DSYNC", 16)
        self.assertEqual(fileutil.write_durably(self.fd, [b"abc"], 0), 3)
        self.assertEqual(calls, [("pwritev", (16,)), ("pwritev", ()), ("fdatasync", ())])
        self.assertEqual(os.pread(self.fd, 3, 0), b"abc")

    def test_other_errors_are_raised(self) -> None:
        def pwritev(fd, buffers, offset, *flags):
            raise OSError(errno.ENOSPC, "disk full")

        self.patch(os, "pwritev", pwritev)
        self.patch(fileutil, "_DSYNC", 16)
        error = self.assertRaises(OSError, fileutil.write_durably, self.fd, [b"abc"], 0)
        self.assertEqual(error.errno, errno.ENOSPC)
