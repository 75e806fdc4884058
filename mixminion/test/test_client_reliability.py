"""The client's use of reliability statistics (doc/reliability.md §4,
issue 16): weighted random hops, the ``ReliabilityFloor``, named
unreliable servers, and the ``reliability``/``latency``/``pingers``
features of ``list-servers``.

The draws use a seeded :class:`random.Random`, so the counts are the same
on every run; the tolerances are still a few standard deviations wide,
so that another seed would pass too.  Commands run in-process through
:class:`test_client_cli.Env`, whose cached directory here carries a
``[Reliability]`` section, so the whole chain from the directory's text
to a path or a ``list-servers`` line is exercised.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import time
from collections import Counter
from typing import Any, Mapping, Optional, Sequence

from twisted.trial import unittest

from mixminion.client.commands import common, servers
from mixminion.client.config import ConfigError, load_client_config, parse_client_config
from mixminion.client.paths import ExitNeeds, PathError, PathSelector, parse_address, parse_path
from mixminion.directory.descriptor import ServerDescriptor
from mixminion.directory.directory import DirectoryInfo, VotingServer, build_directory, sign_directory
from mixminion.directory.reliability import ServerReliability
from mixminion.testing.asserts import NearAssertions
from mixminion.test.test_client_cli import (
    AUTHORITY,
    DAY,
    TODAY,
    Env,
    descriptor,
    inline,
    reactor,
    standard_servers,
)
from mixminion.testing.keys import key

ALPHA, BETA, GAMMA, DELTA = standard_servers()
#: draws per statistical test: the ratio of two ~1/3 shares then has a
#: standard deviation of about 0.01
DRAWS = 30000


def measured(value: float, latency_ms: int = 100, pingers: int = 3) -> ServerReliability:
    return ServerReliability(value, latency_ms, pingers)


def selector(values: Mapping[ServerDescriptor, float], floor: Optional[float] = None,
             seed: int = 16, warnings: Optional[list[str]] = None,
             descriptors: Sequence[ServerDescriptor] = (ALPHA, BETA, GAMMA, DELTA),
             **extra: Any) -> PathSelector:
    """A selector over ``descriptors`` (named ones resolved among them),
    with ``values`` as the directory's measurements."""
    by_name = {d.nickname.lower(): d for d in descriptors}
    now = time.time()
    if floor is not None:
        extra["floor"] = floor
    return PathSelector(list(descriptors), lambda name: by_name[name.lower()], now, now + 3600,
                        rng=random.Random(seed),
                        warn=(warnings.append if warnings is not None else lambda _: None),
                        reliability={d.fingerprint: measured(v) for d, v in values.items()},
                        **extra)


def single_hops(sel: PathSelector, draws: int = DRAWS) -> Counter[str]:
    """How often each server is drawn as the one random hop of a reply block."""
    spec = parse_path("?", "surb")
    return Counter(sel.choose(spec, "surb").hops[0].nickname for _ in range(draws))


# --- path selection -------------------------------------------------------------------


