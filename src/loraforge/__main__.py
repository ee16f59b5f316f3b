from loraforge.cli import main

raise SystemExit(main())
