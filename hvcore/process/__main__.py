"""``python -m hvshare.hvcore.process``: run a hypervisor process (``hvctl start`` does)."""
import sys

from .loop import main

sys.exit(main())