class WeightingTests(NearAssertions, unittest.TestCase):

    def test_draws_follow_reliability_and_skip_servers_below_the_floor(self) -> None:
        sel = selector({ALPHA: 1.0, BETA: 0.95, GAMMA: 0.5})
        counts = single_hops(sel)
        self.assertEqual(counts["Gamma"], 0)
        self.assertNear(counts["Beta"] / counts["Alpha"], 0.95, delta=0.03)
        # Delta is unmeasured: the median of the eligible values, 0.975
        self.assertNear(counts["Delta"] / counts["Alpha"], 0.975, delta=0.03)
        self.assertEqual(sum(counts.values()), DRAWS)

    def test_unmeasured_servers_weigh_the_median_of_the_measured_eligible_ones(self) -> None:
        # Gamma is below the floor: it does not pull the median down.
        self.assertEqual(selector({ALPHA: 1.0, BETA: 0.95, GAMMA: 0.5}).weight(DELTA), 0.975)
        self.assertEqual(selector({ALPHA: 1.0, BETA: 0.92, GAMMA: 0.96}).weight(DELTA), 0.96)
        self.assertEqual(selector({}).weight(DELTA), 1.0)
        # With no floor the spread is wide enough to see in the draws:
        # weights 1.0, 0.2, 0.4 and (Delta) 0.4, so Delta takes a fifth.
        sel = selector({ALPHA: 1.0, BETA: 0.2, GAMMA: 0.4}, floor=0.0)
        self.assertEqual(sel.weight(DELTA), 0.4)
        counts = single_hops(sel)
        self.assertNear(counts["Delta"] / DRAWS, 0.2, delta=0.015)
        self.assertNear(counts["Beta"] / DRAWS, 0.1, delta=0.015)
        self.assertNear(counts["Alpha"] / DRAWS, 0.5, delta=0.015)

    def test_nothing_measured_draws_as_without_reliability(self) -> None:
        """Equal weights keep the uniform draw, so seeded paths do not change."""
        plain = single_hops(selector({}, seed=3), 500)
        equal = single_hops(selector({ALPHA: 0.97, BETA: 0.97, GAMMA: 0.97, DELTA: 0.97},
                                     seed=3), 500)
        self.assertEqual(plain, equal)

    def test_floor_zero_disables_the_floor_but_not_the_weights(self) -> None:
        counts = single_hops(selector({ALPHA: 1.0, BETA: 1.0, GAMMA: 0.5}, floor=0.0))
        self.assertNear(counts["Gamma"] / counts["Alpha"], 0.5, delta=0.03)

    def test_every_rule_still_holds_in_forward_paths(self) -> None:
        """Exits deliver, neighbours differ, both legs are filled, blocked
        and unreliable servers never come at random."""
        warnings: list[str] = []
        sel = selector({ALPHA: 0.99, BETA: 0.93, GAMMA: 0.5}, warnings=warnings)
        needs = ExitNeeds(parse_address("a@example.org"), size=1000)
        for text in ("*4", "~5", "?,?:?"):
            for _ in range(100):
                legs = sel.choose(parse_path(text), "forward", needs)
                names = [d.nickname for d in legs.hops]
                self.assertNotIn("Gamma", names)
                self.assertTrue(legs.leg1 and legs.leg2)
                self.assertIn(names[-1], ("Alpha", "Beta"))
                for a, b in zip(names, names[1:]):
                    self.assertNotEqual(a, b, names)
        self.assertEqual(warnings, [])  # three usable servers: no weak-anonymity warning
        blocked = selector({ALPHA: 0.99, GAMMA: 0.5}, block_servers=frozenset({"beta"}))
        for _ in range(50):
            names = [d.nickname for d in blocked.choose(parse_path("*3"), "forward", needs).hops]
            self.assertNotIn("Beta", names)
            self.assertNotIn("Gamma", names)

    def test_a_named_unreliable_server_is_used_with_a_warning(self) -> None:
        warnings: list[str] = []
        sel = selector({ALPHA: 1.0, GAMMA: 0.5}, warnings=warnings)
        needs = ExitNeeds(parse_address("a@example.org"), size=1000)
        spec = parse_path("Gamma,?:?,Alpha")
        sel.validate(spec, needs, "forward")
        for _ in range(20):
            legs = sel.choose(spec, "forward", needs)
            self.assertEqual((legs.hops[0].nickname, legs.hops[-1].nickname), ("Gamma", "Alpha"))
            self.assertNotIn("Gamma", [d.nickname for d in legs.hops[1:]])
        self.assertEqual(len(warnings), 1, warnings)  # once per name, not per packet
        self.assertIn("Gamma", warnings[0])
        self.assertIn("0.500", warnings[0])
        self.assertIn("ReliabilityFloor 0.900", warnings[0])
        quiet: list[str] = []
        selector({ALPHA: 1.0, GAMMA: 0.5}, floor=0.0, warnings=quiet).resolve("Gamma")
        selector({ALPHA: 1.0, GAMMA: 0.95}, warnings=quiet).resolve("Gamma")
        self.assertEqual(quiet, [])

    def test_no_reliable_exit_says_the_floor_is_why(self) -> None:
        sel = selector({ALPHA: 0.5, BETA: 0.8})
        needs = ExitNeeds(parse_address("a@example.org"), size=1000)
        with self.assertRaises(PathError) as caught:
            sel.validate(parse_path("*3"), needs, "forward")
        self.assertIn("ReliabilityFloor 0.900", str(caught.exception))
        # named, the same exit is fine
        sel.validate(parse_path("?,Alpha"), needs, "forward")

    def test_no_reliable_server_at_all_says_the_floor_is_why(self) -> None:
        warnings: list[str] = []
        sel = selector({ALPHA: 0.5, BETA: 0.5, GAMMA: 0.5, DELTA: 0.5}, warnings=warnings)
        with self.assertRaises(PathError) as caught:
            sel.choose(parse_path("?", "surb"), "surb")
        self.assertIn("4 server(s) are skipped", str(caught.exception))
        self.assertIn("Only 0 server(s) are known", warnings[0])

    def test_fingerprints_match_whatever_their_case(self) -> None:
        now = time.time()
        sel = PathSelector([ALPHA, BETA], lambda n: ALPHA, now, now + 60,
                           reliability={GAMMA.fingerprint.lower(): measured(0.5),
                                        ALPHA.fingerprint.lower(): measured(0.5)})
        self.assertTrue(sel.below_floor(ALPHA))
        self.assertFalse(sel.below_floor(BETA))


