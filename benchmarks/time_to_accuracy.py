"""Time to a target accuracy over a grid of federated runs: the code behind `edgefed bench`.

    python benchmarks/time_to_accuracy.py --grid federa-sst2 --data ../shared/data/sst2
    edgefed bench --grid federa-sst2 --data ../shared/data/sst2          (the same)

Writes benchmarks/results/<grid>/: results.csv, table.md, accuracy_wall.png, accuracy_simulated.png,
bytes_to_target.png, and each run's metrics under cells/. Run it again to continue a killed grid.
"""

from __future__ import annotations

import sys

from edgefed.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
