import sys

if sys.argv[1:2] == ["pick"]:  # python -m trainer pick RUN: the sweep of a finished run
    from .picking.cli import main as pick_main

    sys.exit(pick_main(sys.argv[2:]))

from .cli import main

sys.exit(main())
