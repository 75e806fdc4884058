"""Votes and the consensus (descriptors.md §7.2): accepting another
authority's vote, and merging the accepted votes into the consensus every
authority computes byte for byte alike, so that all of them sign one
digest.  The directory format itself is :mod:`mixminion.directory.directory`.

Pure code: the validation time is a parameter.
"""

from __future__ import annotations

from typing import Mapping, Sequence, Tuple, TypeVar

from mixminion.codec.rsa import PublicKey
from mixminion.codec.textformat import SECONDS_PER_DAY, format_date, previous_midnight
from mixminion.directory.descriptor import ServerDescriptor
from mixminion.directory.reliability import ServerReliability, consensus_value
from mixminion.directory.directory import (
    MAX_FUTURE,
    STATUS_CONSENSUS,
    STATUS_VOTE,
    ConsensusError,
    DirectoryError,
    DirectoryInfo,
    SignedDirectory,
    VoteRejected,
    Voters,
    VotingServer,
    descriptor_sort_key,
    is_superseded,
    parse_directory,
    signature_count,
    sort_versions,
    unique_descriptors,
    version_key,
    voter_table,
)


def _reject(message: str) -> VoteRejected:
    return VoteRejected(f"vote rejected: {message}")


def accept_vote(text: str | bytes, voters: Voters, valid_after: int, now: float) -> SignedDirectory:
    """Check another authority's vote against every §7.2 acceptance rule.

    ``voters`` is our configured list (fingerprint -> (key, URL));
    ``valid_after`` the day being voted on.  Any failure is a
    :class:`VoteRejected` whose cause is the underlying error, if any.
    """
    table = voter_table(voters)
    try:
        blocks = signature_count(text)
        if blocks != 1:
            raise _reject(f"a vote carries exactly one signature; this one has {blocks}")
        vote = parse_directory(
            text, now, trusted={fp: key for fp, (key, _) in table.items()}, threshold=1, check_validity=False
        )
    except VoteRejected:
        raise
    except DirectoryError as exc:
        raise _reject(str(exc)) from exc
    _check_vote(vote, table, previous_midnight(int(valid_after)))
    return vote


def _check_vote(vote: SignedDirectory, table: Mapping[str, Tuple[PublicKey, str]], day: int) -> None:
    info = vote.info
    by = f"(signed by {vote.signers[0]})"
    if info.status != STATUS_VOTE:
        raise _reject(f"Status is {info.status!r}, not 'vote' {by}")
    ours = tuple(sorted(VotingServer(fp, url) for fp, (_, url) in table.items()))
    if list(info.voting_servers) != sorted(info.voting_servers):
        raise _reject(f"Voting-Server lines are not sorted by (fingerprint, URL) {by}")
    if info.voting_servers != ours:
        raise _reject(f"Voting-Server list differs from ours: {_list_difference(info.voting_servers, ours)} {by}")
    if info.valid_after != day:
        raise _reject(f"Valid-After is {format_date(info.valid_after)}, expected {format_date(day)} {by}")
    if info.valid_until != day + SECONDS_PER_DAY:
        raise _reject(f"Valid-Until is {format_date(info.valid_until)}, expected one day after Valid-After {by}")
    for name, versions in (("MixminionClient", info.client_versions), ("MixminionServer", info.server_versions)):
        if list(versions) != sorted(versions, key=version_key):
            raise _reject(f"{name} versions are not in version order {by}")
    keys = [descriptor_sort_key(d) for d in vote.descriptors]
    if keys != sorted(keys):
        raise _reject(f"descriptors are not sorted by (nickname, Valid-After, digest) {by}")
    if list(info.reliability) != sorted(info.reliability):
        raise _reject(f"[Reliability] Server lines are not sorted by fingerprint {by}")


def _list_difference(theirs: Sequence[VotingServer], ours: Sequence[VotingServer]) -> str:
    extra = [f"{v.fingerprint} {v.url}" for v in theirs if v not in ours]
    missing = [f"{v.fingerprint} {v.url}" for v in ours if v not in theirs]
    parts = ([f"unexpected {', '.join(extra)}"] if extra else []) + (
        [f"missing {', '.join(missing)}"] if missing else []
    )
    return "; ".join(parts) or "duplicated lines"


_Item = TypeVar("_Item", str, bytes)


def consensus_threshold(voter_count: int) -> int:
    """floor((N + 1) / 2) of the N configured voters (§7.2 step 1)."""
    return (voter_count + 1) // 2


