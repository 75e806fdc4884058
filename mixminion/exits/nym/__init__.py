"""The NYM exit module: a nymserver inside a node (doc/nym.md).

``store`` keeps its state, ``nymserver`` does what requests and mail ask
for on it, ``module`` wires that into the node: exit payloads in, packets
out, an SMTP listener for mail to the nyms and the MTA for mail from them.
"""