# --- configuration ----------------------------------------------------------------------


class ConfigTests(unittest.TestCase):

    def test_default_value_and_percentage(self) -> None:
        self.assertEqual(parse_client_config("").reliability_floor, 0.9)
        self.assertEqual(parse_client_config(
            "[Security]\nReliabilityFloor: 0.75\n").reliability_floor, 0.75)
        self.assertEqual(parse_client_config(
            "[Security]\nReliabilityFloor: 80%\n").reliability_floor, 0.8)
        self.assertEqual(parse_client_config(
            "[Security]\nReliabilityFloor: 0\n").reliability_floor, 0.0)

    def test_out_of_range_names_file_and_line(self) -> None:
        for value in ("1.5", "-0.1", "high", "120%"):
            with self.assertRaises(ConfigError) as caught:
                parse_client_config(f"[User]\nUserDir: /tmp/u\n[Security]\n"
                                    f"ReliabilityFloor: {value}\n", "rc")
            self.assertTrue(str(caught.exception).startswith(
                f'rc:4: [Security] ReliabilityFloor: "{value}" is not a fraction'),
                str(caught.exception))


# --- the commands -------------------------------------------------------------------------


def measured_env(test: unittest.TestCase,
                 values: Mapping[ServerDescriptor, ServerReliability],
                 extra: str = "") -> Env:
    """An :class:`Env` whose directory (today's consensus of the standard
    servers, signed by its one authority) carries ``values`` in its
    ``[Reliability]`` section."""
    env = Env(test, extra=extra)
    descriptors = standard_servers()
    info = DirectoryInfo(
        status="consensus", valid_after=TODAY, valid_until=TODAY + DAY,
        recommended_nicknames=tuple(d.nickname for d in descriptors),
        voting_servers=(VotingServer(key(AUTHORITY).public.fingerprint,
                                     f"http://{AUTHORITY}.example.org/"),),
        reliability={d.fingerprint: r for d, r in values.items()})
    text = sign_directory(build_directory(info, descriptors), key(AUTHORITY), os.urandom)
    with open(os.path.join(env.user_dir, "dir"), "w") as f:
        f.write(text)
    return env


MEASURED = {ALPHA: measured(0.95, 123, 4), GAMMA: measured(0.5, 2041, 3)}


