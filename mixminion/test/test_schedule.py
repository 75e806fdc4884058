"""Tests of retry schedules and the next-attempt function (server.md §6,
§14.2, §14.9)."""

from __future__ import annotations

from twisted.trial import unittest

from mixminion.config.intervals import (
    DAY,
    DEFAULT_MODULE_RETRY,
    DEFAULT_OUTGOING_RETRY,
    HOUR,
    ScheduleError,
    format_interval,
    format_retry_schedule,
    parse_interval,
    parse_retry_schedule,
)
from mixminion.server.schedule import (
    AddressRetryState,
    MessageRetryState,
    expired,
    next_attempt,
    schedule_total,
    schedule_warnings,
)


class IntervalTests(unittest.TestCase):
    def test_every_unit_singular_plural_any_case(self) -> None:
        for text, seconds in [
            ("1 sec", 1), ("2 secs", 2), ("1 second", 1), ("3 SECONDS", 3),
            ("1 min", 60), ("2 mins", 120), ("5 Minutes", 300),
            ("1 hour", 3600), ("7 hours", 25200),
            ("1 day", 86400), ("2 days", 172800),
            ("1 week", 604800), ("2 weeks", 1209600),
            ("1 mon", 2592000), ("1 month", 2592000), ("2 months", 5184000),
            ("1 year", 31536000), ("2 years", 63072000),
        ]:
            self.assertEqual(parse_interval(text), seconds, text)

    def test_fractions_are_exact_then_truncated(self) -> None:
        self.assertEqual(parse_interval(".5 months"), 15 * DAY)
        self.assertEqual(parse_interval("1.5 hours"), 5400)
        self.assertEqual(parse_interval("0.1 hour"), 360)
        self.assertEqual(parse_interval("1.0 seconds"), 1)
        self.assertEqual(parse_interval("2. days"), 2 * DAY)
        self.assertEqual(parse_interval("  30 minutes  "), 1800)
        self.assertEqual(parse_interval("30minutes"), 1800)

    def test_bad_intervals(self) -> None:
        for text in ["ten minutes", "5", "minutes", "5 fortnights", "-1 hour", "",
                     "1 hour 5", "1.2.3 hours", "5 s"]:
            with self.assertRaises(ScheduleError, msg=text) as caught:
                parse_interval(text)
            self.assertIn("is not an interval", str(caught.exception))
        self.assertEqual(
            str(self.assertRaises(ScheduleError, parse_interval, "ten minutes")),
            '"ten minutes" is not an interval (expected NUMBER UNIT, e.g. "30 minutes")')

    def test_fractions_of_a_second_are_refused(self) -> None:
        for text in ["0.5 seconds", "1.5 seconds", ".001 hours", "1.0000001 days"]:
            with self.assertRaises(ScheduleError, msg=text) as caught:
                parse_interval(text)
            self.assertEqual(str(caught.exception), f'"{text}" is not a whole number of '
                                                    "seconds (intervals count whole seconds)")

    def test_a_durations_fraction_only_counts_attempts(self) -> None:
        self.assertEqual(parse_retry_schedule("every 7 hours for 0.3333 days"), (25200, 25200))
        self.assertRaises(ScheduleError, parse_retry_schedule, "every 0.5 hours for 1 day, "
                                                               "0.5 seconds")

    def test_format_interval_uses_largest_exact_unit(self) -> None:
        self.assertEqual(format_interval(1800), "30 minutes")
        self.assertEqual(format_interval(60), "1 minute")
        self.assertEqual(format_interval(86400), "1 day")
        self.assertEqual(format_interval(25200), "7 hours")
        self.assertEqual(format_interval(90), "90 seconds")
        self.assertEqual(format_interval(1), "1 second")
        self.assertEqual(format_interval(0), "0 seconds")
        for seconds in (1, 59, 61, 3600, 5400, 2592000, 31536000):
            self.assertEqual(parse_interval(format_interval(seconds)), seconds)


