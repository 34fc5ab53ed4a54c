"""Time to a target accuracy over a grid of federated runs: the code behind `edgefed bench`.

    python benchmarks/time_to_accuracy.py --grid federa-sst2 --data ../shared/data/sst2
    edgefed bench --grid federa-sst2 --data ../shared/data/sst2          (the same)

Writes benchmarks/results/<grid>/: results.csv, table.md, accuracy_wall.png, accuracy_simulated.png,
bytes_to_target.png, and each run's metrics under cells/. Run it again to continue a killed grid.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).parent.resolve()]

from edgefed.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
