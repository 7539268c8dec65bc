"""Execute every notebook top to bottom with nbclient and write the executed copies (`make notebooks`).

    python notebooks/execute.py [--out notebooks_out] [NOTEBOOK ...]

The kernel is this interpreter, registered under a private kernelspec in a temporary directory (as
tests/test_notebooks.py does), so the machine's own ``python3`` kernel, or its absence, does not
matter. Each notebook runs in notebooks/ (their relative paths assume it); the committed notebooks
are left untouched, without outputs. Notebooks 02-05 read ``$RESRL_RUN_DIR`` when it is set (with
``$RESRL_BASE_MODEL`` and ``$RESRL_PROBE_SET`` for a TRL or verl run; notebooks/README.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNEL = "resrl-notebooks"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="notebooks/execute.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: notebooks/*.ipynb)")
    parser.add_argument("--out", type=Path, default=Path("notebooks_out"),
                        help="where the executed copies go (default: notebooks_out)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell before it fails (default: 600)")
    args = parser.parse_args(argv)

    import nbclient
    import nbformat
    from ipykernel.kernelspec import install

    names = args.notebooks or sorted(HERE.glob("*.ipynb"))
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="resrl-jupyter-") as root:
        install(prefix=root, kernel_name=KERNEL)  # argv: [sys.executable, "-m", "ipykernel_launcher", ...]
        os.environ["JUPYTER_PATH"] = os.pathsep.join(
            [str(Path(root) / "share" / "jupyter"), *filter(None, [os.environ.get("JUPYTER_PATH")])])
        failed = 0
        for path in names:
            nb = nbformat.read(path, as_version=4)
            client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=args.timeout,
                                             resources={"metadata": {"path": str(HERE)}})
            t0 = time.perf_counter()
            try:
                client.execute()
                status = "ok"
            except nbclient.exceptions.CellExecutionError as e:
                failed += 1
                status = f"FAILED: {str(e).strip().splitlines()[-1]}"
            target = args.out / Path(path).name
            nbformat.write(nb, target)
            print(f"{Path(path).name}: {status} ({time.perf_counter() - t0:.0f} s) -> {target}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
