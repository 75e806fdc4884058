#!/usr/bin/env python3
"""Regenerate the option reference of doc/mixminiond.conf.5 from the
server's configuration schema (mixminion/server/config.py SCHEMA_SECTIONS).

The schema is the one place options are described, so the man page's
tables are generated from it rather than kept in step by hand.  Only the
text between the BEGIN/END GENERATED markers is replaced; the prose
around it is written by hand.

    python doc/gen_conf_man.py          # rewrite the man page
    python doc/gen_conf_man.py --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from mixminion.server.config import SCHEMA_SECTIONS  # noqa: E402

MAN = os.path.join(HERE, "mixminiond.conf.5")
#: how a change reaches the node (Option.effect)
EFFECTS = {
    "reload": "SIGHUP applies it",
    "restart": "restart needed",
    "refused": "refused at start unless left at its default",
    "pending": "accepted with a warning; not used yet",
}
BEGIN = '.\\" BEGIN GENERATED OPTIONS (doc/gen_conf_man.py)\n'
END = '.\\" END GENERATED OPTIONS\n'


def escape(text: str) -> str:
    """Make schema prose safe as a troff text line."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    if text.startswith((".", "'")):
        text = "\\&" + text
    return text


def generated() -> str:
    out = []
    for section in SCHEMA_SECTIONS:
        title = f"[{section.name}]"
        out.append(f".SS {escape(title)}\n")
        note = " (required section)" if section.required else ""
        doc = section.doc[0].upper() + section.doc[1:]
        out.append(escape(f"{doc}{note}.") + "\n")
        for option in section.options:
            out.append(".TP\n")
            out.append(f".B {escape(option.key)}\n")
            facts = [option.type.name]
            if option.required:
                facts.append("required")
            if option.default is not None and option.default != "":
                facts.append(f"default: {option.default}")
            elif option.derived:
                facts.append(f"default: {option.derived}")
            if option.many:
                facts.append("may be repeated")
            facts.append(EFFECTS[option.effect])
            if option.published:
                facts.append("published in the descriptor")
            body = option.doc[0].upper() + option.doc[1:]
            why = option.refused or option.pending
            if why:
                body += f" ({why})"
            out.append(escape(f"{body}. ({'; '.join(facts)}.)") + "\n")
    return "".join(out)


def render(current: str) -> str:
    start = current.index(BEGIN) + len(BEGIN)
    stop = current.index(END)
    return current[:start] + generated() + current[stop:]


def main(argv: list[str]) -> int:
    with open(MAN) as f:
        current = f.read()
    wanted = render(current)
    if "--check" in argv:
        if wanted != current:
            print(f"{MAN} is out of date: run python doc/gen_conf_man.py")
            return 1
        return 0
    if wanted != current:
        with open(MAN, "w") as f:
            f.write(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
