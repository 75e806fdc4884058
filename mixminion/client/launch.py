"""The ``mixminion-client`` console script: :func:`mixminion.client.cli.main`
with the garbage collector held off while the client's modules load.

Importing creates tens of thousands of objects and no garbage worth
collecting; left on, the collector walks them again and again, which cost
a one-packet ``send`` about a tenth of its CPU (``benchmarks/client.py``).
What the imports made is frozen (never scanned again) and collection
resumes before the command runs.
"""

import gc


def main() -> None:
    gc.disable()
    try:
        from mixminion.client.cli import main as cli_main
    finally:
        gc.freeze()
        gc.enable()
    cli_main()
