"""Execute the notebooks top to bottom and save them with their outputs (figures included).

    python scripts/run_notebooks.py                  # all four, ~7 min on the 2-core CPU
    python scripts/run_notebooks.py drift            # one

Needs the notebook extra: pip install -r requirements-notebooks.txt
"""
import sys
import time
from pathlib import Path

import nbclient
import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sample  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAMES = tuple(sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb")))


def main(names):
    for name in names:
        sample.check(name in NAMES, "notebook", name, f"choose from {', '.join(NAMES)}")
    for name in names or NAMES:
        path = ROOT / "notebooks" / f"{name}.ipynb"
        nb = nbformat.read(path, as_version=4)
        t = time.time()
        nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
        with sample.atomic(path) as tmp:                # a failed run keeps the notebook
            nbformat.write(nb, str(tmp))
        print(f"{path.relative_to(ROOT)}: executed in {time.time() - t:.0f} s")


if __name__ == "__main__":
    sample.run_cli(lambda: main(sys.argv[1:]))
