"""FileParanoia and TrustedUser (server.md §14.3), on real folders.

Each test builds the node's layout in a fresh temporary folder, breaks one
thing with chmod, chown or a link, and checks the exact lines reported;
where the fix is a plain command, it runs it and checks the problem is gone.
Ownership tests give files to another uid, which only root can do.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from typing import Any

from twisted.trial import unittest

from mixminion.server.config import parse_config
from mixminion.server.paranoia import ENV_DISABLE, Problem, check_permissions, problems_for

#: a uid that is not ours: nobody on most systems
OTHER_UID = 65534


def user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} ({uid})"
    except KeyError:
        return f"uid {uid}"


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def needs_root(test: Any) -> Any:
    if os.geteuid() != 0:
        test.skip = "giving files to another user needs root"
    return test


class LayoutTestCase(unittest.TestCase):
    """A clean node layout under ``self.top``, which is 0755 and ours.

    ``top/base`` is BaseDir, with keys/, work/, work/queues/,
    work/hashlogs/, log, stats and pid in their default places.
    """

    def setUp(self) -> None:
        self.top = os.path.abspath(self.mktemp())
        self.mkdir(self.top, 0o755)
        above = check_permissions(key_dir=None, stores=[self.top], environ={})
        if above:
            raise unittest.SkipTest("the folders above the test folder are unsafe themselves: "
                                    + "; ".join(map(str, above)))
        self.base = self.mkdir(os.path.join(self.top, "base"))
        self.keys = self.mkdir(os.path.join(self.base, "keys"))
        self.identity = self.write(os.path.join(self.keys, "identity.key"), 0o600)
        self.keyset = self.mkdir(os.path.join(self.keys, "key_0001"))
        self.mix_key = self.write(os.path.join(self.keyset, "mix.key"), 0o600)
        self.write(os.path.join(self.keyset, "ServerDesc"), 0o644)
        self.write(os.path.join(self.keyset, "published"), 0o600)
        self.work = self.mkdir(os.path.join(self.base, "work"))
        self.queues = self.mkdir(os.path.join(self.work, "queues"))
        self.hashlogs = self.mkdir(os.path.join(self.work, "hashlogs"))
        self.log = self.write(os.path.join(self.base, "log"), 0o644)
        self.stats = self.write(os.path.join(self.base, "stats"), 0o644)
        self.pid = self.write(os.path.join(self.base, "pid"), 0o644)
        self.uid = os.geteuid()

    def mkdir(self, path: str, mode: int = 0o700) -> str:
        os.makedirs(path)
        os.chmod(path, mode)  # whatever the umask
        return path

    def write(self, path: str, mode: int) -> str:
        with open(path, "wb") as f:
            f.write(b"-----BEGIN RSA PRIVATE KEY-----\n")
        os.chmod(path, mode)
        return path

    def check(self, **changes: Any) -> list[Problem]:
        """The problems of the layout; ``environ`` is empty so the runner's
        own MM_NO_FILE_PARANOIA cannot hide them."""
        options: dict[str, Any] = dict(
            key_dir=self.keys,
            stores=[self.base, self.work, self.queues, self.hashlogs],
            files=[self.log, self.stats, self.pid],
            environ={},
        )
        options.update(changes)
        return check_permissions(**options)

    def lines(self, **changes: Any) -> list[str]:
        return [str(p) for p in self.check(**changes)]

    def fix(self, problem: Problem) -> None:
        subprocess.run(["sh", "-c", problem.fix], check=True)


class CleanLayoutTests(LayoutTestCase):

    def test_clean_layout_passes(self) -> None:
        self.assertEqual(self.lines(), [])

    def test_published_descriptor_is_not_a_private_key(self) -> None:
        # ServerDesc is public (0644 in the layout) but still only ours to write
        descriptor = os.path.join(self.keyset, "ServerDesc")
        self.assertEqual(self.lines(), [])
        os.chmod(descriptor, 0o664)
        self.assertEqual(self.lines(), [
            f"{descriptor} is mode 0664; files the node writes must not be writable by group or "
            f"others: chmod go-w {descriptor}"])

    def test_missing_paths_are_not_problems(self) -> None:
        missing = os.path.join(self.top, "not-yet")
        problems = self.check(key_dir=os.path.join(missing, "keys"),
                              stores=[missing, os.path.join(missing, "work")],
                              files=[os.path.join(missing, "log", "log")])
        self.assertEqual(problems, [])

    def test_problem_line_format(self) -> None:
        problem = Problem("/srv/mix/keys/identity.key", "is mode 0644; private keys must be 0600",
                          "chmod 600 /srv/mix/keys/identity.key")
        self.assertEqual(str(problem), "/srv/mix/keys/identity.key is mode 0644; private keys "
                         "must be 0600: chmod 600 /srv/mix/keys/identity.key")


class PrivateKeyTests(LayoutTestCase):

    def test_identity_key_0644(self) -> None:
        os.chmod(self.identity, 0o644)
        problems = self.check()
        self.assertEqual([str(p) for p in problems], [
            f"{self.identity} is mode 0644; private keys must be 0600: chmod 600 {self.identity}"])
        self.fix(problems[0])
        self.assertEqual(self.lines(), [])

    def test_packet_key_modes_other_than_0600(self) -> None:
        for mode in (0o640, 0o604, 0o700, 0o400, 0o4600):
            os.chmod(self.mix_key, mode)
            self.assertEqual(self.lines(), [
                f"{self.mix_key} is mode {mode:04o}; private keys must be 0600: "
                f"chmod 600 {self.mix_key}"], f"mode {mode:o}")

    def test_unknown_file_in_key_dir_is_private(self) -> None:
        backup = self.write(os.path.join(self.keys, "identity.key.bak"), 0o644)
        self.assertEqual(self.lines(), [
            f"{backup} is mode 0644; private keys must be 0600: chmod 600 {backup}"])

    def test_keys_dir_0777(self) -> None:
        os.chmod(self.keys, 0o777)
        problems = self.check()
        self.assertEqual([str(p) for p in problems], [
            f"{self.keys} is mode 0777; folders holding private keys must be 0700: "
            f"chmod 700 {self.keys}"])
        self.fix(problems[0])
        self.assertEqual(self.lines(), [])

    def test_keyset_folder_readable_by_others(self) -> None:
        os.chmod(self.keyset, 0o755)
        self.assertEqual(self.lines(), [
            f"{self.keyset} is mode 0755; folders holding private keys must be 0700: "
            f"chmod 700 {self.keyset}"])

    def test_symlinked_key(self) -> None:
        elsewhere = self.mkdir(os.path.join(self.top, "elsewhere"))
        real = os.path.join(elsewhere, "identity.key")
        os.rename(self.identity, real)
        os.symlink(real, self.identity)
        problems = self.check()
        self.assertEqual([str(p) for p in problems], [
            f"{self.identity} is a symbolic link to {real}; KeyDir must hold the keys themselves, "
            f"not links: rm {self.identity} && mv {real} {self.identity}"])
        self.fix(problems[0])
        self.assertFalse(os.path.islink(self.identity))
        self.assertEqual(self.lines(), [])

    def test_relative_symlink_to_a_keyset_folder(self) -> None:
        real = os.path.join(self.keys, "..", "key_0001")
        os.rename(self.keyset, real)
        os.symlink("../key_0001", self.keyset)
        problems = self.check()
        self.assertEqual([str(p) for p in problems], [
            f"{self.keyset} is a symbolic link to ../key_0001; KeyDir must hold the keys themselves, "
            f"not links: rm {self.keyset} && mv {os.path.normpath(real)} {self.keyset}"])
        self.fix(problems[0])
        self.assertEqual(self.lines(), [])

    def test_key_dir_not_a_folder(self) -> None:
        other = os.path.join(self.top, "keyfile")
        self.write(other, 0o600)
        self.assertEqual(self.lines(key_dir=other), [
            f"{other} is not a folder: move it away: mv {other} {other}.old"])

    @needs_root
    def test_identity_key_owned_by_someone_else(self) -> None:
        os.chown(self.identity, OTHER_UID, -1)
        problems = self.check()
        self.assertEqual([str(p) for p in problems], [
            f"{self.identity} is owned by {user(OTHER_UID)}; private keys must be owned by the "
            f"node's user, {user(self.uid)}: chown {user_name(self.uid)} {self.identity}"])
        # TrustedUser is for parent folders only
        self.assertEqual(self.check(trusted_uids=[OTHER_UID]), problems)
        self.fix(problems[0])
        self.assertEqual(self.lines(), [])

    @needs_root
    def test_checks_against_the_given_uid(self) -> None:
        # the node's files belong to root here; as seen by another user every
        # one of BaseDir, WorkDir... (and their files) is someone else's
        problems = self.check(uid=OTHER_UID)
        owned = [p.path for p in problems if p.problem.startswith("is owned by root (0);")]
        self.assertIn(self.identity, owned)
        self.assertIn(self.keys, owned)
        self.assertIn(self.queues, owned)
        self.assertNotIn(self.top, owned)  # root may own the folders above


class StoreTests(LayoutTestCase):

    def test_group_writable_queue_dir(self) -> None:
        os.chmod(self.queues, 0o770)
        problems = self.check()
        self.assertEqual([str(p) for p in problems], [
            f"{self.queues} is mode 0770; the node's folders must not be writable by group or "
            f"others: chmod go-w {self.queues}"])
        self.fix(problems[0])
        self.assertEqual(self.lines(), [])

    def test_readable_store_is_fine(self) -> None:
        os.chmod(self.work, 0o755)
        self.assertEqual(self.lines(), [])

    def test_sticky_does_not_excuse_a_store(self) -> None:
        os.chmod(self.work, 0o1777)
        self.assertEqual(self.lines(), [
            f"{self.work} is mode 1777; the node's folders must not be writable by group or "
            f"others: chmod go-w {self.work}"])

    def test_world_writable_log_file(self) -> None:
        os.chmod(self.log, 0o666)
        self.assertEqual(self.lines(), [
            f"{self.log} is mode 0666; files the node writes must not be writable by group or "
            f"others: chmod go-w {self.log}"])

    def test_log_folder_outside_base_sticky_is_not_enough(self) -> None:
        logs = self.mkdir(os.path.join(self.top, "logs"), 0o1777)
        log = os.path.join(logs, "mixminion.log")
        self.assertEqual(self.lines(files=[log]), [
            f"{logs} is mode 1777; folders of LogFile, StatsFile and PidFile must not be "
            f"writable by group or others: chmod go-w {logs}, or move the files to a folder "
            "of their own"])

    @needs_root
    def test_log_folder_may_belong_to_a_trusted_user(self) -> None:
        logs = self.mkdir(os.path.join(self.top, "logs"), 0o755)
        os.chown(logs, OTHER_UID, -1)
        log = os.path.join(logs, "mixminion.log")
        self.assertEqual(self.lines(files=[log]), [
            f"{logs} is owned by {user(OTHER_UID)}; folders of LogFile, StatsFile and PidFile "
            f"must be owned by root or a TrustedUser: chown root {logs}, or name "
            f"{user_name(OTHER_UID)} in [Host] TrustedUser"])
        self.assertEqual(self.lines(files=[log], trusted_uids=[OTHER_UID]), [])

    @needs_root
    def test_work_dir_owned_by_someone_else(self) -> None:
        os.chown(self.work, OTHER_UID, -1)
        expected = [f"{self.work} is owned by {user(OTHER_UID)}; the node's folders must be owned "
                    f"by the node's user, {user(self.uid)}: chown {user_name(self.uid)} {self.work}"]
        self.assertEqual(self.lines(), expected)
        self.assertEqual(self.lines(trusted_uids=[OTHER_UID]), expected)


class AncestorTests(LayoutTestCase):
    """Folders above BaseDir: ``top/outer`` holds a second BaseDir."""

    def setUp(self) -> None:
        super().setUp()
        self.outer = self.mkdir(os.path.join(self.top, "outer"), 0o755)
        self.inner = self.mkdir(os.path.join(self.outer, "base"))

    def check_inner(self, **changes: Any) -> list[str]:
        return self.lines(key_dir=os.path.join(self.inner, "keys"), stores=[self.inner],
                          files=[], **changes)

    def test_world_writable_ancestor(self) -> None:
        os.chmod(self.outer, 0o777)
        problems = self.check(key_dir=os.path.join(self.inner, "keys"), stores=[self.inner], files=[])
        self.assertEqual([str(p) for p in problems], [
            f"{self.outer} is mode 0777; folders above the node's files must not be writable by "
            f"group or others unless sticky: chmod go-w {self.outer}"])
        self.fix(problems[0])
        self.assertEqual(self.check_inner(), [])

    def test_group_writable_ancestor(self) -> None:
        os.chmod(self.outer, 0o775)
        self.assertEqual(self.check_inner(), [
            f"{self.outer} is mode 0775; folders above the node's files must not be writable by "
            f"group or others unless sticky: chmod go-w {self.outer}"])

    def test_sticky_world_writable_ancestor_is_accepted(self) -> None:
        # like /tmp: only an entry's owner may rename it, and inner is ours
        os.chmod(self.outer, 0o1777)
        self.assertEqual(self.check_inner(), [])

    def test_ancestor_of_a_missing_base_dir_is_still_checked(self) -> None:
        os.chmod(self.outer, 0o777)
        missing = os.path.join(self.outer, "new", "base")
        self.assertEqual(self.lines(key_dir=os.path.join(missing, "keys"), stores=[missing], files=[]), [
            f"{self.outer} is mode 0777; folders above the node's files must not be writable by "
            f"group or others unless sticky: chmod go-w {self.outer}"])

    def test_folders_above_a_linked_base_dir_are_checked(self) -> None:
        # BaseDir is reached through a link: the folders above its target count
        link = os.path.join(self.top, "link")
        os.symlink(self.inner, link)
        os.chmod(self.outer, 0o777)
        self.assertEqual(self.lines(key_dir=os.path.join(link, "keys"), stores=[link], files=[]), [
            f"{self.outer} is mode 0777; folders above the node's files must not be writable by "
            f"group or others unless sticky: chmod go-w {self.outer}"])

    @needs_root
    def test_ancestor_owned_by_an_untrusted_user(self) -> None:
        os.chown(self.outer, OTHER_UID, -1)
        self.assertEqual(self.check_inner(), [
            f"{self.outer} is owned by {user(OTHER_UID)}; folders above the node's files must be "
            f"owned by root or a TrustedUser: chown root {self.outer}, or name "
            f"{user_name(OTHER_UID)} in [Host] TrustedUser"])

    @needs_root
    def test_trusted_user_owned_ancestor_accepted(self) -> None:
        os.chown(self.outer, OTHER_UID, -1)
        self.assertEqual(self.check_inner(trusted_uids=[OTHER_UID]), [])
        self.assertNotEqual(self.check_inner(trusted_uids=[OTHER_UID + 1]), [])

    @needs_root
    def test_link_on_the_way_owned_by_an_untrusted_user(self) -> None:
        link = os.path.join(self.top, "link")
        os.symlink(self.inner, link)
        os.lchown(link, OTHER_UID, -1)
        self.assertEqual(self.lines(key_dir=os.path.join(link, "keys"), stores=[link], files=[]), [
            f"{link} is a symbolic link owned by {user(OTHER_UID)}; links on the way to the node's "
            f"files must be owned by root or a TrustedUser: chown -h root {link}"])


class SwitchTests(LayoutTestCase):
    """MM_NO_FILE_PARANOIA and [Host] FileParanoia turn everything off."""

    def setUp(self) -> None:
        super().setUp()
        os.chmod(self.identity, 0o644)

    def test_environment_variable_disables(self) -> None:
        self.assertEqual(self.check(environ={ENV_DISABLE: "1"}), [])
        self.assertEqual(self.check(environ={ENV_DISABLE: "no"}), [])  # any non-empty value

    def test_empty_environment_variable_does_not_disable(self) -> None:
        self.assertEqual(len(self.check(environ={ENV_DISABLE: ""})), 1)

    def config(self, host: str = "") -> Any:
        text = (
            f"[Host]\n{host}"
            f"[Server]\nBaseDir: {self.base}\nMode: relay\nNickname: Tester\n"
            "Contact-Email: admin@example.org\nMixAlgorithm: Binomial\n"
            "[Incoming/MMTP]\nEnabled: yes\nHostname: mix.example.org\n"
            "[Outgoing/MMTP]\nEnabled: yes\n"
        )
        return parse_config(text, "mixminiond.conf", config_dir=self.top)

    def test_problems_for_uses_the_configured_layout(self) -> None:
        os.chmod(self.queues, 0o777)
        os.chmod(self.hashlogs, 0o775)
        os.chmod(self.pid, 0o666)
        paths = [p.path for p in problems_for(self.config(), environ={})]
        self.assertEqual(sorted(paths), sorted([self.identity, self.queues, self.hashlogs, self.pid]))

    def test_file_paranoia_no_disables(self) -> None:
        self.assertEqual(problems_for(self.config("FileParanoia: no\n"), environ={}), [])
        self.assertEqual(problems_for(self.config(), environ={ENV_DISABLE: "1"}), [])

    @needs_root
    def test_problems_for_passes_trusted_users(self) -> None:
        os.chmod(self.identity, 0o600)
        os.chown(self.top, OTHER_UID, -1)
        self.assertEqual([p.path for p in problems_for(self.config(), environ={})], [self.top])
        trusting = self.config(f"TrustedUser: {OTHER_UID}\n")
        self.assertEqual(problems_for(trusting, environ={}), [])
