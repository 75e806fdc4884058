"""The options of the built-in exit modules' sections (server.md §14.9).

Declared with :mod:`mixminion.config`'s classes, like the node's own
options: the node reads and checks a ``[Delivery/<Name>]`` section with
the schema its module's plugin gives (``IExitModuleFactory.options``), so
a misspelt key or a bad value is found when the file is read, and the
module receives typed values.  This module is imported by the plugin
file, so it stays small: no module code here.
"""

from __future__ import annotations

from typing import Any, Mapping

from mixminion.config.intervals import DEFAULT_MODULE_RETRY
from mixminion.config.schema import Option, SectionSpec, read_values
from mixminion.config.values import (
    BOOLEAN,
    COMMAND,
    FILENAME,
    INT,
    INTERVAL,
    INTERVAL_LIST,
    PORT,
    SIZE,
    STRING,
)
from mixminion.exits.errors import ExitConfigError

#: the From name prefix of every MBOX message and the SMTP default
DEFAULT_FROM_TAG = "[Anon]"


def _mail_options(from_tag: bool = True) -> tuple[Option, ...]:
    """Options shared by the modules that send e-mail."""
    return (
        Option("Enabled", BOOLEAN, "run this module", required=True, published=True),
        Option("Advertise", BOOLEAN, "publish the capability in our descriptor",
               default="yes", published=True),
        Option("Retry", INTERVAL_LIST, "per-message retry schedule (§6.3)",
               default=DEFAULT_MODULE_RETRY),
        Option("MaximumSize", SIZE, "largest message delivered, after decompression; "
               "raised to at least 32 KB and rounded up to whole KB",
               default="100K", published=True),
        Option("AllowFromAddress", BOOLEAN, "honour a sender-chosen From name",
               default="yes", published=True),
        Option("SubjectLine", STRING, "Subject when the message gives none",
               default="Type III Anonymous Message"),
        Option("X-Abuse", STRING, "adds an X-Abuse header"),
        Option("Comments", STRING, "adds a Comments header"),
        Option("Message", STRING, "disclaimer paragraph placed before the body"),
        Option("FromTag", STRING, "prefix of the From display name", default=DEFAULT_FROM_TAG)
        if from_tag else
        Option("FromTag", STRING, "not supported: MBOX always signs its mail [Anon]",
               default=DEFAULT_FROM_TAG,
               refused="MBOX always signs its mail [Anon]; remove FromTag"),
        Option("ReturnAddress", STRING, "address in From and the envelope sender; "
               "required when enabled"),
    )


def _mta_options() -> tuple[Option, ...]:
    return (
        Option("SMTPServer", STRING, "mail server to hand messages to",
               derived="localhost unless SendmailCommand is set"),
        Option("SMTPPort", PORT, "its port (ours: lets tests use a high loopback port)",
               default="25"),
        Option("SendmailCommand", COMMAND, "program fed each message on stdin, e.g. "
               "'/usr/sbin/sendmail -i -t'; exclusive with SMTPServer"),
        Option("MaxSMTPConnections", INT, "ours: messages handed to the mail server at once "
               "(SMTP sessions, or SendmailCommand processes); the others wait their turn, "
               "so a slow or overloaded MTA is not flooded", default="4"),
    )


SMTP = SectionSpec("Delivery/SMTP", "e-mail to any address (§9.3, §14.9)",
                   _mail_options() + _mta_options() + (
    Option("BlacklistFile", FILENAME, "addresses never mailed (§9.5); must exist; "
           "every SIGHUP re-reads it"),
))

MBOX = SectionSpec("Delivery/MBOX", "e-mail to local mailbox names (§9.4, §14.9)",
                   _mail_options(from_tag=False) + _mta_options() + (
    Option("AddressFile", FILENAME, "name: address lines; required when enabled; "
           "every SIGHUP re-reads it"),
    Option("RemoveContact", STRING, "whom recipients ask to be removed; required when "
           "enabled"),
    Option("MboxFile", FILENAME, "ours: append the mail to this local mbox file instead "
           "of handing it to an MTA; exclusive with SMTPServer, SMTPPort and "
           "SendmailCommand"),
))

FRAGMENTED = SectionSpec("Delivery/Fragmented", "server-side reassembly (§9.7)", (
    Option("Enabled", BOOLEAN, "reassemble fragmented messages", required=True,
           published=True),
    Option("MaximumSize", SIZE, "largest compressed message reassembled",
           required=True, published=True),
    Option("MaximumInterval", INTERVAL, "how long fragments wait for the rest",
           default="2 days"),
    Option("MaximumPendingMessages", INT, "most messages waiting for more fragments; over it "
           "the oldest are evicted (counted as FragmentEvicted). Bounds the memory they take: "
           "a few hundred bytes each, their fragments wait on disk",
           default="10000"),
    Option("MaximumPendingBytes", SIZE, "most fragment data kept on disk for messages waiting "
           "for more fragments (a fragment is 28 KB); over it the oldest messages are evicted. "
           "Must hold one message of MaximumSize",
           default="256 MB"),
))


#: what reads the nymserver's listening address and port, once: a SIGHUP
#: finds its service running and leaves them
_AT_START = "mixminion.exits.nym.module:NymModule"

NYM = SectionSpec("Delivery/Nym", "ours: a nymserver in this node (doc/nym.md); mail a "
                  "nym sends goes to the MTA named here", (
    Option("Enabled", BOOLEAN, "run the nymserver", required=True, published=True),
    Option("Domain", STRING, "the mail domain of the nyms (NAME@Domain); its MX must lead "
           "to IncomingPort, usually through an MTA; required when enabled", published=True),
    Option("IncomingAddress", STRING, "address the SMTP listener for mail to the nyms "
           "binds", default="127.0.0.1", consumer=_AT_START),
    Option("IncomingPort", PORT, "port of that listener; required when enabled",
           consumer=_AT_START),
    Option("BlacklistFile", FILENAME, "addresses a nym may not mail (the SMTP exit's "
           "format); must exist; every SIGHUP re-reads it",
           derived="[Delivery/SMTP] BlacklistFile"),
    Option("Retry", INTERVAL_LIST, "retry schedule of a nym's outgoing mail while the MTA "
           "refuses it", default=DEFAULT_MODULE_RETRY),
    Option("MaximumSize", SIZE, "largest mail to or from a nym", default="64K"),
    Option("MaxNyms", INT, "most nyms held", default="1000"),
    Option("MaxReplyBlocksPerNym", INT, "most reply blocks held per nym (the newest stay)",
           default="100"),
    Option("SendsPerNymPerDay", INT, "most mails a nym sends a day", default="50"),
    Option("IncomingPerNymPerHour", INT, "most mails a nym receives an hour (answered 452 "
           "beyond), so nobody drains its reply blocks faster", default="60"),
    Option("MaxQueuedPerNym", INT, "most mails waiting for a nym's reply blocks",
           default="100"),
    Option("MaxQueuedBytesPerNym", SIZE, "most bytes of mail waiting for a nym",
           default="10M"),
) + _mta_options())


def section_values(spec: SectionSpec, section: Mapping[str, Any]) -> dict[str, Any]:
    """What a module's ``configure`` reads: ``section`` typed by its schema
    (text is parsed, parsed values kept, defaults filled in)."""
    try:
        return read_values(spec, section)
    except ValueError as exc:
        raise ExitConfigError(str(exc)) from None
