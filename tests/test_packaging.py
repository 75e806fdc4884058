"""What a host gets: the systemd unit, and what ``pip install`` installs.

* ``etc/mixminiond.service`` holds the hardening the issue asks for and
  passes ``systemd-analyze verify`` once its ``ExecStart`` names this
  environment's twistd; the same check fails when the binary is missing,
  so it can fail.  Without ``systemd-analyze`` (Debian package
  ``systemd``, which ``.ci/run`` installs) those tests are skipped.
* ``python3 -m venv`` and ``pip install`` of a copy of this checkout (its
  dependencies from pip's configured indexes), as an operator installs
  it: the man pages under the venv's ``share/man/manN`` (each rendered by
  ``man -l``: skipped without ``man``, package ``man-db``), the example
  configurations under ``share/mixminion``, the LICENSE, the twistd
  plugins and the commands.  Slow: the install takes 20 to 60 s (once for
  the run).
"""

from __future__ import annotations

#: about how many seconds it takes: scripts/test.sh starts the longest first
SLOW = 17

import atexit
import filecmp
import functools
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from twisted.trial import unittest

from mixminion.testing.daemon import twistd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(REPO, "etc", "mixminiond.service")

#: the examples installed under share/mixminion
EXAMPLES = ["tap-example.conf", "etc/mixminiond.conf", "etc/mbox-addresses.example",
            "etc/mixminiond.service", "etc/authority.conf"]


