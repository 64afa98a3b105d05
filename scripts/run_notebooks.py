"""Execute the notebooks top to bottom and save them with their outputs (figures included).

    python scripts/run_notebooks.py                  # all three, ~1 min on the 2-core CPU
    python scripts/run_notebooks.py drift            # one

Needs the notebook extra: pip install -r requirements-notebooks.txt
"""
import sys
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parent.parent
NAMES = tuple(sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb")))


def main(names):
    for name in names or NAMES:
        path = ROOT / "notebooks" / f"{name}.ipynb"
        if not path.exists():
            raise SystemExit(f"error: {path} does not exist; choose from {', '.join(NAMES)}")
        nb = nbformat.read(path, as_version=4)
        t = time.time()
        nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
        nbformat.write(nb, path)
        print(f"{path.relative_to(ROOT)}: executed in {time.time() - t:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
