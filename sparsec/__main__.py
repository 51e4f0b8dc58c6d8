"""``python -m sparsec``: the console script, also for ``torchrun -m sparsec sparsify ...``
(torchrun starts each rank as ``python -m MODULE``)."""

import sys

from sparsec.entry import main

if __name__ == "__main__":
    sys.exit(main())