def directives(text: str) -> dict[str, list[str]]:
    """A unit file's ``Key=value`` lines (every section), values by key."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def run(argv: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """``argv`` to its end; stdout and stderr together in ``.stdout``."""
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, **kwargs)


class SystemdUnitTests(unittest.TestCase):
    def test_hardening(self) -> None:
        """Its own user, read-only system but BaseDir, no privileges,
        restarted on failure, SIGHUP on reload, twistd in the foreground."""
        with open(UNIT) as f:
            found = directives(f.read())
        for key, value in [("User", "mixminion"), ("Group", "mixminion"),
                           ("ProtectSystem", "strict"), ("ReadWritePaths", "/var/lib/mixminion"),
                           ("NoNewPrivileges", "yes"), ("PrivateTmp", "yes"),
                           ("ProtectHome", "yes"), ("Restart", "on-failure"),
                           ("ExecReload", "/bin/kill -HUP $MAINPID")]:
            self.assertEqual(found.get(key), [value], key)
        [start] = found["ExecStart"]
        self.assertEqual(start.split()[1:], ["--nodaemon", "--pidfile=", "mixminion", "-c",
                                             "/etc/mixminion/mixminiond.conf"])
        self.assertEqual(os.path.basename(start.split()[0]), "twistd")

    def verify(self, program: str) -> subprocess.CompletedProcess:
        """``systemd-analyze verify`` of a copy of the unit whose ExecStart
        runs ``program`` (the man pages named in Documentation= are not
        looked for: they are not installed on this machine)."""
        if shutil.which("systemd-analyze") is None:
            raise unittest.SkipTest("systemd-analyze is not installed (apt-get install systemd; "
                                    ".ci/run does)")
        with open(UNIT) as f:
            text, count = re.subn(r"^ExecStart=\S+", f"ExecStart={program}", f.read(), flags=re.M)
        self.assertEqual(count, 1)
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        copy = os.path.join(folder, "mixminiond.service")
        with open(copy, "w") as f:
            f.write(text)
        return run(["systemd-analyze", "verify", "--man=no", copy])

    def test_verify_accepts_it(self) -> None:
        """No error, and no warning about this unit (an unknown or
        misspelt directive is only a warning)."""
        command = twistd()
        program = command[0] if len(command) == 1 else shutil.which("twistd")
        if program is None:
            raise unittest.SkipTest("no twistd program in this environment")
        done = self.verify(program)
        self.assertEqual(done.returncode, 0, done.stdout)
        about_it = [line for line in done.stdout.splitlines() if "mixminiond.service" in line]
        self.assertEqual(about_it, [], done.stdout)

    def test_verify_refuses_a_missing_program(self) -> None:
        missing = os.path.join(os.path.abspath(self.mktemp()), "bin", "twistd")
        done = self.verify(missing)
        self.assertNotEqual(done.returncode, 0, done.stdout)
        self.assertIn(missing, done.stdout)


def copy_checkout(destination: str) -> None:
    """This checkout's files (tracked, and new ones not ignored), without
    its build products and test folders."""
    if os.path.isdir(os.path.join(REPO, ".git")) and shutil.which("git"):
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], cwd=REPO, check=True,
                                capture_output=True).stdout.decode().split("\0")
        for name in filter(None, listed):
            source = os.path.join(REPO, name)
            if os.path.isfile(source):  # (not a file deleted but still tracked)
                os.makedirs(os.path.dirname(os.path.join(destination, name)), exist_ok=True)
                shutil.copy2(source, os.path.join(destination, name))
    else:
        shutil.copytree(REPO, destination, ignore=shutil.ignore_patterns(
            ".git", "_trial_temp*", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
            "tap-base"))


@functools.cache
def venv_install() -> tuple[str, str]:
    """A venv (in the trial folder, removed when trial ends) with a copy of
    this checkout installed by pip, made once for the run (trial has no
    setUpClass); and what went wrong ("" if nothing)."""
    top = tempfile.mkdtemp(prefix="packaging-", dir=os.getcwd())
    atexit.register(shutil.rmtree, top, True)  # a venv is large; trial keeps its folder
    source, venv = os.path.join(top, "src"), os.path.join(top, "v")
    copy_checkout(source)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    for argv in ([sys.executable, "-m", "venv", venv],
                 [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--quiet", source]):
        try:
            done = run(argv, timeout=300, env=env, cwd=top)
        except subprocess.TimeoutExpired as exc:
            return venv, f"{' '.join(argv)}: no end after {exc.timeout:.0f} s"
        if done.returncode != 0:
            return venv, f"{' '.join(argv)}: exit status {done.returncode}\n{done.stdout}"
    return venv, ""


class VenvInstallTests(unittest.TestCase):
    """What ``pip install`` of this checkout puts into a new venv."""

    #: the first test also waits for the install
    timeout = 400

    def setUp(self) -> None:
        self.venv, problem = venv_install()
        if problem:
            self.fail(problem)

    def share(self, *parts: str) -> str:
        return os.path.join(self.venv, "share", *parts)

    def pages(self) -> list[tuple[str, str]]:
        """(page in the checkout, where the venv should have it)."""
        found = []
        for page in sorted(glob.glob(os.path.join(REPO, "doc", "*.[158]"))):
            section = page.rsplit(".", 1)[1]
            found.append((page, self.share("man", f"man{section}", os.path.basename(page))))
        self.assertEqual({p.rsplit(".", 1)[1] for p, _ in found}, {"1", "5", "8"})
        return found

    def test_man_pages(self) -> None:
        for page, installed in self.pages():
            self.assertTrue(filecmp.cmp(page, installed, shallow=False), installed)

    def test_man_renders_each_page(self) -> None:
        if shutil.which("man") is None:
            raise unittest.SkipTest("man is not installed (apt-get install man-db; .ci/run does)")
        env = {**os.environ, "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "80"}
        for _page, installed in self.pages():
            done = subprocess.run(["man", "-l", installed], stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, env=env, timeout=60)
            self.assertEqual(done.returncode, 0, f"{installed}: {done.stderr}")
            self.assertEqual(done.stderr, "", installed)
            name = os.path.basename(installed).rsplit(".", 1)[0]
            self.assertRegex(done.stdout, rf"(?s)^.*\bNAME\b.*\b{re.escape(name)}\b", installed)

    def test_example_configurations(self) -> None:
        for name in EXAMPLES:
            installed = self.share("mixminion", name)
            self.assertTrue(os.path.isfile(installed), installed)
            self.assertTrue(filecmp.cmp(os.path.join(REPO, name), installed, shallow=False), name)

    def test_license(self) -> None:
        site = glob.glob(os.path.join(self.venv, "lib", "python3*", "site-packages"))
        licenses = glob.glob(os.path.join(site[0], "mixminion-*.dist-info", "**", "LICENSE"),
                             recursive=True)
        self.assertEqual(len(licenses), 1, os.listdir(site[0]))
        self.assertTrue(filecmp.cmp(os.path.join(REPO, "LICENSE"), licenses[0], shallow=False))

    def test_commands_and_plugins(self) -> None:
        """The dependencies, the commands, and the twistd plugins."""
        python = os.path.join(self.venv, "bin", "python")
        done = run([python, "-c", "import mixminion.server.tap, prometheus_client, zfec"])
        self.assertEqual(done.returncode, 0, done.stdout)
        done = run([os.path.join(self.venv, "bin", "mixminiond"), "--help"])
        self.assertEqual(done.returncode, 0, done.stdout)
        done = run([os.path.join(self.venv, "bin", "twistd"), "--help"],
                   cwd=os.path.dirname(self.venv))
        self.assertEqual(done.returncode, 0, done.stdout)
        for plugin in ("mixminion", "mixminion-directory"):
            self.assertRegex(done.stdout, rf"(?m)^\s+{re.escape(plugin)}\s", done.stdout)