class CommandTests(unittest.TestCase):

    def context(self, env: Env) -> common.Context:
        ctx = common.Context(io.BytesIO(), io.BytesIO(), io.StringIO(), env.environ, reactor,
                             argparse.Namespace(quiet=True, verbose=False))
        ctx.config = load_client_config(env.rc, env.environ)
        return ctx

    def test_the_directory_gives_its_measurements_or_none(self) -> None:
        directory = common.local_directory(self.context(Env(self)))
        self.assertEqual(dict(directory.reliability()), {})
        directory = common.local_directory(self.context(measured_env(self, MEASURED)))
        self.assertEqual(dict(directory.reliability()),
                         {d.fingerprint: r for d, r in MEASURED.items()})
        os.unlink(os.path.join(directory.root, "dir"))
        directory.load()
        self.assertEqual(dict(directory.reliability()), {})  # no directory: nothing measured

    def test_make_selector_passes_measurements_and_floor(self) -> None:
        env = measured_env(self, MEASURED, extra="[Security]\nReliabilityFloor: 60%\n")
        ctx = self.context(env)
        now = time.time()
        sel = common.make_selector(ctx, common.local_directory(ctx), now, now + DAY)
        self.assertEqual(sel.floor, 0.6)
        self.assertEqual(sel.measured(GAMMA), MEASURED[GAMMA])
        self.assertTrue(sel.below_floor(GAMMA))
        self.assertFalse(sel.below_floor(ALPHA))

    @inline
    async def test_send_through_a_named_unreliable_server(self) -> None:
        argv = ("send", "--queue", "-t", "bob@example.org", "-P", "Gamma,Alpha", "-D", "no")
        env = measured_env(self, MEASURED)
        status, out, err = await env.run(*argv, "-i", env.write("m", b"hello\n"))
        self.assertEqual(status, 0, err)
        self.assertIn("Using Gamma although its measured reliability is 0.500", err)
        self.assertEqual(len(env.queued()), 1)
        env = measured_env(self, MEASURED, extra="[Security]\nReliabilityFloor: 0\n")
        status, out, err = await env.run(*argv, "-i", env.write("m", b"hello\n"))
        self.assertEqual(status, 0, err)
        self.assertNotIn("reliability", err)

    @inline
    async def test_list_servers_shows_the_measurements(self) -> None:
        env = measured_env(self, MEASURED)
        status, _, err = await env.run("import-server",
                                       env.write("e", descriptor("Epsilon").text.encode()))
        self.assertEqual(status, 0, err)
        status, out, err = await env.run("list-servers", "-D", "no", "-F",
                                         "reliability,latency,pingers,status")
        self.assertEqual(status, 0, err)
        self.assertEqual(out.decode().splitlines(), [
            "Alpha:0.950\t123 ms\t4\t(ok)",
            "Beta:-\t-\t-\t(ok)",
            "Delta:-\t-\t-\t(ok)",
            "Epsilon:-\t-\t-\t(not recommended)",  # imported: never measured
            "Gamma:0.500\t2041 ms\t3\t(unreliable)",
        ])
        env = measured_env(self, MEASURED, extra="[Security]\nReliabilityFloor: 0.4\n")
        status, out, err = await env.run("list-servers", "-D", "no", "-C", "-F",
                                         "status,Reliability", "Gamma")
        self.assertEqual(status, 0, err)
        self.assertEqual(out.decode().splitlines(),
                         ["Gamma:", "    status:(ok)", "    Reliability:0.500"])

    @inline
    async def test_list_servers_without_measurements_shows_dashes(self) -> None:
        status, out, err = await Env(self).run("list-servers", "-D", "no", "-F",
                                               "reliability,latency,pingers", "Alpha")
        self.assertEqual((status, out), (0, b"Alpha:-\t-\t-\n"), err)

    @inline
    async def test_list_features_shows_them(self) -> None:
        status, out, err = await Env(self).run("list-servers", "--list-features")
        self.assertEqual(status, 0, err)
        lines = out.decode().splitlines()
        heads = [line.split()[0] for line in lines]
        for name in ("reliability", "latency", "pingers"):
            self.assertEqual(heads.count(name), 1, name)
            self.assertIn("- when unmeasured", lines[heads.index(name)])
        self.assertEqual([f.name for f in servers.DERIVED].count("reliability"), 1)