class ScheduleSyntaxTests(unittest.TestCase):
    def test_outgoing_default(self) -> None:
        schedule = parse_retry_schedule(DEFAULT_OUTGOING_RETRY)
        self.assertEqual(schedule, (3600,) * 24 + (25200,) * 18)
        self.assertEqual(schedule_total(schedule), 540000)  # 6 days 6 hours

    def test_module_default(self) -> None:
        schedule = parse_retry_schedule(DEFAULT_MODULE_RETRY)
        self.assertEqual(schedule, (25200,) * 21)
        self.assertEqual(schedule_total(schedule), 147 * HOUR)

    def test_items(self) -> None:
        self.assertEqual(parse_retry_schedule("1 hour"), (3600,))
        self.assertEqual(parse_retry_schedule("1 hour, 2 hours,3 hours"), (3600, 7200, 10800))
        self.assertEqual(parse_retry_schedule("every 10 minutes for 1 hour"), (600,) * 6)
        self.assertEqual(parse_retry_schedule("EVERY 10 minutes FOR 1 hour"), (600,) * 6)
        # ceil(duration / interval)
        self.assertEqual(parse_retry_schedule("7 hours for 5 days"), (25200,) * 18)
        self.assertEqual(parse_retry_schedule("1 hour for 90 minutes"), (3600, 3600))
        self.assertEqual(parse_retry_schedule("1 hour for 0 hours, 5 minutes"), (300,))
        self.assertEqual(parse_retry_schedule("5 minutes, every 1 hour for 2 hours, 1 day"),
                         (300, 3600, 3600, 86400))

    def test_bad_schedules(self) -> None:
        for text in ["", "  ", "every 1 hour", "1 hour,", ", 1 hour", "1 hour,,2 hours",
                     "every 0 seconds for 1 day", "every .5 seconds for 1 minute",
                     "ten minutes", "every 1 hour for ever", "1 hour for"]:
            self.assertRaises(ScheduleError, parse_retry_schedule, text)
        self.assertIn('needs "for DURATION"',
                      str(self.assertRaises(ScheduleError, parse_retry_schedule, "every 1 hour")))

    def test_canonical_form(self) -> None:
        self.assertEqual(format_retry_schedule(parse_retry_schedule(DEFAULT_OUTGOING_RETRY)),
                         "every 1 hour for 1 day, every 7 hours for 5 days")
        self.assertEqual(format_retry_schedule(parse_retry_schedule(DEFAULT_MODULE_RETRY)),
                         "every 7 hours for 6 days")
        self.assertEqual(format_retry_schedule((3600, 7200)), "1 hour, 2 hours")
        self.assertEqual(format_retry_schedule(()), "")

    def test_canonical_form_parses_back(self) -> None:
        for text in [DEFAULT_OUTGOING_RETRY, DEFAULT_MODULE_RETRY, "every 10 minutes for 1 hour",
                     "every 1 hour for 25 hours", "1 day, 2 days", "every 1.5 hours for 1 day",
                     "every 7 seconds for 100 seconds", "every 1 minute for 1 year, 13 seconds"]:
            schedule = parse_retry_schedule(text)
            self.assertEqual(parse_retry_schedule(format_retry_schedule(schedule)), schedule, text)


class ScheduleWarningTests(unittest.TestCase):
    def test_sane_default_has_no_warning(self) -> None:
        self.assertEqual(schedule_warnings(parse_retry_schedule(DEFAULT_OUTGOING_RETRY), 1800), [])
        self.assertEqual(schedule_warnings(parse_retry_schedule(DEFAULT_MODULE_RETRY), 1800), [])

    def test_each_warning(self) -> None:
        def warned(text: str, mix: int = 1800) -> str:
            return " | ".join(schedule_warnings(parse_retry_schedule(text), mix))

        self.assertIn("less than 1 day", warned("every 1 hour for 10 hours"))
        self.assertIn("more than 14 days", warned("every 1 day for 15 days"))
        self.assertIn("rounded to the nearest mix", warned("every 10 minutes for 2 days"))
        # within 2 s of MixInterval is not "shorter"
        self.assertNotIn("nearest mix", warned("every 1798 seconds for 2 days"))
        self.assertIn("shorter than 5 minutes", warned("every 4 minutes for 2 days", mix=60))
        self.assertNotIn("5 minutes", warned("every 10 minutes for 2 days", mix=60))
        self.assertIn("fewer than 5", warned("1 day, 1 day"))
        self.assertIn("more than 50", warned("every 1 hour for 3 days"))


