"""Every event the node counts, by one name each.

The counters are shown on the metrics page (``mixminion_events_total``),
summarised in ``StatsFile`` and saved in ``stats.json``; the MMTP client
and responder, the pipeline and the exit modules count into them.  Each
member's value is the name those show, so a member and its string are
the same key (``StrEnum``).  Events counted per exit module or per reason
are a member plus a suffix: :meth:`Event.of`.
"""

from __future__ import annotations

from enum import StrEnum


class Event(StrEnum):
    # --- MMTP, responder side (mmtp.md §12) ---
    RECEIVED_CONNECTION = "ReceivedConnection"
    RECEIVED_PACKET = "ReceivedPacket"
    REJECTED_PACKET = "RejectedPacket"
    DENIED_CONNECTION = "DeniedConnection"
    REFUSED_CONNECTION = "RefusedConnection"
    #: a full connection table made room
    EVICTED_CONNECTION = "EvictedConnection"
    PROTOCOL_ERROR = "ProtocolError"
    TIMED_OUT = "TimedOut"
    # --- MMTP, initiator side ---
    ATTEMPTED_CONNECT = "AttemptedConnect"
    SUCCESSFUL_CONNECT = "SuccessfulConnect"
    FAILED_CONNECT = "FailedConnect"
    KEY_ID_MISMATCH = "KeyIdMismatch"
    #: a next hop's address refused by the outgoing rules after connecting
    DENIED_CONNECT = "DeniedConnect"
    ATTEMPTED_RELAY = "AttemptedRelay"
    #: a next hop acknowledged a packet (RECEIVED)
    SUCCESSFUL_RELAY = "SuccessfulRelay"
    FAILED_RELAY = "FailedRelay"
    #: a next hop whose connection brought no acknowledgement in time
    STUCK_NEXT_HOP = "StuckNextHop"
    # --- processing ---
    PROCESSED_RELAY = "ProcessedRelay"
    PROCESSED_EXIT = "ProcessedExit"
    #: a PING exit when this node does not ping, or not carrying a handle
    DROPPED_PING = "DroppedPing"
    #: a PING exit with a handle, queued for this node's pinger
    PROCESSED_PING = "ProcessedPing"
    DROPPED_DUMMY = "DroppedDummy"
    #: unreadable records of the incoming log
    DROPPED_DAMAGED = "DroppedDamaged"
    #: per reason: ``Rejected:replay``...
    REJECTED = "Rejected"
    PROCESSING_FAILING = "ProcessingFailing"
    # --- mixing and relaying ---
    MIXED = "Mixed"
    DROPPED_UNKNOWN_EXIT_TYPE = "DroppedUnknownExitType"
    RELAYED_TO_SELF = "RelayedToSelf"
    RELAY_DENIED = "RelayDenied"
    EXPIRED_RELAY = "ExpiredRelay"
    # --- pinging (doc/reliability.md §1) ---
    #: a ping built and queued for its first hop
    PING_SENT = "PingSent"
    #: a ping of ours came back before its timeout
    PING_RETURNED = "PingReturned"
    #: a PING exit whose handle is none of ours, or of a ping already settled
    PING_UNMATCHED = "PingUnmatched"
    #: a ping not back after [Pinging] Timeout
    PING_LOST = "PingLost"
    #: the first attempt to hand a ping to its first hop failed at the link
    #: (connect, TLS, REJECTED), recorded against that hop
    PING_LINK_FAILED = "PingLinkFailed"
    # --- the nymserver (doc/nym.md) ---
    #: per outcome: ``NymRequest:done``, ``:refused``, ``:ignored``, ``:fragment``, ``:unreadable``
    NYM_REQUEST = "NymRequest"
    NYM_MAIL_RECEIVED = "NymMailReceived"
    NYM_MAIL_REFUSED = "NymMailRefused"
    #: a message (answer or mail) sent to an owner through its reply blocks
    NYM_DELIVERED = "NymDelivered"
    NYM_MAIL_SENT = "NymMailSent"
    NYM_MAIL_FAILED = "NymMailFailed"
    # --- delivery (per module: ``ExitDelivered:SMTP``...) ---
    EXIT_DELIVERED = "ExitDelivered"
    EXIT_RETRY = "ExitRetry"
    EXIT_FAILED = "ExitFailed"
    EXIT_MODULE_ERROR = "ExitModuleError"
    EXPIRED = "Expired"
    QUARANTINED = "Quarantined"
    EXIT_UNDELIVERABLE = "ExitUndeliverable"
    EXIT_UNKNOWN_TYPE = "ExitUnknownType"
    EXIT_CORRUPT = "ExitCorrupt"
    EXIT_OVERSIZE = "ExitOversize"
    EXIT_UNKNOWN_MAILBOX = "ExitUnknownMailbox"
    EXIT_INVALID_ADDRESS = "ExitInvalidAddress"
    EXIT_BLACKLISTED = "ExitBlacklisted"
    EXIT_DROP_MODULE = "ExitDropModule"
    # --- fragment reassembly ---
    #: one per reassembly outcome (codec.fragments.Outcome): FRAGMENT_OUTCOME
    FRAGMENT_STORED = "FragmentStored"
    FRAGMENT_UNNEEDED = "FragmentUnneeded"
    FRAGMENT_DROPPED = "FragmentDropped"
    FRAGMENT_REJECTED = "FragmentRejected"
    FRAGMENT_COMPLETED = "FragmentCompleted"
    FRAGMENT_REFUSED = "FragmentRefused"
    FRAGMENT_EVICTED = "FragmentEvicted"
    FRAGMENT_EXPIRED = "FragmentExpired"
    FRAGMENT_MESSAGE_REJECTED = "FragmentMessageRejected"

    def of(self, what: str) -> str:
        """This event for one exit module or reason: ``Expired:SMTP``."""
        return f"{self.value}:{what}"
