"""Server descriptors and (later) directories: the signed text documents
through which servers announce their keys and capabilities
(spec: descriptors.md).

Pure code, like :mod:`mixminion.codec`: text in, objects out; the
validation time and the randomness for signing are passed in by the caller.
"""
