"""mixminion: a Type III (Mixminion) anonymous remailer built on Twisted."""

__version__ = "0.1.0.dev0"