def compute_consensus(
    votes: Sequence[SignedDirectory], voters: Voters, valid_after: int
) -> tuple[DirectoryInfo, list[ServerDescriptor]]:
    """Merge accepted votes into the consensus contents (§7.2 steps 1-4).

    Deliberate deviation from step 2: Recommended-Servers names only servers
    whose descriptors the consensus carries (see :func:`_recommended` and
    doc/decisions-directory.md).  Reliability: see :func:`_reliability`.

    Independent of the order of ``votes``: feed the result to
    :func:`~mixminion.directory.directory.build_directory` and every authority gets the
    same bytes.
    """
    table = voter_table(voters)
    day = previous_midnight(int(valid_after))
    threshold = consensus_threshold(len(table))
    _check_votes(votes, table, day, threshold)
    descriptors = _consensus_descriptors(votes, threshold, day)
    info = DirectoryInfo(
        status=STATUS_CONSENSUS,
        valid_after=day,
        valid_until=day + SECONDS_PER_DAY,
        recommended_nicknames=_recommended(votes, threshold, descriptors),
        voting_servers=tuple(sorted(VotingServer(fp, url) for fp, (_, url) in table.items())),
        client_versions=sort_versions(_by_threshold([set(v.client_versions) for v in votes], threshold)),
        server_versions=sort_versions(_by_threshold([set(v.server_versions) for v in votes], threshold)),
        reliability=_reliability(votes, threshold, descriptors),
    )
    return info, descriptors


def _reliability(
    votes: Sequence[SignedDirectory], threshold: int, descriptors: Sequence[ServerDescriptor]
) -> dict[str, ServerReliability]:
    """Per carried server, the lower medians of the votes that measured it,
    if ``threshold`` of them did (doc/reliability.md §3): fewer authorities
    cannot invent a measurement, and each vote moves a median by one rank
    at most."""
    values: dict[str, ServerReliability] = {}
    for fingerprint in sorted({d.fingerprint for d in descriptors}):
        measured = [v.info.reliability[fingerprint] for v in votes if fingerprint in v.info.reliability]
        if len(measured) >= threshold:
            values[fingerprint] = consensus_value(measured)
    return values


def _recommended(
    votes: Sequence[SignedDirectory], threshold: int, descriptors: Sequence[ServerDescriptor]
) -> Tuple[str, ...]:
    """Nicknames recommended by ``threshold`` votes (§7.2 step 2) *and* carried.

    The spec keeps a nickname even when steps 3-4 left out every descriptor
    of it (identity in too few votes, nicknames disagreeing, all expired or
    too far ahead): the directory would then recommend a server it cannot
    describe, one the authorities did not agree on.  Such names are dropped.
    """
    carried = {d.nickname.lower() for d in descriptors}
    voted = _by_threshold([{n.lower() for n in v.recommended_nicknames} for v in votes], threshold)
    return tuple(sorted(voted & carried))


def _check_votes(
    votes: Sequence[SignedDirectory], table: Mapping[str, Tuple[PublicKey, str]], day: int, threshold: int
) -> None:
    """Only accepted votes: one per configured voter, for ``day``."""
    seen: set[str] = set()
    for vote in votes:
        if vote.status != STATUS_VOTE or vote.valid_after != day:
            raise ConsensusError(f"not a vote for {format_date(day)}: {vote.status} for {format_date(vote.valid_after)}")
        if len(vote.signers) != 1 or vote.signers[0] not in table:
            raise ConsensusError(f"vote signed by {', '.join(vote.signers) or 'nobody'}, not by one configured voter")
        if vote.signers[0] in seen:
            raise ConsensusError(f"two votes by {vote.signers[0]}; each voter counts once")
        seen.add(vote.signers[0])
    if len(votes) < threshold:
        raise ConsensusError(
            f"{len(votes)} accepted vote(s) of {len(table)} voters; at least {threshold} needed for a consensus"
        )


def _by_threshold(item_sets: Sequence[set[_Item]], threshold: int) -> set[_Item]:
    """Items present in at least ``threshold`` of the sets (§7.2 steps 2-3)."""
    counts: dict[_Item, int] = {}
    for items in item_sets:
        for item in items:
            counts[item] = counts.get(item, 0) + 1
    return {item for item, count in counts.items() if count >= threshold}


def _consensus_descriptors(votes: Sequence[SignedDirectory], threshold: int, day: int) -> list[ServerDescriptor]:
    """§7.2 steps 3-4: agreed identities, then current, unsuperseded descriptors."""
    included = _by_threshold([{d.identity_digest for d in v.descriptors} for v in votes], threshold)
    by_identity: dict[bytes, list[ServerDescriptor]] = {}
    for descriptor in unique_descriptors(d for v in votes for d in v.descriptors):
        by_identity.setdefault(descriptor.identity_digest, []).append(descriptor)
    kept: list[ServerDescriptor] = []
    for identity, candidates in by_identity.items():
        if identity not in included or len({d.nickname.lower() for d in candidates}) != 1:
            continue
        kept += [
            d for d in candidates
            if d.valid_until >= day
            and d.valid_after <= day + MAX_FUTURE
            and not is_superseded(d, candidates)
        ]
    return sorted(kept, key=descriptor_sort_key)