class NextAttemptTests(unittest.TestCase):
    schedule = (10, 20, 30)  # attempts at first+10, +30, +60

    def test_never_tried_is_ready_now(self) -> None:
        self.assertEqual(next_attempt(None, 0, self.schedule, True, 1234.5), 1234.5)
        self.assertEqual(next_attempt(None, 0, (), False, 99), 99)

    def test_walks_the_schedule(self) -> None:
        self.assertEqual(next_attempt(0, 0, self.schedule, True, 0), 10)
        self.assertEqual(next_attempt(9, 0, self.schedule, True, 9), 10)
        # strictly after the last attempt
        self.assertEqual(next_attempt(10, 0, self.schedule, True, 10), 30)
        self.assertEqual(next_attempt(45, 0, self.schedule, True, 45), 60)
        self.assertEqual(next_attempt(1010, 1000, self.schedule, True, 0), 1030)

    def test_result_may_be_in_the_past(self) -> None:
        self.assertEqual(next_attempt(15, 0, self.schedule, True, 500), 30)

    def test_exhausted_with_drop(self) -> None:
        self.assertIsNone(next_attempt(60, 0, self.schedule, True, 60))
        self.assertIsNone(next_attempt(1000, 0, self.schedule, True, 1000))
        self.assertIsNone(next_attempt(0, 0, (), True, 0))

    def test_holding_mode_repeats_last_interval(self) -> None:
        # t = 60, r = 30: 60 + ceil((last - 60 + 60) / 30) * 30
        self.assertEqual(next_attempt(60, 0, self.schedule, False, 60), 60 + 2 * 30)
        self.assertEqual(next_attempt(100, 0, self.schedule, False, 100), 60 + 4 * 30)
        self.assertEqual(next_attempt(100, 0, (10, 20), False, 100), 30 + 7 * 20)

    def test_holding_mode_short_last_interval_uses_an_hour(self) -> None:
        self.assertEqual(next_attempt(10, 0, (3,), False, 10), 3 + 3600)
        self.assertEqual(next_attempt(200, 0, (100, 4), False, 200), 104 + 3600)
        # exactly 5 s is usable
        self.assertEqual(next_attempt(10, 0, (5,), False, 10), 5 + 13 * 5)

    def test_holding_mode_empty_schedule_uses_an_hour(self) -> None:
        self.assertEqual(next_attempt(1000, 1000, (), False, 1000), 1000 + 3600)
        self.assertEqual(next_attempt(1000 + 3600, 1000, (), False, 0), 1000 + 2 * 3600)

    def test_expired(self) -> None:
        self.assertFalse(expired(0, self.schedule, 60))
        self.assertTrue(expired(0, self.schedule, 61))


class AddressRetryStateTests(unittest.TestCase):
    schedule = (100, 200)

    def test_never_failed_is_ready(self) -> None:
        state = AddressRetryState(self.schedule)
        self.assertTrue(state.ready(0))
        self.assertEqual(state.next_attempt(5), 5)

    def test_failures_follow_schedule_from_first_failure(self) -> None:
        state = AddressRetryState(self.schedule)
        state.failed(1000)
        self.assertEqual((state.first_failure, state.last_failure), (1000, 1000))
        self.assertFalse(state.ready(1099))
        self.assertTrue(state.ready(1100))
        state.failed(1105)
        self.assertEqual((state.first_failure, state.last_failure), (1000, 1105))
        self.assertEqual(state.next_attempt(1105), 1300)

    def test_address_is_never_dropped(self) -> None:
        state = AddressRetryState(self.schedule)
        state.failed(0)
        state.failed(300)
        self.assertEqual(state.next_attempt(300), 300 + 200)  # holding every 200 s

    def test_success_clears_failures(self) -> None:
        state = AddressRetryState(self.schedule)
        state.failed(0)
        state.succeeded(50)
        self.assertEqual(state, AddressRetryState(self.schedule, None, None, 50))
        self.assertTrue(state.ready(51))

    def test_forgettable(self) -> None:
        state = AddressRetryState(self.schedule)
        self.assertTrue(state.forgettable(0))
        state.succeeded(1000)
        self.assertFalse(state.forgettable(1300))
        self.assertTrue(state.forgettable(1301))

    def test_record_round_trip(self) -> None:
        state = AddressRetryState(self.schedule, 1.0, 2.0, 3.0)
        self.assertEqual(AddressRetryState.from_record(self.schedule, state.to_record()), state)


class MessageRetryStateTests(unittest.TestCase):
    schedule = (100, 200)

    def test_new_message_is_ready(self) -> None:
        state = MessageRetryState(self.schedule, queued=1000)
        self.assertTrue(state.ready(1000))

    def test_failures_then_drop(self) -> None:
        state = MessageRetryState(self.schedule, queued=1000)
        self.assertTrue(state.failed(1000))
        self.assertFalse(state.ready(1099))
        self.assertTrue(state.ready(1100))
        self.assertTrue(state.failed(1100))
        self.assertEqual(state.next_attempt(1100), 1300)
        self.assertFalse(state.failed(1300))
        self.assertIsNone(state.next_attempt(1300))
        self.assertFalse(state.ready(99999))

    def test_record_round_trip(self) -> None:
        state = MessageRetryState(self.schedule, 5.0, 7.0)
        self.assertEqual(MessageRetryState.from_record(self.schedule, state.to_record()), state)
