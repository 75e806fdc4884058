"""The exit modules that come with mixminion (loaded only when used)."""

from mixminion.exits import options
from mixminion.exits.plugin import ExitModulePlugin

smtp = ExitModulePlugin("SMTP", "Delivery/SMTP", "mixminion.exits.smtp.SMTPModule",
                        "Mail to any address through an MTA", options=options.SMTP)
mbox = ExitModulePlugin("MBOX", "Delivery/MBOX", "mixminion.exits.mbox.MBOXModule",
                        "Mail to local aliases listed in an address file", options=options.MBOX)
fragment = ExitModulePlugin("FRAGMENT", "Delivery/Fragmented", "mixminion.exits.fragment.FragmentModule",
                            "Reassembly of fragmented messages for the other modules",
                            options=options.FRAGMENTED)
nym = ExitModulePlugin("NYM", "Delivery/Nym", "mixminion.exits.nym.module.NymModule",
                       "A nymserver: mail to NAME@Domain through its owner's reply blocks",
                       options=options.NYM)
drop = ExitModulePlugin("DROP", None, "mixminion.exits.drop.DropModule", "Counts and discards")
