"""``python -m trainer <train|probe|figures|demo> ...``: the ``resrl`` command line (trainer/cli.py)."""

from trainer.cli import main

raise SystemExit(main())
