"""``twistd mixminion-directory -c authority.conf``: a directory authority.

Reads the configuration, loads (or on first start creates) the identity
key under ``BaseDir``, and returns the authority's service.  The first
start logs the fingerprint: it goes into every authority's ``Peer`` list
and every server's ``[DirectoryServers] Authority`` line.

A SIGHUP re-reads the configuration and the reject list
(:mod:`mixminion.directory.reload`).

``LogLevel`` (default INFO) filters what twistd writes, as the node's does:
client addresses are logged only at DEBUG.  The soft limit on open files
is raised to ``MaxConnections`` + ``SPARE_DESCRIPTORS`` when the hard limit
allows: a full HTTP listener must not be what makes a vote's own fetches
or the consensus file fail with EMFILE.
"""

from __future__ import annotations

import os
import signal
import resource
from typing import Any, Callable, Mapping

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from mixminion.codec.rsa import PrivateKey
from mixminion.directory.authconfig import load_authority_config
from mixminion.directory.authority import atomic_write
from mixminion.directory.http import HTTPClient
from mixminion.directory.reload import ReloadService
from mixminion.signals import SignalService
from mixminion.directory.service import Authority, AuthorityService, AuthoritySettings
from mixminion.config.syntax import ConfigError
from mixminion.logfilter import apply_log_level

log = Logger()
IDENTITY_FILE = "identity.key"
#: file descriptors beyond the HTTP connections: log, key, store, peer fetches
SPARE_DESCRIPTORS = 64


class Options(usage.Options):
    synopsis = "-c authority.conf"
    longdesc = "Run a Type III (Mixminion) directory authority."
    optParameters = [["config", "c", None, "the authority's configuration file"]]

    def postOptions(self) -> None:  # noqa: N802
        if not self["config"]:
            raise usage.UsageError("a configuration file is required: -c authority.conf")


def load_identity(path: str, bits: int) -> PrivateKey:
    """The authority's signing key; created 0600 on first start, never replaced."""
    if not os.path.exists(path):
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        atomic_write(path, pem, 0o600)
        identity = PrivateKey(key)
        log.info("Created identity key; fingerprint {fp}", fp=identity.public.fingerprint)
        return identity
    with open(path, "rb") as f:
        loaded = serialization.load_pem_private_key(f.read(), password=None)
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise SystemExit(f"mixminion-directory: {path} is not an RSA key")
    return PrivateKey(loaded)


def ensure_descriptors(needed: int, getrlimit: Callable = resource.getrlimit,
                       setrlimit: Callable = resource.setrlimit) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to ``needed`` if below it (up to the
    hard limit); the soft limit in force afterwards."""
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < needed:
        log.warn("Only {soft} open files allowed; MaxConnections needs about {needed}: "
                 "lower MaxConnections or raise the limit (ulimit -n)", soft=soft, needed=needed)
    return soft


def build_authority(settings: AuthoritySettings, reactor) -> AuthorityService:
    """The authority's service; a SIGHUP reloads ``settings.config_file``, if set."""
    os.makedirs(settings.base_dir, mode=0o700, exist_ok=True)
    ensure_descriptors(settings.max_connections + SPARE_DESCRIPTORS)
    identity = load_identity(os.path.join(settings.base_dir, IDENTITY_FILE), settings.identity_key_bits)
    timeout = max(1.0, min(30.0, settings.vote_interval / 3 * 0.8))
    authority = Authority(settings, identity, reactor, HTTPClient(reactor, timeout=timeout))
    log.info("Authority {nick} ({fp}): {n} authorities, threshold {t}",
             nick=settings.nickname, fp=authority.fingerprint, n=len(authority.voters), t=authority.threshold)
    if settings.reject_file is not None:
        log.info("Reject list {file}: {summary}", file=settings.reject_file,
                 summary=settings.rejects.summary())
    authority_service = AuthorityService(authority, reactor)
    if settings.config_file is not None:
        reload_service = ReloadService(authority, settings.config_file, reactor)
        reload_service.setServiceParent(authority_service)
        SignalService(signal.SIGHUP, reload_service.reload, reactor).setServiceParent(authority_service)
    return authority_service


def makeService(options: Mapping[str, Any]) -> service.IService:  # noqa: N802
    from twisted.internet import reactor

    try:
        settings = load_authority_config(os.path.abspath(options["config"]))
    except ConfigError as exc:
        raise SystemExit(f"mixminion-directory: {exc}") from None
    apply_log_level(settings.log_level)
    return build_authority(settings, reactor)
